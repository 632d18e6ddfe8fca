"""The trainer end to end on the CPU: smoke run, resume, SIGTERM, errors, two-process DDP.

Runs use experiment=smoke shrunk further (32 px images, 8 px patches, batch 4, K=64) and one
thread per process: on a 2-core machine shared with other jobs, more threads are slower.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from pirl_fast.model import bank_kernels
from pirl_fast.model.loss import PIRLCriterion
from pirl_fast.model.memory_bank import BankConfig, MemoryBank
from pirl_fast.runtime import dist
from pirl_fast.shard.format import ShardError
from pirl_fast.train import checkpoint
from pirl_fast.train.config import ConfigError
from pirl_fast.train.loop import NonFiniteLossError, run_training, train

REPO = Path(__file__).resolve().parents[1]
# loss=nce: the paper's loss, with the frozen normalisers Z that checkpoints must carry (smoke uses infonce).
TINY = ["experiment=smoke", "trainer.progress=false", "trainer.log_every=1", "data.workers=0", "loss=nce",
        "data.image_size=32", "data.patch_crop_size=30", "data.patch_size=8", "data.batch_size=4",
        "bank.num_negatives=64"]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def config(run_dir: Path, *overrides: str):
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        return compose("config", overrides=[*TINY, f"run_dir={run_dir}", *overrides])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_step_smoke_run_on_sample_shards(tmp_path, sample_shards, capsys):
    """The real smoke experiment (its own sizes, batch, loss, and the main data path: DALI's CPU graph)
    on real shards, logging every step: without a bar (trainer.progress=false), a line per interval."""
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", f"data.shards={sample_shards}", "trainer.log_every=1",
                                           "trainer.max_steps=2", "trainer.progress=false", f"run_dir={tmp_path}"])
    summary = train(cfg)
    assert summary["backend"] == "dali" and summary["global_batch"] == 32
    out = capsys.readouterr().out
    assert "step 1/2  loss " in out and "step 2/2  loss " in out and "data.backend=dali (its CPU graph)" in out
    lines = read_metrics(tmp_path)
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert all(math.isfinite(line[k]) for k in ("loss", "loss_jigsaw", "loss_image", "lr"))
        assert line["samples_per_s"] > 0 and 0 <= line["data_wait_share"] <= 1 and line["gpu_mem_gb"] == 0.0
    assert summary["stopped_by"] == "max_steps" and summary["step"] == 2
    assert set(summary["time_s"]) == {"data", "compute", "bank", "checkpoint", "other"}
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 2
    assert "name: smoke" in (tmp_path / "config.yaml").read_text()
    assert "backend: dali" in (tmp_path / "config.yaml").read_text()  # what ran (auto chose it)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    state = checkpoint.load(checkpoint.checkpoint_path(tmp_path, 2))  # weights_only=True inside
    assert state["bank"]["bank"].shape == (48, 128)  # one row per sample in the shard manifest
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000000002.pt"]  # smoke: at the end only


def trained_state(run) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in run.module.state_dict().items()}
    state["bank"] = run.bank.bank
    state.update({f"z.{k}": v for k, v in run.criterion.state_dict().items() if torch.is_tensor(v)})
    for i, p in enumerate(run.module.parameters()):
        state[f"momentum.{i}"] = run.optimizer.state[p]["momentum_buffer"]
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.mark.parametrize("backend", ["synthetic", "torch", "torch-2-workers"])
def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, backend, request):
    """4 steps straight == 3 steps, stop, resume, 1 step. The exact cases (pirl_fast/train/loop.py):
    synthetic: 8 samples / batch 4 = 2 steps per epoch, so the checkpoint at step 3 sits mid-way
    through epoch 1 and resuming must skip a batch and restore the RNG streams, not restart them.
    torch on the 48 sample shards, mid-way through epoch 0: with data.workers=0 augmentations are
    drawn from the restored global torch RNG; with 2 workers each worker reseeds from
    (seed, epoch, rank, worker) at the epoch start and the skipped batches are read again."""
    if backend == "synthetic":
        common = ["data.backend=synthetic", "data.synthetic_samples=8", "trainer.epochs=2"]
        position = (3, 1, 1)
    else:
        common = ["data.backend=torch", f"data.shards={request.getfixturevalue('sample_shards')}", "trainer.epochs=1"]
        if backend == "torch-2-workers":
            common.append("data.workers=2")
        position = (3, 0, 3)
    common.append("trainer.ckpt_every=0")
    straight, _ = run_training(config(tmp_path / "a", *common, "trainer.max_steps=4"))
    first, s1 = run_training(config(tmp_path / "b", *common, "trainer.max_steps=3"))
    after_three = trained_state(first)
    resumed, s2 = run_training(config(tmp_path / "b", *common, "trainer.max_steps=4"))
    assert (s1["step"], s1["epoch"], s1["batches_in_epoch"]) == position
    assert s2["step"] == 4
    a, b = trained_state(straight), trained_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    moved = [k for k in a if k.startswith("model.") and a[k].is_floating_point()
             and not torch.equal(a[k], after_three[k])]
    assert moved, "step 4 changed nothing: the comparison above would prove nothing"
    lines = read_metrics(tmp_path / "b")
    assert [line["step"] for line in lines] == [1, 2, 3, 4]  # appended on resume
    assert [line["lr"] for line in lines] == pytest.approx([line["lr"] for line in read_metrics(tmp_path / "a")])


def flat_tensors(tree, prefix=""):
    """name -> tensor for every floating tensor in a nested state dict (checkpoint parts)."""
    if torch.is_tensor(tree):
        return {prefix: tree} if tree.is_floating_point() else {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, sub in items for k, v in flat_tensors(sub, f"{prefix}.{key}").items()}


@pytest.mark.parametrize("kind", ["nce", "infonce"])
def test_fused_bank_loss_trains_like_the_naive_reference(tmp_path, kind):
    """bank.kernel=torch and =triton (the fused one-pass loss; Triton interpreted on CPU) against =naive
    (gather + autograd), 3 steps: the same losses at every step, and after step 1 the same weights,
    momentum (the gradient), bank and Z, to fp32 rounding. Only step 1's state is compared tightly:
    the paths sum in different orders, and this batch-4 network multiplies a difference by ~100 per
    step (measured: relative 2e-6 after step 1, 1e-4 after step 2), so later weights would test the
    network's sensitivity, not the loss. On the CPU everywhere (fp32, deterministic); Triton only
    where this session interprets it (tests/conftest.py): compiled, it needs CUDA tensors, and the
    gpu-marked kernel tests cover it."""
    # The paper's LR scaling (0.12 per 1024: 0.00047 at batch 4), at which the figures above were measured;
    # smoke's 0.03 per 32 is 8x that, and the summation-order difference grows with it (step 3 missed rel 1e-5).
    common = ["data.backend=synthetic", "trainer.max_steps=3", "trainer.ckpt_every=1", "trainer.keep_checkpoints=3",
              f"loss.kind={kind}", "trainer.device=cpu", "optim.lr=0.12", "optim.reference_batch=1024"]
    kernels = ("naive", "torch", "triton") if bank_kernels.interpreted() else ("naive", "torch")
    states = {}
    for kernel in kernels:
        train(config(tmp_path / kernel, *common, f"bank.kernel={kernel}"))
        saved = checkpoint.load(checkpoint.checkpoint_path(tmp_path / kernel, 1))
        states[kernel] = flat_tensors({k: saved[k] for k in ("model", "optimizer", "bank", "criterion")})
    naive = states["naive"]
    assert any(k.startswith(".optimizer") for k in naive) and any(k.startswith(".bank") for k in naive)
    for kernel in kernels[1:]:
        lines = read_metrics(tmp_path / kernel)
        assert [line["step"] for line in lines] == [1, 2, 3]
        for key in ("loss", "loss_jigsaw", "loss_image"):
            ours, reference = [line[key] for line in lines], [x[key] for x in read_metrics(tmp_path / "naive")]
            assert ours[:2] == pytest.approx(reference[:2], rel=1e-5), f"{kernel} {key}"
            # step 3 runs on weights already 1e-4 apart (above); measured 1.2e-5 with plain NCHW on the CPU
            assert ours[2] == pytest.approx(reference[2], rel=1e-4), f"{kernel} {key}"
        assert states[kernel].keys() == naive.keys()
        for key, ref in naive.items():
            got = states[kernel][key]
            if kind == "infonce" and key.startswith(".criterion"):
                assert torch.isnan(got).all() and torch.isnan(ref).all()  # no Z for infonce
                continue
            err = (got.double() - ref.double()).norm().item()
            assert err <= 1e-5 * ref.double().norm().item() + 1e-12, f"{kernel} {key}: relative error {err:.3g}"


def test_sigterm_mid_run_leaves_a_checkpoint_that_resumes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pirl_fast.train", *TINY, "data.backend=synthetic", f"hydra.run.dir={run_dir}",
           "trainer.max_steps=500", "trainer.ckpt_every=0", "trainer.ckpt_epoch_end=false"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 180
        while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text()):
            assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no step was logged within 180 s"
            time.sleep(0.2)
        assert not checkpoint.list_checkpoints(run_dir)  # ckpt_every=0: only the signal can write one
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM received" in output
    (path,) = checkpoint.list_checkpoints(run_dir)
    step = checkpoint.load(path)["step"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] == step >= 1
    summary = train(config(run_dir, "data.backend=synthetic", f"trainer.max_steps={step + 1}"))
    assert summary["step"] == step + 1 and summary["stopped_by"] == "max_steps"
    assert read_metrics(run_dir)[-1]["step"] == step + 1


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    train(config(tmp_path, "data.backend=synthetic", "trainer.max_steps=1"))
    good = checkpoint.checkpoint_path(tmp_path, 1).read_bytes()
    calls = []
    real_forward = PIRLCriterion.forward

    def nan_on_second_call(self, *args):  # the resumed run's 2nd step (global step 3) goes NaN
        terms = real_forward(self, *args)
        calls.append(1)
        if len(calls) == 2:
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(PIRLCriterion, "forward", nan_on_second_call)
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 3 .*step_000000001.pt \(step 1\)"):
        train(config(tmp_path, "data.backend=synthetic", "trainer.max_steps=5", "trainer.ckpt_every=0"))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000000001.pt"]
    assert checkpoint.checkpoint_path(tmp_path, 1).read_bytes() == good
    assert [line["step"] for line in read_metrics(tmp_path)] == [1, 2]  # step 2 was logged, step 3 never


def test_missing_shards_fail_before_training(tmp_path):
    with pytest.raises(ShardError, match="pirl_fast.shard"):
        train(config(tmp_path / "run", f"data.shards={tmp_path / 'no_such_dir'}"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bank_size_disagreeing_with_the_manifest_fails_before_training(tmp_path, sample_shards):
    with pytest.raises(ConfigError, match=r"num_samples=50 but the shards .* hold 48 samples"):
        train(config(tmp_path, f"data.shards={sample_shards}", "data.backend=torch", "num_samples=50"))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resuming_another_runs_checkpoint_warns_about_the_settings_that_differ(tmp_path):
    """resume=PATH with other settings: the changed ones are named (a wrong lr would be silent otherwise);
    the harmless ones (max_steps, log_every) and the run's name and place are not."""
    train(config(tmp_path / "a", "data.backend=synthetic", "trainer.max_steps=1"))
    with pytest.warns(RuntimeWarning, match="different config") as record:
        train(config(tmp_path / "b", "data.backend=synthetic", "trainer.max_steps=2", "trainer.log_every=2",
                     "optim.lr=0.5", f"resume={checkpoint.checkpoint_path(tmp_path / 'a', 1)}"))
    (message,) = [str(w.message) for w in record if "different config" in str(w.message)]
    (changed,) = message.split("different config: ")[1:]  # one line: `key: old -> new; ...`
    assert changed.startswith("optim.lr: ") and changed.endswith(" -> 0.5") and "\n" not in message, message


def test_pick_device_names_the_setting_when_cuda_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.pick_device("auto", 3) == dist.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="trainer.device=cuda but CUDA is not available"):
        dist.pick_device("cuda", 0, "trainer.device", ConfigError)
    with pytest.raises(ValueError, match="--device=cuda:1 but CUDA"):
        dist.pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dist.pick_device("auto", 3) == dist.pick_device("cuda", 3) == torch.device("cuda", 3)  # this rank's GPU
    assert dist.pick_device("cuda:1", 3) == torch.device("cuda", 1)


def test_resume_none_refuses_to_overwrite_a_run(tmp_path):
    train(config(tmp_path, "data.backend=synthetic", "trainer.max_steps=1"))
    with pytest.raises(ConfigError, match="resume=auto"):
        train(config(tmp_path, "data.backend=synthetic", "trainer.max_steps=2", "resume=none"))


def test_two_process_torchrun_keeps_ranks_identical(tmp_path):
    """gloo, 2 ranks x 2 samples, 2 steps: DDP's averaged gradients and the all-gathered bank
    update must leave both ranks with the same parameters, momentum, bank and Z."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "train_ddp_worker.py"),
           str(out), *TINY, "data.backend=synthetic", "data.synthetic_samples=32", "trainer.max_steps=2",
           f"run_dir={run_dir}"]
    result = subprocess.run(cmd, cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["summary"]["world_size"] == 2 and r0["summary"]["step"] == 2
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    for m0, m1 in zip(r0["momentum"], r1["momentum"]):
        assert torch.equal(m0, m1)
    assert torch.equal(r0["bank"], r1["bank"])
    assert torch.equal(r0["z"]["z_jigsaw"], r1["z"]["z_jigsaw"]) and torch.equal(r0["z"]["z_image"], r1["z"]["z_image"])
    # The bank took both ranks' samples: 2 steps x 4 global = rows 0-7 moved, the rest did not.
    initial = MemoryBank(32, 128, BankConfig(seed=0)).bank
    changed = (r0["bank"] != initial).any(dim=1)
    assert changed[:8].all() and not changed[8:].any()
    # What the worker dumped is what was trained: rank 0's checkpoint holds the same weights.
    saved = checkpoint.load(checkpoint.checkpoint_path(run_dir, 2))
    for name, value in r0["params"].items():
        assert torch.equal(saved["model"][name], value), name
    assert len(saved["rng"]) == 2  # each rank's RNG streams
