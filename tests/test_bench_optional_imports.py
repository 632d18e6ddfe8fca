"""Each bench sub-command imports only what it needs: with Hydra, OmegaConf, WebDataset and DALI unimportable (the
GPU image before the wheels arrive), every --help works, `membank` and `compute` measure, `step` records its row
with the missing package named, and the stage-1 kernel tests collect (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sub_commands_run_without_hydra_webdataset_and_dali(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "without_optional_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["help"] == dict.fromkeys(("shard", "loader", "membank", "compute", "step", "learn", "analyses"), True)
    membank, compute, step = (found["runs"][name] for name in ("membank", "compute", "step"))
    assert membank["status"] == compute["status"] == step["status"] == 0
    assert [r["path"] for r in membank["rows"]] == ["copy", "naive", "two-pass", "fused"]
    assert all("error" not in r for r in membank["rows"] + compute["rows"]), membank["rows"] + compute["rows"]
    assert compute["rows"][0]["samples_per_s"] > 0
    assert step["rows"][0]["error"] == "ModuleNotFoundError: No module named 'hydra'"  # a row, not a lost call
    assert membank["header"]["versions"]["torch"] and "gpu" in membank["header"]
    assert found["still_blocked"] == []


def test_stage_one_kernel_tests_collect_without_them():
    worker = ROOT / "tests" / "without_optional_worker.py"
    code = (f"import sys; sys.path.insert(0, {str(worker.parent)!r}); import without_optional_worker as w; "
            "sys.meta_path.insert(0, w.Block()); import pytest; sys.exit(pytest.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "-q", "--collect-only", "-m", "gpu", "-p", "no:cacheprovider",
                           "-p", "no:hydra_pytest", "tests/test_bank_kernels.py", "tests/test_bank_loss.py"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "tests collected" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
