"""resume=auto continues only the same run: the run directory choice (pirl_fast/train/run_dirs.py) and the
trainer's use of it. Most checks call `choose` on real configs without training; two train for a step."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from pirl_fast.shard.cli import Options, run_shard
from pirl_fast.train import checkpoint, run_dirs
from pirl_fast.train.config import ConfigError, to_dataclass
from pirl_fast.train.loop import train

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=smoke", "trainer.progress=false", "data.workers=0", "data.backend=synthetic",
        "data.synthetic_samples=8", "data.image_size=32", "data.patch_crop_size=30", "data.patch_size=8",
        "data.batch_size=4", "bank.num_negatives=8", "trainer.max_steps=1"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def config(*overrides: str):
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        return to_dataclass(compose("config", overrides=[*TINY, *overrides]))


def choose(run_dir: Path, *overrides: str, default_dir: bool = True) -> run_dirs.RunChoice:
    cfg = config(f"run_dir={run_dir}", *overrides)
    return run_dirs.choose(cfg, run_dir, run_dirs.run_identity(cfg), default_dir)


def test_a_different_run_gets_the_next_directory_and_the_same_command_finds_its_own(tmp_path):
    runs = tmp_path / "runs" / "smoke"
    a = choose(runs)
    assert a.run_dir == runs and a.checkpoint is None and a.note is None
    b = choose(runs, "bank.num_negatives=4")
    assert b.run_dir == tmp_path / "runs" / "smoke-2" and b.checkpoint is None
    assert "bank.num_negatives: 8 -> 4" in b.note and str(runs) in b.note
    c = choose(runs, "loss.lam=0.25")
    assert c.run_dir == tmp_path / "runs" / "smoke-3"
    # The same commands again (a requeued job): each finds its own directory, in any order.
    assert choose(runs, "loss.lam=0.25").run_dir == c.run_dir
    assert choose(runs, "bank.num_negatives=4").run_dir == b.run_dir
    assert choose(runs).run_dir == runs
    # What may differ without making another run: the stopping point, logging, checkpoint cadence, workers.
    assert choose(runs, "trainer.max_steps=7", "trainer.log_every=3", "trainer.ckpt_every=2",
                  "data.workers=1", "trainer.progress=true").run_dir == runs
    assert sorted(p.name for p in runs.parent.iterdir()) == ["smoke", "smoke-2", "smoke-3"]


def test_an_explicit_directory_holding_another_run_is_refused_in_one_line(tmp_path):
    run = tmp_path / "mine"
    train(config(f"run_dir={run}"))  # a finished run with a checkpoint
    with pytest.raises(ConfigError) as refused:
        choose(run, "loss.temperature=0.2", default_dir=False)
    message = str(refused.value)
    assert "\n" not in message and str(run) in message and "loss.temperature: 0.07 -> 0.2" in message
    assert "hydra.run.dir=" in message and "delete" in message
    # The same run continues from its checkpoint; resume=none is still refused over checkpoints.
    same = choose(run, "trainer.max_steps=2", default_dir=False)
    assert same.run_dir == run and same.checkpoint == checkpoint.checkpoint_path(run, 1)
    with pytest.raises(ConfigError, match="resume=none but"):
        choose(run, "resume=none", default_dir=False)


def test_resume_none_in_the_default_series_starts_in_a_fresh_directory(tmp_path):
    runs = tmp_path / "smoke"
    choose(runs)
    fresh = choose(runs, "resume=none")
    assert fresh.run_dir == tmp_path / "smoke-2" and fresh.checkpoint is None
    assert "resume=none, and" in fresh.note and "holds this run already" in fresh.note


def test_the_data_is_identified_by_content_not_by_path(tmp_path, sample_image_dir):
    shards = tmp_path / "shards"
    run_shard(Options(src=str(sample_image_dir), dst=str(shards), samples_per_shard=20, max_side=96, seed=0))
    runs = tmp_path / "runs" / "smoke"
    first = choose(runs, "data.backend=torch", f"data.shards={shards}")
    assert first.run_dir == runs
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    assert choose(runs, "data.backend=torch", f"data.shards={moved}").run_dir == runs  # the same bytes elsewhere
    shutil.rmtree(shards)  # other images (another shuffle) at the same path: other data
    run_shard(Options(src=str(sample_image_dir), dst=str(shards), samples_per_shard=20, max_side=96, seed=1))
    other = choose(runs, "data.backend=torch", f"data.shards={shards}")
    assert other.run_dir == tmp_path / "runs" / "smoke-2" and "the data (" in other.note


def test_two_jobs_cannot_both_take_a_free_directory(tmp_path):
    identity = {"data": None, "settings": {"a": 1}}
    assert run_dirs.record(tmp_path / "d", identity, exclusive=True)
    assert not run_dirs.record(tmp_path / "d", {"data": None, "settings": {"a": 2}}, exclusive=True)
    assert json.loads((tmp_path / "d" / run_dirs.IDENTITY_NAME).read_text())["settings"] == {"a": 1}
    assert [p.name for p in (tmp_path / "d").iterdir()] == [run_dirs.IDENTITY_NAME]  # no temp file left


def test_a_run_from_before_run_json_is_identified_by_its_checkpoint(tmp_path):
    run = tmp_path / "smoke"
    train(config(f"run_dir={run}"))
    (run / run_dirs.IDENTITY_NAME).unlink()
    (run / "config.yaml").unlink()
    assert choose(run, "trainer.max_steps=2").checkpoint == checkpoint.checkpoint_path(run, 1)  # same: resumed
    assert (run / run_dirs.IDENTITY_NAME).is_file()  # and recorded from now on
    (run / run_dirs.IDENTITY_NAME).unlink()
    assert choose(run, "bank.momentum=0.9").run_dir == tmp_path / "smoke-2"


def test_a_config_key_added_since_the_run_started_does_not_make_another_run(tmp_path):
    runs = tmp_path / "smoke"
    choose(runs)
    recorded = json.loads((runs / run_dirs.IDENTITY_NAME).read_text())
    del recorded["settings"]["data.gray_p"]  # as if the run was started by code without that key
    (runs / run_dirs.IDENTITY_NAME).write_text(json.dumps(recorded))
    assert choose(runs).run_dir == runs


def test_the_issue_scenario_through_the_command_line(tmp_path, sample_shards):
    """Two different runs from the same default directory both succeed (the second in runs/smoke-2);
    naming that directory for a third, different run is a one-line refusal, exit 2."""
    env_cmd = [sys.executable, "-m", "pirl_fast.train", *TINY[:-1], "trainer.max_steps=1"]
    first = subprocess.run([*env_cmd, f"data.shards={sample_shards}", "data.backend=torch"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(env_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "run directory" in second.stdout and "runs/smoke-2" in second.stdout
    assert (tmp_path / "runs" / "smoke-2" / "checkpoints").is_dir()
    third = subprocess.run([*env_cmd, "loss.lam=0.25", "hydra.run.dir=runs/smoke"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert third.returncode == 2 and "Traceback" not in third.stderr
    (line,) = third.stderr.strip().splitlines()
    assert line.startswith("error: ") and "runs/smoke holds another run" in line and "loss.lam: 0.5 -> 0.25" in line


def test_auto_backend_matches_what_it_chose_on_any_machine():
    def diff(before: str, now: str) -> list[str]:
        return run_dirs.differences({"data": None, "settings": {"data.backend": before}},
                                    {"data": None, "settings": {"data.backend": now}})

    assert diff("dali", "auto") == diff("auto", "torch") == diff("auto", "auto") == []
    assert diff("dali", "torch") == ["data.backend: 'dali' -> 'torch'"]
    assert diff("synthetic", "auto") == ["data.backend: 'synthetic' -> 'auto'"]


def test_claiming_works_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError("this filesystem has no hard links")

    monkeypatch.setattr(run_dirs.os, "link", no_links)
    assert run_dirs.record(tmp_path / "d", {"data": None, "settings": {"a": 1}}, exclusive=True)
    assert not run_dirs.record(tmp_path / "d", {"data": None, "settings": {"a": 2}}, exclusive=True)
    assert json.loads((tmp_path / "d" / run_dirs.IDENTITY_NAME).read_text())["settings"] == {"a": 1}
