"""scripts/gpu_bench.sh cannot rot: its CPU smoke mode runs every stage it can at toy sizes (about half
a minute here), and the target verdicts are checked on hand-made GPU results (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pirl_fast.bench import targets

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_run_writes_every_file_and_a_verdict_line(tmp_path):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "bench"
    env = {**os.environ, "PIRL_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "--cpu-smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"run.log", "gpu_tests.log", "membank.json", "loader.json", "step.json",
                                               "targets.json"}  # at most 8 files: the device tool's limit
    log = (out / "run.log").read_text()
    assert "hw_decoder_load sweep: needs a GPU" in log and "missing: none" in log
    assert [line for line in log.splitlines() if ": exit " in line and ": exit 0 " not in line] == []
    step = json.loads((out / "step.json").read_text())["results"]["step"]
    assert [(r["backend"], r["bank_rows"]) for r in step] == [("synthetic", 64), ("dali", 64)]
    paths = {r["path"] for r in json.loads((out / "membank.json").read_text())["results"]["membank"]}
    assert paths == {"naive", "two-pass", "fused"}
    verdicts = json.loads((out / "targets.json").read_text())
    assert {r["status"] for r in verdicts["targets"].values()} == {"unmeasured"}
    assert "skipped" in verdicts["gpu_tests"]  # pytest -m gpu ran: every GPU test skips without CUDA
    assert proc.stdout.strip().splitlines()[-1] == verdicts["summary"]


def write(folder: Path, name: str, bench: str, rows: list[dict]) -> None:
    (folder / name).write_text(json.dumps({"results": {bench: rows}}))


def fused(speedup: float, frac: float, **where) -> dict:
    return {"path": "fused", "batch": 256, "negatives": 32000, "speedup": speedup, "frac_of_peak": frac, **where}


def test_verdicts_from_gpu_results(tmp_path):
    write(tmp_path, "step.json", "step", [
        {"backend": "synthetic", "device": "cuda:0", "samples_per_s": 3300.0, "vs_synthetic": 1.0},
        {"backend": "dali", "device": "cuda:0", "samples_per_s": 2900.0, "vs_synthetic": 0.88}])
    write(tmp_path, "step_compile.json", "step", [
        {"backend": "dali", "device": "cuda:0", "samples_per_s": 3100.0, "vs_synthetic": 0.96}])
    write(tmp_path, "membank.json", "membank", [
        fused(4.1, 0.72, bank_dtype="float32"), fused(2.9, 0.65, bank_dtype="bfloat16"),
        fused(9.0, 0.10, batch=32),  # other sizes do not count
        {"path": "naive", "batch": 256, "negatives": 32000}])
    (tmp_path / "gpu_tests.log").write_text("....s\n31 passed, 2 skipped, 400 deselected in 80.1s\n")
    assert targets.main([str(tmp_path), "--gpu"]) == 0
    saved = json.loads((tmp_path / "targets.json").read_text())
    status = {name: (r["status"], r["value"]) for name, r in saved["targets"].items()}
    assert status == {"e2e": ("met", 3100.0), "dali": ("met", 0.96), "fused": ("not met", 2.9), "hbm": ("met", 0.65)}
    assert saved["gpu_tests"] == "31 passed, 2 skipped, 400 deselected in 80.1s"
    assert "fused loss >= 3x naive: not met (min 2.90x)" in saved["summary"]


def test_missing_or_cpu_results_are_unmeasured(tmp_path):
    write(tmp_path, "step.json", "step", [{"backend": "dali", "device": "cpu", "samples_per_s": 50.0,
                                           "vs_synthetic": 0.9}])
    status = {name: r["status"] for name, r in targets.judge(tmp_path, gpu=True).items()}
    assert status == dict.fromkeys(("e2e", "dali", "fused", "hbm"), "unmeasured")
    assert targets.gpu_tests(tmp_path) == "not run"
    write(tmp_path, "membank.json", "membank", [fused(5.0, 0.9)])
    assert {r["status"] for r in targets.judge(tmp_path, gpu=False).values()} == {"unmeasured"}
