"""scripts/gpu_bench.sh's dress rehearsal: both stages run every step with CPU stand-ins at toy sizes, with one row
of each stage failed on purpose (PIRL_BENCH_INJECT) and one step of each cut by its time limit; every other row
must still be written, each step must leave its status row, and the verdict must still come (about a minute in
all). The target verdicts are checked on hand-made GPU rows (no timing asserted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pirl_fast.bench import targets
from pirl_fast.bench.record import read_rows

ROOT = Path(__file__).resolve().parents[1]


def rehearse(out: Path, stage: int, inject: str, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIRL_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PIRL_BENCH_INJECT": inject}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "--cpu", "--stage", str(stage),
                           "--out", str(out), *options], env=env, capture_output=True, text=True, timeout=600)


def steps(out: Path, stage: int) -> dict[str, str]:
    return targets.step_status(read_rows(out / f"stage{stage}.jsonl"))


def test_stage_one_survives_a_failed_row_and_a_step_out_of_time(tmp_path):
    out = tmp_path / "s1"
    # the two-pass nce row over a float32 bank fails; compute gets 3 s (its step takes longer: cut by SIGTERM)
    proc = rehearse(out, 1, "membank:path=two-pass,loss=nce,bank_dtype=float32", "--limit", "compute=3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"stage1.log", "stage1.jsonl", "stage1_tests.log",
                                               "stage1_targets.json"}  # nothing else: the device tool returns 8
    assert steps(out, 1) == {"compat": "ok", "tests": "ok", "membank": "ok", "compute": "time limit"}
    membank = read_rows(out / "stage1.jsonl", "membank")
    failed = [r for r in membank if "error" in r]
    assert [(r["path"], r["loss"], r["bank_dtype"]) for r in failed] == [("two-pass", "nce", "float32")]
    assert "injected failure" in failed[0]["error"]
    measured = [(r["bank_dtype"], r["loss"], r["path"]) for r in membank if "fwd_bwd_ms" in r]
    assert len(measured) == 2 * 2 * 3 - 1  # every other row of both dtypes, both losses, three paths
    assert all("speedup" in r for r in membank if r.get("path") == "fused")  # naive still measured beside it
    assert [r["check"] for r in read_rows(out / "stage1.jsonl", "compat") if "error" not in r] == [
        "versions", "apis", "cpu step"]
    headers = read_rows(out / "stage1.jsonl", kind="header")
    assert {h["bench"] for h in headers} >= {"compat", "membank"} and all(h["versions"]["torch"] for h in headers)
    verdict = json.loads((out / "stage1_targets.json").read_text())
    assert {r["status"] for r in verdict["targets"].values()} == {"unmeasured"}
    assert "skipped" in verdict["gpu_tests"]  # pytest -m gpu ran: every GPU test skips without CUDA
    assert proc.stdout.strip().splitlines()[-1] == verdict["summary"]
    assert "compute time limit" in verdict["summary"] and verdict["environment"]["versions"]["torch"]
    assert "environment: {" in (out / "stage1.log").read_text()  # versions and clocks in every file


def test_stage_two_survives_a_failed_row_and_a_step_out_of_time(tmp_path):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "s2"
    # the step bench's dali row fails; the loader gets 2 s (building the DALI pipeline alone takes longer)
    proc = rehearse(out, 2, "step:backend=dali", "--limit", "loader=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert steps(out, 2) == {"tests": "ok", "shards": "ok", "loader": "time limit", "step": "ok"}
    step = read_rows(out / "stage2.jsonl", "step")
    assert [(r["backend"], "error" in r) for r in step] == [("synthetic", False), ("dali", True)]
    assert step[0]["samples_per_s"] > 0 and step[0]["bank_rows"] == 64
    assert not (out / ".shards").exists() and len(list(out.iterdir())) == 4  # scratch went to /tmp
    verdict = json.loads((out / "stage2_targets.json").read_text())
    assert set(verdict["targets"]) == {"e2e", "dali"} and proc.stdout.strip().splitlines()[-1] == verdict["summary"]


def test_the_verdict_comes_even_when_the_budget_is_spent(tmp_path):
    """A budget too small for any step: every step is a 'skipped' row and the exit trap still judges."""
    out = tmp_path / "s1"
    proc = rehearse(out, 1, "", "--budget", "16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(steps(out, 1).values()) == {"skipped"}
    assert proc.stdout.strip().splitlines()[-1].startswith("stage 1 targets: ")


def write(folder: Path, stage: int, rows: list[dict]) -> None:
    with open(folder / f"stage{stage}.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({"kind": "row", **row}) + "\n")
        f.write('{"kind": "row", "bench": "membank", "path": "fus')  # a line cut in half by a killed process


def fused(speedup: float, frac: float, **where) -> dict:
    return {"bench": "membank", "path": "fused", "batch": 256, "negatives": 32000, "speedup": speedup,
            "frac_of_copy": frac, **where}


def test_verdicts_from_gpu_rows(tmp_path):
    write(tmp_path, 1, [
        fused(4.1, 0.72, bank_dtype="float32"), fused(2.9, 0.65, bank_dtype="bfloat16"),
        fused(9.0, 0.10, batch=32),  # other sizes do not count
        {**fused(1.0, 0.1), "error": "OutOfMemoryError: ..."},  # a failed row does not count
        {"bench": "compute", "device": "cuda", "samples_per_s": 3300.0},
        {"bench": "stage1", "step": "membank", "status": "ok"}, {"bench": "stage1", "step": "compute", "status": "ok"}])
    (tmp_path / "stage1_tests.log").write_text("....s\n31 passed, 2 skipped, 400 deselected in 80.1s\n")
    assert targets.main([str(tmp_path), "--stage", "1", "--gpu"]) == 0
    saved = json.loads((tmp_path / "stage1_targets.json").read_text())
    status = {name: (r["status"], r["value"]) for name, r in saved["targets"].items()}
    assert status == {"fused": ("not met", 2.9), "hbm": ("met", 0.65), "ceiling": ("met", 3300.0)}
    assert saved["gpu_tests"] == "31 passed, 2 skipped, 400 deselected in 80.1s"
    assert "fused loss >= 3x naive: not met (min 2.90x)" in saved["summary"]


def test_unmeasured_targets_say_why(tmp_path):
    write(tmp_path, 2, [{"bench": "step", "backend": "dali", "device": "cuda:0", "error": "RuntimeError: nvjpeg"},
                        {"bench": "stage2", "step": "step", "status": "ok"},
                        {"bench": "stage2", "step": "loader", "status": "time limit"}])
    result = targets.judge(tmp_path, "2", gpu=True)
    assert {name: r["status"] for name, r in result.items()} == {"e2e": "unmeasured", "dali": "unmeasured"}
    assert result["e2e"]["why"] == "step: RuntimeError: nvjpeg"
    write(tmp_path, 1, [{"bench": "stage1", "step": "membank", "status": "time limit"}])
    assert targets.judge(tmp_path, "1", gpu=True)["fused"]["why"] == "step membank: time limit"
    assert targets.judge(tmp_path, "1", gpu=True)["ceiling"]["why"] == "step compute did not run"
    assert targets.gpu_tests(tmp_path, "1") == "not run"
    write(tmp_path, 1, [fused(5.0, 0.9)])
    assert {r["status"] for r in targets.judge(tmp_path, "1", gpu=False).values()} == {"unmeasured"}


LEASE_S, SLACK_S = 15 * 60, 4 * 60  # the device tool's lease; the slack issue 22 asks to keep


def runbook_rows() -> list[dict[str, str]]:
    """README "On a GPU"'s table of calls: one dict per row, keyed by the header's cells."""
    lines = (ROOT / "README.md").read_text().split("### On a GPU", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| call |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[start:end]]
    header, _, *rows = cells
    return [dict(zip(header, row)) for row in rows]


def test_the_runbook_budget_adds_up_with_four_minutes_of_slack():
    rows = runbook_rows()
    *calls, total = rows
    seconds = [int(r["seconds"]) for r in calls]
    assert total["call"] == "total" and int(total["seconds"]) == sum(seconds)
    assert sum(seconds) <= LEASE_S - SLACK_S, f"{sum(seconds)} s leave less than {SLACK_S} s of {LEASE_S}"
    script = (ROOT / "scripts" / "gpu_bench.sh").read_text()
    for stage in ("1", "2"):
        budget = int(re.search(rf"^STAGE{stage}_BUDGET=(\d+)", script, re.M).group(1))
        row = next(r for r in calls if r["call"].endswith(f"stage {stage}"))
        assert f"STAGE{stage}_BUDGET {budget}" in row["where the figure comes from"]  # the figure is the script's
        assert budget < int(row["seconds"]) and budget + 30 <= int(row["timeout_s"]) <= 600  # room for the verdict
        assert f"--stage {stage} --out $OUT" in row["command"]
    carried = [r["carry"].replace("`", "").split() for r in calls if r["carry"]]
    assert [paths[0] for paths in carried] == [f".whl/part-0{i}" for i in range(4)]  # each part once, in order
    assert all(paths[1:] == [".whl/SHA256SUMS"] for paths in carried)  # what receive checks the part against
    for r in calls:
        if r["carry"]:
            assert f"receive {r['carry'].split('`')[1]}" in r["command"]


def test_a_test_past_its_time_limit_fails_and_the_next_runs(tmp_path):
    """PIRL_TEST_TIMEOUT (tests/conftest.py): the stage's pytest does not hang on one test."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_sleep.py").write_text("import time\n\ndef test_slow():\n    time.sleep(30)\n\n"
                                            "def test_fast():\n    pass\n")
    env = {**os.environ, "PIRL_TEST_TIMEOUT": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # node ids relative to it
    assert "TimeoutError: test_sleep.py::test_slow ran past PIRL_TEST_TIMEOUT=1s" in proc.stdout, proc.stdout[-2000:]
    assert "1 failed, 1 passed" in proc.stdout
