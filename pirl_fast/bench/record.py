"""Rows that survive a cut run: one JSON line per row, appended the moment it is measured.

    rec = Recorder("membank", path)       # path None: rows are only kept in memory (rec.rows)
    rec.header(command)                   # first line of a call: versions, GPU, clocks, date
    row = rec.guarded({"path": "fused", ...}, measure)   # measure() -> dict of figures

`guarded` runs one measurement. Its figures, or the error that stopped it ("error": "Type: message"),
are written beside the row's description and flushed to disk before the next row starts, so a
failed backend, a crashed process or a step killed at its time limit (scripts/gpu_bench.sh sends
SIGTERM, then SIGKILL) loses at most the row in flight. KeyboardInterrupt and SystemExit are not
caught: they stop the call, and the rows so far are on disk.

Fault injection, for the dress rehearsal (tests/test_gpu_bench.py): PIRL_BENCH_INJECT lists rows
to fail on purpose, `BENCH:KEY=VALUE[,KEY=VALUE];...` (e.g. `membank:path=two-pass;step:backend=dali`):
a row of that bench whose description holds every KEY=VALUE raises instead of measuring.

A file of rows is read back with `read_rows(path)`, which skips a last line cut in half.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

INJECT_ENV = "PIRL_BENCH_INJECT"
PACKAGES = ("torch", "triton", "torchvision", "nvidia-dali-cuda130", "webdataset", "hydra-core", "numpy", "pillow")
NVIDIA_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
                     "temperature.gpu", "power.draw", "pstate")


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the benchmarks touch (None: not installed), without importing them."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def gpu_state() -> dict[str, Any]:
    """The GPU as nvidia-smi sees it now (name, driver, current and max clocks, temperature, power), and
    torch's view (device, CUDA, SMs) when torch is already imported; {} where neither has one."""
    state: dict[str, Any] = {}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}",
                                  "--format=csv,noheader,nounits", "--id=0"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            state.update({f"smi.{k}": v.strip() for k, v in zip(NVIDIA_SMI_FIELDS, out.split(","))})
        except (OSError, subprocess.SubprocessError) as e:
            state["smi.error"] = f"{type(e).__name__}: {e}"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        state.update({"device": props.name, "cuda": torch.version.cuda, "sms": props.multi_processor_count,
                      "capability": f"{props.major}.{props.minor}"})
    return state


def environment() -> dict[str, Any]:
    """What every file of rows starts with: where, when and on which software the figures were taken."""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "cpus": os.cpu_count(),
            "versions": versions(), "gpu": gpu_state()}


def injected_failures() -> list[tuple[str, dict[str, str]]]:
    """PIRL_BENCH_INJECT parsed: [(bench, {key: value})]."""
    found = []
    for item in filter(None, (s.strip() for s in os.environ.get(INJECT_ENV, "").split(";"))):
        bench, _, pairs = item.partition(":")
        found.append((bench, dict(p.split("=", 1) for p in pairs.split(",") if "=" in p)))
    return found


class InjectedFailure(RuntimeError):
    pass


class Recorder:
    """Appends rows of one bench to a JSON-lines file as they are measured (see the module docstring)."""

    def __init__(self, bench: str, path: str | os.PathLike | None = None):
        self.bench, self.path = bench, Path(path) if path else None
        self.rows: list[dict[str, Any]] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, line: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def header(self, command: str) -> None:
        self._append({"bench": self.bench, "kind": "header", "command": command, **environment()})

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        self._append({"bench": self.bench, "kind": "row", **row})
        return row

    def guarded(self, description: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run measure(); record description + its figures, or description + the error. Returns the row."""
        row = dict(description)
        t0 = time.perf_counter()
        try:
            for bench, where in injected_failures():
                if bench == self.bench and all(str(row.get(k)) == v for k, v in where.items()):
                    raise InjectedFailure(f"injected failure ({INJECT_ENV}={os.environ[INJECT_ENV]})")
            row.update(measure())
        except Exception as e:  # one row's failure, recorded; the next row still runs
            row["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
            print(f"{self.bench}: row {description} failed: {row['error']}", file=sys.stderr, flush=True)
        row["row_s"] = round(time.perf_counter() - t0, 3)
        return self.add(row)


def read_rows(path: str | os.PathLike, bench: str | None = None, kind: str = "row") -> list[dict[str, Any]]:
    """The rows (kind "row") or headers (kind "header") of a JSON-lines file; a half-written line is skipped."""
    found = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and item.get("kind") == kind and (bench is None or item.get("bench") == bench):
            found.append(item)
    return found
