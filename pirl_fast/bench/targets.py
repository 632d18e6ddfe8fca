"""Issue 12's GPU targets, judged from one run's JSON files (scripts/gpu_bench.sh writes them).

    python -m pirl_fast.bench.targets DIR [--gpu]     # prints one line, writes DIR/targets.json

Targets, for the first GPU run (one H200):
  e2e      at least 3,000 PIRL samples/s end to end with DALI (`bench step`, best of the step files)
  dali     DALI at least 0.95x of synthetic data (`bench step`'s vs_synthetic, best of the step files)
  fused    the fused bank loss at least 3x naive, forward+backward (`bench membank`: the smallest
           speed-up over its fused rows at B=256, K=32,000, both losses, every bank dtype)
  hbm      the fused gather at least 60% of HBM bandwidth (the same rows' smallest frac_of_peak)
Each is "met", "not met" or "unmeasured" (no GPU, a stage that did not run or failed, rows
missing). Without --gpu (the CPU smoke run) every GPU target is unmeasured, whatever the files
hold. The GPU tests' outcome (pytest's summary line, from gpu_tests.log) is reported beside them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pirl_fast.runtime import atomic

E2E_SAMPLES_PER_S = 3000.0
DALI_VS_SYNTHETIC = 0.95
FUSED_SPEEDUP = 3.0
HBM_FRACTION = 0.6
TARGET_BATCH, TARGET_NEGATIVES = 256, 32000  # the sizes the membank targets are stated at
STEP_FILES = ("step.json", "step_compile.json")


def rows(path: Path, bench: str) -> list[dict]:
    """The rows of `bench` in a `python -m pirl_fast.bench ... --json` file; [] when absent or unreadable."""
    try:
        return json.loads(path.read_text())["results"][bench]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def verdict(value: float | None, threshold: float, fmt: str) -> dict:
    if value is None:
        return {"status": "unmeasured", "value": None}
    return {"status": "met" if value >= threshold else "not met", "value": value, "text": fmt.format(value)}


def judge(folder: Path, gpu: bool) -> dict[str, dict]:
    """{target: {"status", "value", "text"?, "why"?}} from the JSON files in `folder`."""
    if not gpu:
        why = "no GPU: the CPU smoke run does not measure GPU targets"
        return {name: {"status": "unmeasured", "value": None, "why": why} for name in ("e2e", "dali", "fused", "hbm")}
    step_rows = [r for name in STEP_FILES for r in rows(folder / name, "step")]
    dali = [r for r in step_rows if r.get("backend") == "dali" and str(r.get("device", "")).startswith("cuda")]
    fused = [r for r in rows(folder / "membank.json", "membank") if r.get("path") == "fused"
             and r.get("batch") == TARGET_BATCH and r.get("negatives") == TARGET_NEGATIVES and "speedup" in r]
    return {
        "e2e": verdict(max((r["samples_per_s"] for r in dali), default=None), E2E_SAMPLES_PER_S, "{:,.0f}/s"),
        "dali": verdict(max((r["vs_synthetic"] for r in dali if r.get("vs_synthetic") == r.get("vs_synthetic")),
                            default=None), DALI_VS_SYNTHETIC, "{:.2f}x"),
        "fused": verdict(min((r["speedup"] for r in fused), default=None), FUSED_SPEEDUP, "min {:.2f}x"),
        "hbm": verdict(min((r["frac_of_peak"] for r in fused if "frac_of_peak" in r), default=None),
                       HBM_FRACTION, "min {:.0%}"),
    }


def gpu_tests(folder: Path) -> str:
    """pytest's last summary line from gpu_tests.log ("12 passed, 3 skipped in ..."), or why there is none."""
    try:
        lines = (folder / "gpu_tests.log").read_text().splitlines()
    except OSError:
        return "not run"
    found = [line.strip("= ") for line in lines
             if re.match(r"=* ?\d+ (passed|failed|errors?|skipped|deselected)\b", line.strip())]
    return found[-1] if found else "no pytest summary (see gpu_tests.log)"


LABELS = {"e2e": f">= {E2E_SAMPLES_PER_S:,.0f} samples/s e2e (dali)", "dali": f"dali >= {DALI_VS_SYNTHETIC}x synthetic",
          "fused": f"fused loss >= {FUSED_SPEEDUP:g}x naive", "hbm": f"gather >= {HBM_FRACTION:.0%} HBM"}


def summary_line(results: dict[str, dict], tests: str) -> str:
    parts = [f"{LABELS[name]}: {r['status']}" + (f" ({r['text']})" if r.get("text") else "")
             for name, r in results.items()]
    return "targets: " + " | ".join(parts) + f" | gpu tests: {tests}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pirl_fast.bench.targets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the run's folder (membank.json, step.json, ...)")
    parser.add_argument("--gpu", action="store_true", help="the files come from a GPU run: judge the targets")
    args = parser.parse_args(argv)
    results = judge(args.folder, args.gpu)
    tests = gpu_tests(args.folder)
    line = summary_line(results, tests)
    atomic.write_json(args.folder / "targets.json", {"targets": results, "gpu_tests": tests, "summary": line}, indent=2)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
