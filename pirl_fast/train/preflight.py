"""Checks before anything is built: does the run fit this machine's memory and its run folder's disk?

`check_memory` estimates one run's peak memory per node and refuses, in one line, a run that cannot
fit (naming the estimate, the free memory and what fits), unless trainer.force=true:

    model      parameters, gradients and SGD momentum (fp32), 3 x 4 bytes per parameter
    activations  what autograd keeps for backward: the output of every leaf module (conv, BN, ReLU,
               linear, ...; in-place ones add nothing) in one forward of this rank's batch (images
               and patches), counted by a forward on PyTorch's meta device (shapes only, no
               memory), at 2 bytes under bf16 autocast and 4 in fp32, plus the input batch itself
    bank       rows x embed_dim at bank.dtype, and the NCE normalisers
    loader     data.prefetch batches of decoded images and patches (fp32 on the CPU)
    runtime    CPU: a fixed RUNTIME_BYTES for the interpreter, PyTorch and the data library
               (measured: README.md, "Fails well"); CUDA: the CUDA context is not in mem_get_info's free

Free memory: on CUDA, torch.cuda.mem_get_info of this rank's GPU against one rank's estimate; on the
CPU, /proc/meminfo's MemAvailable (lowered to the cgroup's memory.max headroom, where there is one)
against the estimate times the ranks torchrun started on this node (LOCAL_WORLD_SIZE).

`check_disk` compares the run folder's free space with the checkpoints the run will hold at once:
min(trainer.keep_checkpoints + 1, saves it will make) of them (a save writes the new file before the
oldest is pruned), less the space its own checkpoints there already take. A disk that fills later
is loop.py's `save_checkpoint`: it stops with the newest valid checkpoint kept.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pirl_fast.model.jigsaw import JigsawModel
from pirl_fast.model.memory_bank import DTYPES
from pirl_fast.model.network import PIRLModel
from pirl_fast.model.supervised import SupervisedModel
from pirl_fast.runtime.atomic import MB
from pirl_fast.train import checkpoint
from pirl_fast.train.config import Config, ConfigError

GB = 1 << 30
# Resident memory of a CPU training process before its model and data: Python, PyTorch, DALI or torchvision.
# Measured with the smoke experiment on the CPU: README.md, "Fails well".
RUNTIME_BYTES = 950 * MB
FORCE = "trainer.force=true"


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]  # bytes per process, by what holds them
    processes: int  # ranks sharing the memory compared against (per node on the CPU, 1 on a GPU)

    @property
    def total(self) -> int:
        return sum(self.parts.values()) * self.processes


def build_meta_model(cfg: Config) -> nn.Module:
    """The configured network on the meta device: shapes and parameter counts, no memory."""
    with torch.device("meta"):
        if cfg.method == "jigsaw":
            return JigsawModel(cfg.model, cfg.data.num_permutations)
        if cfg.method == "supervised":
            return SupervisedModel(cfg.model, max(2, cfg.model.num_classes))
        return PIRLModel(cfg.model)


def activation_bytes(model: nn.Module, cfg: Config, per_rank: int, element: int) -> int:
    """Bytes autograd keeps for backward in one forward of `per_rank` samples (see the module doc)."""
    total = 0

    def count(module: nn.Module, inputs, output) -> None:
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if torch.is_tensor(t):
                total += t.numel() * element

    # In-place and pass-through modules (ReLU(inplace=True), Identity, Flatten) allocate nothing new.
    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())
             and not getattr(m, "inplace", False) and not isinstance(m, (nn.Identity, nn.Flatten))]
    d = cfg.data
    patches = torch.empty(per_rank * d.grid ** 2, 3, d.patch_size, d.patch_size, device="meta")
    images = torch.empty(per_rank, 3, d.image_size, d.image_size, device="meta")
    try:
        with torch.no_grad():
            model(*{"jigsaw": (patches,), "supervised": (images,)}.get(cfg.method, (images, patches)))
    finally:
        for h in hooks:
            h.remove()
    return total + (images.numel() + patches.numel()) * 4


def estimate_memory(cfg: Config, device: torch.device, num_samples: int, world_size: int) -> MemoryEstimate:
    model = build_meta_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    per_rank = max(1, cfg.data.batch_size // max(1, world_size))
    bf16 = cfg.trainer.precision == "bf16" or (cfg.trainer.precision == "auto" and device.type == "cuda")
    d = cfg.data
    sample = 3 * (d.image_size ** 2 + d.grid ** 2 * d.patch_size ** 2) * 4  # one decoded sample, fp32
    bank_element = torch.empty(0, dtype=DTYPES[cfg.bank.dtype]).element_size()
    parts = {
        "model": 3 * 4 * params,
        "activations": activation_bytes(model, cfg, per_rank, 2 if bf16 else 4),
        "bank": num_samples * (cfg.model.embed_dim * bank_element + 1 + 4),
        "loader": (max(1, cfg.data.prefetch) if cfg.data.backend != "synthetic" else 1) * per_rank * sample,
    }
    if device.type == "cpu":
        parts["runtime"] = RUNTIME_BYTES
    processes = 1 if device.type == "cuda" else max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return MemoryEstimate(parts, processes)


def free_memory(device: torch.device) -> int:
    """Bytes this run may still use on `device` (see the module doc)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _meminfo("MemAvailable") or _meminfo("MemFree") or 0
    limit = cgroup_headroom()
    return min(available, limit) if limit is not None else available


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_headroom() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), or None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def check_memory(cfg: Config, device: torch.device, num_samples: int, world_size: int,
                 free: int | None = None) -> MemoryEstimate:
    """Raise ConfigError (one line) when the estimate exceeds the free memory; `free` for tests."""
    estimate = estimate_memory(cfg, device, num_samples, world_size)
    free = free_memory(device) if free is None else free
    if cfg.trainer.force or estimate.total <= free:
        return estimate
    where = f"{device}" if device.type == "cuda" else "this machine's memory"
    ranks = f" for {estimate.processes} ranks" if estimate.processes > 1 else ""
    biggest = ", ".join(f"{k} {gb(v * estimate.processes)}" for k, v in
                        sorted(estimate.parts.items(), key=lambda kv: -kv[1]) if v >= 0.05 * GB)
    raise ConfigError(
        f"this run needs about {gb(estimate.total)}{ranks} ({biggest}) but {where} has {gb(free)} free: "
        f"{fits(cfg, device, estimate, free)} ({FORCE} starts it anyway)")


def fits(cfg: Config, device: torch.device, estimate: MemoryEstimate, free: int) -> str:
    """What to run instead, for the refusal."""
    if device.type == "cpu" and cfg.name != "smoke":
        return "on a CPU, run experiment=smoke (ResNet-18, 64 px images, batch 32)"
    act = estimate.parts["activations"] * estimate.processes
    room = free - (estimate.total - act)
    batch = cfg.data.batch_size
    if room > 0 and act > 0:
        world = max(1, int(os.environ.get("WORLD_SIZE", 1)))  # torchrun's; 1 for a plain process
        smaller = max(1, int(batch * room / act))
        smaller -= smaller % world  # the trainer needs a global batch that divides over the ranks
        if 0 < smaller < batch:
            return f"a smaller global batch fits, e.g. data.batch_size={smaller} (optim.lr scales with it)"
    return "free memory (other jobs), use a smaller model (model=resnet18) or smaller images (data.image_size)"


def checkpoint_bytes(cfg: Config, num_samples: int) -> int:
    """About one checkpoint's size (checkpoint.state_bytes' rule): weights and BN buffers, SGD momentum,
    the bank, and 1 MiB for the rest."""
    model = build_meta_model(cfg)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum = sum(p.numel() * 4 for p in model.parameters())
    bank = num_samples * (cfg.model.embed_dim * torch.empty(0, dtype=DTYPES[cfg.bank.dtype]).element_size() + 1)
    return int((weights + momentum + bank + num_samples * 4) * 1.01) + MB


def planned_saves(cfg: Config, steps: int, steps_per_epoch: int) -> int:
    """Checkpoints a run of `steps` optimiser steps writes (loop.py `fit`'s rule), at least 1."""
    t = cfg.trainer
    saves = 1 + (steps // t.ckpt_every if t.ckpt_every else 0)
    if t.ckpt_epoch_end and steps_per_epoch:
        saves += steps // steps_per_epoch
    return max(1, saves)


def check_disk(cfg: Config, run_dir: Path, num_samples: int, steps: int, steps_per_epoch: int,
               free: int | None = None) -> int:
    """Raise ConfigError (one line) when run_dir's filesystem lacks room for the checkpoints the run
    holds at once; returns the bytes needed. `free` for tests."""
    size = checkpoint_bytes(cfg, num_samples)
    held = min(cfg.trainer.keep_checkpoints + 1, planned_saves(cfg, steps, steps_per_epoch))
    existing = sum(p.stat().st_size for p in checkpoint.list_checkpoints(run_dir))
    need = max(size, held * size - existing)
    folder = run_dir if run_dir.exists() else next(p for p in run_dir.parents if p.exists())
    free = shutil.disk_usage(folder).free if free is None else free
    if need > free:
        raise ConfigError(
            f"no space for this run's checkpoints: it keeps {held} of about {size / MB:,.0f} MB each in "
            f"{checkpoint.checkpoint_dir(run_dir)} (trainer.keep_checkpoints={cfg.trainer.keep_checkpoints}, plus "
            f"the one being written), needing about {need / MB:,.0f} MB more, and the disk has {free / MB:,.1f} MB "
            "free: free space there, choose another hydra.run.dir, or lower trainer.keep_checkpoints")
    return need
