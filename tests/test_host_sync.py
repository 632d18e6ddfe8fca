"""No hidden host-device syncs in the training step (issue 12, section 1).

On the CPU nothing waits, so the syncs a CUDA step would make are found by their causes instead:
every deliberate device read goes through pirl_fast.runtime.host_read.read (counted: exactly one per
step, the finite-loss check), torch.cuda.synchronize is never called, and no other host read
happens inside the step: a dispatch mode catches .item()/float()/bool() of a tensor
(aten._local_scalar_dense) and tensors built from host data (aten.lift_fresh: on CUDA a blocking
host-to-device copy), and Tensor.tolist/.numpy are spied on. The one exception is a branch that
runs only for CPU tensors: bank_kernels.check_index reads on the CPU, and asserts on the device
(torch._assert_async, no sync) on CUDA.

With CUDA, the same steps run under torch.cuda.set_sync_debug_mode("error"), which raises at any
synchronising CUDA call except inside host_read.read.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.utils._python_dispatch import TorchDispatchMode

from pirl_fast.runtime import host_read
from pirl_fast.train import loop as train_module
from pirl_fast.train.metrics import StepClock

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["experiment=smoke", "trainer.progress=false", "data.workers=0", "data.image_size=32",
        "data.patch_crop_size=30", "data.patch_size=8", "data.batch_size=4", "bank.num_negatives=64",
        "trainer.ckpt_every=0", "trainer.ckpt_epoch_end=false", "resume=none"]
HOST_OPS = {"aten._local_scalar_dense.default", "aten.lift_fresh.default"}
CPU_ONLY_READS = {("bank_kernels.py", "check_index")}  # (file, function) whose CUDA branch does not sync


def config(run_dir: Path, *overrides: str):
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        return compose("config", overrides=[*TINY, f"run_dir={run_dir}", *overrides])


def where() -> str | None:
    """The innermost project frame of the current stack, or None when a CPU-only read is on the stack."""
    frames = traceback.extract_stack()[:-2]
    if any((Path(f.filename).name, f.name) in CPU_ONLY_READS for f in frames):
        return None
    ours = [f for f in frames if "pirl_fast" in f.filename and "test_host_sync" not in f.filename]
    return f"{ours[-1].filename}:{ours[-1].lineno} {ours[-1].line}" if ours else "outside the package"


class HostReads(TorchDispatchMode):
    """Records host reads (outside host_read.read) made by tensor operators inside the block."""

    def __init__(self, state: dict):
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_OPS and not self.state["in_read"]:
            place = where()
            if place is not None:
                self.state["stray"].append(f"{func} at {place}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def spies(monkeypatch):
    """Counts host_read.read calls per train_step, torch.cuda.synchronize calls, and stray host reads."""
    state = {"reads": [], "syncs": [], "stray": [], "in_read": False, "in_step": False}
    real_read, real_step = host_read.read, train_module.train_step

    def read(tensor):
        if state["in_step"]:
            state["reads"][-1] += 1
        state["in_read"] = True
        try:
            return real_read(tensor)
        finally:
            state["in_read"] = False

    def step(run, batch):
        state["reads"].append(0)
        state["in_step"] = True
        try:
            with HostReads(state):
                return real_step(run, batch)
        finally:
            state["in_step"] = False

    def method_spy(name):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, **kwargs):
            if state["in_step"] and not state["in_read"]:
                place = where()
                if place is not None:
                    state["stray"].append(f"Tensor.{name} at {place}")
            return real(self, *args, **kwargs)
        return spy

    monkeypatch.setattr(host_read, "read", read)
    monkeypatch.setattr(train_module, "train_step", step)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: state["syncs"].append(
        "".join(traceback.format_stack(limit=6))))
    for name in ("tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, method_spy(name))
    return state


@pytest.mark.parametrize("backend", ["synthetic", "dali"])
def test_a_training_step_reads_the_device_once_and_never_synchronises(tmp_path, spies, backend, sample_shards):
    """Three steps (the first estimates Z, the last ends the run and checkpoints): one host read each,
    no synchronize anywhere in the run (data, step, logging, checkpoint), no stray host read in a step."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    summary = train_module.train(config(tmp_path, f"data.backend={backend}", f"data.shards={sample_shards}",
                                        "data.workers=1", "trainer.max_steps=3", "trainer.log_every=2"))
    assert summary["step"] == 3
    assert spies["reads"] == [1, 1, 1], spies["reads"]
    assert spies["syncs"] == [], "torch.cuda.synchronize was called:\n" + "\n".join(spies["syncs"])
    assert spies["stray"] == [], "host reads in the step outside host_read.read:\n" + "\n".join(spies["stray"])


def test_the_spy_catches_a_stray_read(tmp_path, spies, monkeypatch):
    """The negative case: an .item() slipped into the loss is reported with its place."""
    from pirl_fast.model.loss import PIRLCriterion

    real = PIRLCriterion.forward

    def with_item(self, f, g, index, bank):
        terms = real(self, f, g, index, bank)
        terms.total.item()  # a sync on CUDA
        return terms

    monkeypatch.setattr(PIRLCriterion, "forward", with_item)
    train_module.train(config(tmp_path, "data.backend=synthetic", "trainer.max_steps=1"))
    assert spies["reads"] == [1]
    assert len(spies["stray"]) == 1 and "_local_scalar_dense" in spies["stray"][0]


def test_device_values_builds_numbers_without_a_copy():
    """Numbers -> device tensor by fills: no tensor is made from host data (aten.lift_fresh), which on
    CUDA would be a pageable host-to-device copy; the values are exact."""
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops():
        out = host_read.device_values([0, 3, 0.0, 1.0], torch.device("cpu"))
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 3.0, 0.0, 1.0]
    assert "aten.lift_fresh.default" not in seen and "aten._to_copy.default" not in seen
    assert seen.count("aten.fill_.Scalar") == 2  # the zeros stay zeros: no work for them
    assert host_read.read(torch.tensor(2.5)) == 2.5 and host_read.read(torch.arange(3)) == [0, 1, 2]


def test_sync_timing_is_off_by_default_and_cpu_phases_are_host_time(tmp_path):
    cfg = config(tmp_path)
    assert cfg.trainer.sync_timing is False
    clock = StepClock(torch.device("cpu"), sync=True, warmup_steps=0)  # sync means nothing on the CPU
    assert not clock.sync and not clock.events
    with clock.phase("compute"):
        torch.ones(64, 64) @ torch.ones(64, 64)
    clock.end_step(4)
    summary = clock.summary()
    assert summary["time_s"]["compute"] > 0 and summary["samples_timed"] == 4


# ---------------------------------------------------------------------------------------------- CUDA
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["pirl", "jigsaw"])
def test_cuda_steps_make_no_sync_but_the_finite_check(tmp_path, method):
    """Steps under set_sync_debug_mode("error"): any synchronising call other than host_read.read raises."""
    extra = ["data.num_permutations=10"] if method == "jigsaw" else []
    run, _ = train_module.run_training(config(tmp_path, "data.backend=synthetic", "trainer.device=cuda",
                                              f"method={method}", "trainer.max_steps=2", *extra))
    batch = next(iter(run.loader))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            train_module.train_step(run, batch)
            run.step += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@needs_cuda
def test_dali_gpu_batches_arrive_without_a_sync(sample_shards):
    """The DALI GPU loader's batches (pipe.run on torch's stream, DLPack hand-over, index and label
    already on the GPU) are fetched under set_sync_debug_mode("error")."""
    pytest.importorskip("nvidia.dali")
    from pirl_fast.data.config import DataConfig
    from pirl_fast.data.loaders import build_loader

    loader = build_loader(DataConfig(shards=str(sample_shards), backend="dali", batch_size=8, workers=2),
                          device="cuda")
    batches = iter(loader)
    next(batches)  # start-up (allocations) outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = next(batches)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert batch.index.is_cuda and batch.label.is_cuda and batch.images.is_cuda


@pytest.mark.gpu
@needs_cuda
def test_cuda_phases_are_timed_by_events_without_waiting(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(1))
    clock = StepClock(torch.device("cuda"), sync=False, warmup_steps=1)
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(3):
        with clock.phase("compute"):
            for _ in range(10):
                x = torch.tanh(x @ x)
        with clock.phase("bank"):
            x.add_(1)
        clock.end_step(8)
    summary = clock.summary()  # waits for the last events: after training, once
    assert calls == [] and clock.events
    assert summary["time_s"]["compute"] > summary["time_s"]["bank"] > 0
    assert summary["steps_timed"] == 2
