"""Where a new user meets a failure (issue 23): memory and disk checked up front, a misspelt key in one
line, a finished run left alone, advice that names the real problem, and where the outputs go.

Runs are the tiny synthetic ones of test_train.py (a few steps, one thread); shortfalls of memory and
disk are simulated (free memory and disk_usage patched, ENOSPC raised inside torch.save), never made.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from pirl_fast.data.loader_synthetic import SyntheticLoader
from pirl_fast.shard import cli as shard_cli
from pirl_fast.shard.format import ShardError, load_manifest
from pirl_fast.shard.splits import resolve_shards
from pirl_fast.train import checkpoint, cli_errors, preflight
from pirl_fast.train.config import ConfigError, to_dataclass
from pirl_fast.train.loop import USER_ERRORS, DiskFullError, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=smoke", "trainer.progress=false", "trainer.log_every=1", "data.workers=0",
        "data.image_size=32", "data.patch_crop_size=30", "data.patch_size=8", "data.batch_size=4",
        "bank.num_negatives=64", "data.backend=synthetic"]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
Usage = namedtuple("Usage", "total used free")

pytestmark = pytest.mark.usefixtures("one_thread")


def compose_cfg(*overrides: str):
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def config(run_dir: Path, *overrides: str):
    return compose_cfg(*TINY, f"run_dir={run_dir}", *overrides)


# ---------------------------------------------------------------------------------------------- memory
def test_the_imagenet_recipe_on_a_small_cpu_machine_is_refused_naming_what_fits():
    """The sharder's old advice (no experiment: ResNet-50, batch 256) on a 24 GB CPU machine was killed by
    the kernel after two minutes; now it is one line naming the estimate, the free memory and smoke."""
    cfg = to_dataclass(compose_cfg("data.shards=x"))
    with pytest.raises(ConfigError) as e:
        preflight.check_memory(cfg, torch.device("cpu"), 1_281_167, 1, free=20 << 30)
    line = str(e.value)
    assert "\n" not in line and "needs about" in line and "20.0 GB free" in line and "experiment=smoke" in line
    assert "trainer.force=true" in line
    estimate = preflight.estimate_memory(cfg, torch.device("cpu"), 1_281_167, 1)
    assert estimate.total > 24 << 30  # the run that was killed at 22 GB cannot pass on such a machine
    forced = to_dataclass(compose_cfg("data.shards=x", "trainer.force=true"))
    preflight.check_memory(forced, torch.device("cpu"), 1_281_167, 1, free=20 << 30)  # no refusal
    smoke = to_dataclass(compose_cfg("experiment=smoke", "data.shards=x"))
    preflight.check_memory(smoke, torch.device("cpu"), 320, 1, free=4 << 30)  # the smoke run fits in 4 GB


def test_the_memory_estimate_counts_activations_by_batch():
    """Activations grow linearly with the per-rank batch; ranks on one CPU node share its memory."""
    cfg = to_dataclass(compose_cfg("experiment=smoke", "data.shards=x"))
    one = preflight.estimate_memory(cfg, torch.device("cpu"), 320, 1)
    cfg.data.batch_size = 64
    two = preflight.estimate_memory(cfg, torch.device("cpu"), 320, 1)
    assert two.parts["activations"] > 1.9 * one.parts["activations"]
    assert two.parts["model"] == one.parts["model"]


def test_a_refused_run_takes_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "free_memory", lambda device: 1 << 20)
    with pytest.raises(ConfigError, match=r"needs about .* but this machine's memory has 0.0 GB free"):
        train(config(tmp_path / "run", "trainer.max_steps=1"))
    assert not (tmp_path / "run").exists()


def test_the_sharders_next_line_fits_a_machine_without_gpu(monkeypatch, sample_image_dir, tmp_path, capsys):
    monkeypatch.setattr(shard_cli, "gpu_visible", lambda: False)
    shutil.copytree(sample_image_dir, tmp_path / "images" / "train")  # a dataset root: the sharder's next line
    assert shard_cli.main([str(tmp_path / "images"), str(tmp_path / "shards"), "--workers", "1"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("next:")]
    assert line.startswith(f"next: python -m pirl_fast.train experiment=smoke data.shards={tmp_path / 'shards'}")


# ---------------------------------------------------------------------------------------------- disk
def test_a_disk_too_small_for_the_checkpoints_is_refused_before_step_1(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: Usage(10 << 30, 10 << 30, 3 << 20))
    with pytest.raises(ConfigError) as e:
        train(config(tmp_path, "trainer.max_steps=2"))
    assert "\n" not in str(e.value) and "no space for this run's checkpoints" in str(e.value)
    assert "3.0 MB free" in str(e.value) and "trainer.keep_checkpoints" in str(e.value)
    assert not (tmp_path / "metrics.jsonl").exists() and not checkpoint.list_checkpoints(tmp_path)


def test_a_disk_that_fills_later_stops_keeping_the_newest_valid_checkpoint(tmp_path, monkeypatch):
    """ENOSPC in the middle of the second checkpoint's write (as a full disk raises it): one line, the run
    stops, the first checkpoint stays and loads, no temp file is left."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\0" * 4096)  # part of the file made it to the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DiskFullError) as e:
        train(config(tmp_path, "trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.keep_checkpoints=3"))
    message = str(e.value)
    assert isinstance(e.value, USER_ERRORS) and "\n" not in message
    assert "no space left on device while writing step_000000004.pt" in message and "stopped at step 4" in message
    assert "step_000000002.pt (step 2)" in message
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000000002.pt"]
    assert checkpoint.load(checkpoint.checkpoint_path(tmp_path, 2))["step"] == 2
    assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()) == ["step_000000002.pt"]


# ---------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("override, words", [
    ("trainer.max_step=20", ["trainer.max_step is not a config key", "did you mean trainer.max_steps?"]),
    ("model=resnet5", ["model=resnet5 is not an option of the model group", "resnet18, resnet50",
                       "did you mean model=resnet50?"]),
])
def test_a_bad_override_is_one_line_and_exit_2(tmp_path, override, words):
    proc = subprocess.run([sys.executable, "-m", "pirl_fast.train", override, "data.backend=synthetic"],
                          cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "Warning" not in x and "warnings.warn" not in x]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, words", [
    ("optim.lr=fast", ["optim.lr: Value 'fast'", "Float"]),
    ("experiment=smok", ["experiment=smok is not an option", "did you mean experiment=smoke?"]),
    ("data.batchsize=8", ["did you mean data.batch_size?"]),
    ("trainer.max_steps=[1", ["bad command line"]),
])
def test_every_composition_error_reads_as_one_line(override, words):
    with pytest.raises(Exception) as e:
        compose_cfg(override)
    line = cli_errors.one_line(e.value)
    assert "\n" not in line and all(w in line for w in words), line


# ---------------------------------------------------------------------------------------------- a finished run
def test_a_finished_run_stays_finished(tmp_path, capsys):
    first = train(config(tmp_path, "trainer.max_steps=2"))
    files = {name: (tmp_path / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "config.yaml")}
    tb = sorted(p.name for p in (tmp_path / "tb").iterdir())
    capsys.readouterr()
    again = train(config(tmp_path, "trainer.max_steps=2", "trainer.log_every=2"))
    out = capsys.readouterr().out
    assert "has run all 2 steps this config asks for: nothing to do" in out
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == tb
    assert again == json.loads(files["summary.json"]) and again["samples_per_s"] == first["samples_per_s"] > 0


def test_a_finished_run_on_a_full_disk_is_still_finished(tmp_path, monkeypatch, capsys):
    """Nothing will be written, so the disk check does not refuse it; and the epoch it stopped in (step 3 of
    8 per epoch) is not read again to reach a position that is never trained from."""
    train(config(tmp_path, "trainer.max_steps=3", "data.synthetic_samples=32"))
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: Usage(10 << 30, 10 << 30, 3 << 20))
    batches = []
    real_iter = SyntheticLoader.__iter__
    monkeypatch.setattr(SyntheticLoader, "__iter__", lambda self: (batches.append(1), real_iter(self))[1])
    capsys.readouterr()
    train(config(tmp_path, "trainer.max_steps=3", "data.synthetic_samples=32"))
    assert "has run all 3 steps this config asks for: nothing to do" in capsys.readouterr().out
    assert batches == []


# ---------------------------------------------------------------------------------------------- advice
def test_an_image_folder_given_as_shards_says_so_with_the_shard_command(sample_image_dir, tmp_path):
    images = tmp_path / "demo" / "images"
    shutil.copytree(sample_image_dir, images / "train")
    with pytest.raises(ShardError) as e:
        resolve_shards(images)
    assert "holds images, not shards" in str(e.value) and "--resume" not in str(e.value)
    assert f"python -m pirl_fast.shard {images} {tmp_path / 'demo' / 'shards'}" in str(e.value)
    with pytest.raises(ShardError, match=f"python -m pirl_fast.shard {images} "):
        load_manifest(resolve_shards(images / "train").dir)  # its split folder: shard the root


def test_a_missing_shard_folder_offers_the_nearest_one(sample_shards):
    with pytest.raises(ShardError) as e:
        load_manifest(sample_shards.parent / "shard")
    assert f"did you mean {sample_shards}?" in str(e.value) and "--resume" not in str(e.value)


def test_a_batch_below_1_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batch_size=0 is below 1"):
        train(config(tmp_path, "data.batch_size=0"))


# ---------------------------------------------------------------------------------------------- where outputs go
def test_the_run_folder_and_why_come_first(tmp_path, capsys):
    train(config(tmp_path / "run", "trainer.max_steps=1"))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"run directory {tmp_path / 'run'}: a new run"
    train(config(tmp_path / "run", "trainer.max_steps=2"))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"run directory {tmp_path / 'run'}: continuing the run it holds (same data and settings) from "
                      f"{checkpoint.checkpoint_path(tmp_path / 'run', 1)}")


def test_resume_notices_are_one_plain_line_and_only_when_batches_were_replayed(tmp_path):
    """data.backend=dali resumed at an epoch boundary loses nothing: no notice. Mid-epoch: one line."""
    import warnings

    line = cli_errors.plain_warning("resuming x with a different config: a: 1 -> 2; b: 3 -> 4", RuntimeWarning,
                                    str(REPO / "pirl_fast" / "train" / "loop.py"), 1)
    assert line == "warning: resuming x with a different config: a: 1 -> 2; b: 3 -> 4\n"
    from pirl_fast.train import loop

    class Loader:
        num_samples = 8

    run = type("R", (), {})()
    run.cfg = to_dataclass(compose_cfg(*TINY, "data.backend=dali", "data.shards=x"))
    run.rank, run.epoch, run.batches_in_epoch, run.loader = 0, 1, 0, Loader()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop.data_stream_notice(run)
        assert not caught
        run.batches_in_epoch = 3
        loop.data_stream_notice(run)
    (w,) = caught
    assert "after the 3 batches it had consumed" in str(w.message) and "\n" not in str(w.message)
