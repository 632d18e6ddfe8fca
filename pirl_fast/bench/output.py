"""Printing and saving benchmark results: one table for people, one JSON file for tools."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from pirl_fast.runtime import atomic


def machine_description() -> str:
    """One line naming the machine the figures came from (CPU count, GPU if any)."""
    import torch

    cpu = f"{os.cpu_count()} CPU cores ({platform.machine()}, {cpu_model()})"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} + {cpu}"
    return cpu


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.2f}"
        return f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table; columns are the union of the rows' keys, in first-seen order."""
    if not rows:
        return "(no results)"
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    cells = [[format_value(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, results: dict[str, list[dict[str, Any]]], command: str) -> None:
    """Write {"date", "machine", "command", "results": {bench: rows}} atomically to `path`."""
    atomic.write_json(path, {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_description(),
                             "command": command, "results": results}, indent=2)
