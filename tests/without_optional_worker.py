"""Runs bench sub-commands in a process where Hydra, OmegaConf, WebDataset and DALI cannot be imported, as on the
GPU image before any wheel arrives; prints one JSON object of what happened (tests/test_bench_optional_imports.py).

    python tests/without_optional_worker.py OUT_DIR
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

BLOCKED = ("hydra", "omegaconf", "webdataset", "nvidia")  # nvidia: DALI's namespace (nvidia.dali)


class Block:
    """A meta-path finder that refuses the blocked packages, as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def main(out: Path) -> None:
    for name in [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]:
        del sys.modules[name]
    sys.meta_path.insert(0, Block())
    from pirl_fast.bench.__main__ import BENCHMARKS
    from pirl_fast.bench.__main__ import main as bench

    found = {"help": {}, "runs": {}}
    for name in BENCHMARKS:
        text = io.StringIO()
        try:
            with contextlib.redirect_stdout(text):
                bench([name, "--help"])
        except SystemExit as e:
            found["help"][name] = e.code if e.code else "--jsonl" in text.getvalue()
    runs = {
        "membank": ["--batch", "2", "--negatives", "64", "--num-samples", "200", "--dim", "8", "--repeats", "1",
                    "--dtypes", "float32", "--losses", "nce", "--device", "cpu", "--copy-mib", "1"],
        "compute": ["--batch", "2", "--steps", "1", "--warmup", "0", "--bank-rows", "64", "--negatives", "16",
                    "--image-size", "32", "--patch-size", "8", "--device", "cpu"],
        "step": ["--backends", "synthetic", "--steps", "1", "--warmup", "0", "--batch", "2", "--images", "4"],
    }
    for name, argv in runs.items():
        path = out / f"{name}.jsonl"
        with contextlib.redirect_stdout(io.StringIO()):
            status = bench([name, *argv, "--jsonl", str(path)])
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        found["runs"][name] = {"status": status, "rows": [r for r in rows if r["kind"] == "row"],
                               "header": next(r for r in rows if r["kind"] == "header")}
    found["still_blocked"] = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
    print(json.dumps(found, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
