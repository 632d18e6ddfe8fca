"""`--cfg job` regression: the composed config of every experiment is what it was when the golden
files were written (before the defaults moved out of the group yamls into the dataclasses).

A change that is meant to alter a composed config regenerates its golden file, and the diff shows
it in review:
    python -m pirl_fast.train experiment=smoke --cfg job > tests/golden/cfg_job/smoke.yaml
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "cfg_job"
# golden file name -> the overrides that compose it
CASES = {
    "default": [],
    "pirl_in1k_r50": ["experiment=pirl_in1k_r50"],
    "smoke": ["experiment=smoke"],
    "jigsaw_in1k_r50": ["experiment=jigsaw_in1k_r50"],
    "pirl_mlp_in1k_r50": ["experiment=pirl_mlp_in1k_r50"],
    "fmnist": ["experiment=fmnist"],
    "pirl_in1k_r50+sweep_lambda": ["experiment=[pirl_in1k_r50,sweep_lambda]"],
    "pirl_in1k_r50+sweep_negatives": ["experiment=[pirl_in1k_r50,sweep_negatives]"],
    "pirl_in1k_r50+sweep_permutations": ["experiment=[pirl_in1k_r50,sweep_permutations]"],
}


def cfg_job(overrides: list[str]) -> str:
    cmd = [sys.executable, "-m", "pirl_fast.train", *overrides, "--cfg", "job"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def printed() -> dict[str, str]:
    with ThreadPoolExecutor(3) as pool:  # each is a Python start-up importing torch: ~5 s
        return dict(zip(CASES, pool.map(cfg_job, CASES.values())))


@pytest.mark.parametrize("name", CASES)
def test_cfg_job_matches_the_golden_file(printed, name):
    golden = GOLDEN / f"{name}.yaml"
    assert printed[name] == golden.read_text(), (
        f"`python -m pirl_fast.train {' '.join(CASES[name])} --cfg job` differs from {golden}; "
        f"if the change is intended, regenerate the file with that command and review the diff")
