"""`python -m pirl_fast.bench step` on the CPU at toy sizes: the bank is sized by --bank-rows and its
share of the step is reported (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from pirl_fast.bench import step
from pirl_fast.bench.__main__ import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TOY = ["--backends", "synthetic", "--steps", "1", "--warmup", "1", "--batch", "4", "--images", "8",
       "--data", "image_size=32", "patch_crop_size=30", "patch_size=8"]


def test_step_bench_pays_a_bank_of_bank_rows_and_reports_its_share(tmp_path, monkeypatch):
    seen = {}
    from pirl_fast.train import loop as train  # measure imports run_training from here when it runs

    original = train.run_training

    def spy(cfg, bank_rows=0):
        run, summary = original(cfg, bank_rows=bank_rows)
        seen.update(rows=run.bank.num_samples, sync=cfg.trainer.sync_timing, output_dtype=cfg.data.output_dtype)
        return run, summary

    monkeypatch.setattr(train, "run_training", spy)
    out = tmp_path / "step.json"
    assert main(["step", *TOY, "--bank-rows", "3000", "--bank-repeats", "1", "--json", str(out)]) == 0
    assert seen == {"rows": 3000, "sync": False, "output_dtype": "float32"}
    row, = json.loads(out.read_text())["results"]["step"]
    assert row["bank_rows"] == 3000 and row["bank_ms"] > 0 and 0 < row["bank_share"]
    assert 0 <= row["bank_update_share"] <= 1 and row["vs_synthetic"] == 1.0


def test_step_bench_defaults_and_bad_bank_rows():
    args = build_parser().parse_args(["step"])
    assert args.bank_rows == (step.IMAGENET_ROWS if step.torch.cuda.is_available() else step.CPU_BANK_ROWS)
    assert step.IMAGENET_ROWS == 1_281_167
    with pytest.raises(SystemExit, match="--bank-rows 4 is below the 8 images"):
        step.run(build_parser().parse_args(["step", *TOY, "--bank-rows", "4"]))
    with pytest.raises(SystemExit, match="must be >= 0"):
        step.run(build_parser().parse_args(["step", *TOY, "--bank-rows", "-1"]))
