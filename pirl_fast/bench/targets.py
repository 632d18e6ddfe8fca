"""The GPU targets, judged from one stage's rows (scripts/gpu_bench.sh writes stageN.jsonl).

    python -m pirl_fast.bench.targets DIR --stage 1|2 [--gpu]   # prints one line, writes DIR/stageN_targets.json

Targets (one H100 or H200), by the stage that measures them:
  stage 1  fused    the fused bank loss at least 3x naive, forward+backward (`bench membank`: the smallest
                    speed-up over its fused rows at B=256, K=32,000, both losses, every bank dtype)
           hbm      the fused gather kernel at least 60% of this card's measured copy bandwidth (the same
                    rows' smallest frac_of_copy)
           ceiling  the PIRL step on synthetic data at least 3,000 samples/s (`bench compute`, best row):
                    without it the end-to-end target cannot be met
  stage 2  e2e      at least 3,000 PIRL samples/s end to end with DALI (`bench step`, best dali row on CUDA)
           dali     DALI at least 0.95x of synthetic data (the same rows' best vs_synthetic)
Each is "met", "not met" or "unmeasured" (no GPU, a step that did not run, failed or ran out of time:
"why" names the step's status or the rows' error). Without --gpu (the dress rehearsal) every target is
unmeasured, whatever the rows hold. Beside them: each step's status and the GPU tests' pytest summary.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pirl_fast.bench.record import environment, read_rows
from pirl_fast.runtime import atomic

E2E_SAMPLES_PER_S = 3000.0
DALI_VS_SYNTHETIC = 0.95
FUSED_SPEEDUP = 3.0
COPY_FRACTION = 0.6
TARGET_BATCH, TARGET_NEGATIVES = 256, 32000  # the sizes the membank targets are stated at
STAGE_TARGETS = {"1": ("fused", "hbm", "ceiling"), "2": ("e2e", "dali")}
SOURCE_STEP = {"fused": "membank", "hbm": "membank", "ceiling": "compute", "e2e": "step", "dali": "step"}
LABELS = {"e2e": f">= {E2E_SAMPLES_PER_S:,.0f} samples/s e2e (dali)", "dali": f"dali >= {DALI_VS_SYNTHETIC}x synthetic",
          "fused": f"fused loss >= {FUSED_SPEEDUP:g}x naive", "hbm": f"gather >= {COPY_FRACTION:.0%} of copy bandwidth",
          "ceiling": f"synthetic step >= {E2E_SAMPLES_PER_S:,.0f} samples/s"}


def verdict(value: float | None, threshold: float, fmt: str, why: str) -> dict:
    if value is None:
        return {"status": "unmeasured", "value": None, "why": why}
    return {"status": "met" if value >= threshold else "not met", "value": value, "text": fmt.format(value)}


def step_status(rows: list[dict]) -> dict[str, str]:
    """{step: "ok" | "failed" | "time limit" | "skipped"} from the script's own rows."""
    return {r["step"]: r["status"] for r in rows if r.get("bench", "").startswith("stage") and "step" in r}


def why_unmeasured(target: str, rows: list[dict], steps: dict[str, str]) -> str:
    step = SOURCE_STEP[target]
    if steps.get(step, "ok") != "ok":
        return f"step {step}: {steps[step]}"
    errors = [r["error"] for r in rows if r.get("bench") == step and "error" in r]
    if errors:
        return f"{step}: {errors[0]}"
    return f"no {step} rows at the target's sizes" if step in steps else f"step {step} did not run"


def judge(folder: Path, stage: str, gpu: bool) -> dict[str, dict]:
    """{target: {"status", "value", "text" | "why"}} for the stage's targets, from DIR/stageN.jsonl."""
    rows = read_rows(folder / f"stage{stage}.jsonl")
    steps = step_status(rows)
    if not gpu:
        why = "no GPU: the dress rehearsal does not measure GPU targets"
        return {name: {"status": "unmeasured", "value": None, "why": why} for name in STAGE_TARGETS[stage]}
    ok = [r for r in rows if "error" not in r]
    fused = [r for r in ok if r.get("bench") == "membank" and r.get("path") == "fused"
             and r.get("batch") == TARGET_BATCH and r.get("negatives") == TARGET_NEGATIVES and "speedup" in r]
    compute = [r for r in ok if r.get("bench") == "compute" and str(r.get("device", "")).startswith("cuda")]
    dali = [r for r in ok if r.get("bench") == "step" and r.get("backend") == "dali"
            and str(r.get("device", "")).startswith("cuda")]
    found = {
        "fused": (min((r["speedup"] for r in fused), default=None), FUSED_SPEEDUP, "min {:.2f}x"),
        "hbm": (min((r["frac_of_copy"] for r in fused if "frac_of_copy" in r), default=None), COPY_FRACTION,
                "min {:.0%}"),
        "ceiling": (max((r["samples_per_s"] for r in compute), default=None), E2E_SAMPLES_PER_S, "{:,.0f}/s"),
        "e2e": (max((r["samples_per_s"] for r in dali), default=None), E2E_SAMPLES_PER_S, "{:,.0f}/s"),
        "dali": (max((r["vs_synthetic"] for r in dali if r.get("vs_synthetic") == r.get("vs_synthetic")),
                     default=None), DALI_VS_SYNTHETIC, "{:.2f}x"),
    }
    return {name: verdict(*found[name], why_unmeasured(name, rows, steps)) for name in STAGE_TARGETS[stage]}


def gpu_tests(folder: Path, stage: str) -> str:
    """pytest's last summary line from stageN_tests.log ("12 passed, 3 skipped in ..."), or why there is none."""
    try:
        lines = (folder / f"stage{stage}_tests.log").read_text().splitlines()
    except OSError:
        return "not run"
    found = [line.strip("= ") for line in lines
             if re.match(r"=* ?\d+ (passed|failed|errors?|skipped|deselected)\b", line.strip())]
    return found[-1] if found else "no pytest summary (see the tests log)"


def summary_line(stage: str, results: dict[str, dict], steps: dict[str, str], tests: str) -> str:
    parts = [f"{LABELS[name]}: {r['status']}" + (f" ({r['text']})" if r.get("text") else "")
             for name, r in results.items()]
    ran = ", ".join(f"{name} {status}" for name, status in steps.items()) or "none"
    return f"stage {stage} targets: " + " | ".join(parts) + f" | gpu tests: {tests} | steps: {ran}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pirl_fast.bench.targets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the call's folder (stageN.jsonl, stageN_tests.log)")
    parser.add_argument("--stage", choices=sorted(STAGE_TARGETS), required=True)
    parser.add_argument("--gpu", action="store_true", help="the rows come from a GPU run: judge the targets")
    args = parser.parse_args(argv)
    results = judge(args.folder, args.stage, args.gpu)
    steps = step_status(read_rows(args.folder / f"stage{args.stage}.jsonl"))
    tests = gpu_tests(args.folder, args.stage)
    line = summary_line(args.stage, results, steps, tests)
    atomic.write_json(args.folder / f"stage{args.stage}_targets.json",
                      {"targets": results, "steps": steps, "gpu_tests": tests, "summary": line,
                       "environment": environment()}, indent=2)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
