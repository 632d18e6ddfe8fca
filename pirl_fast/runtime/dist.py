"""torchrun-native distributed helpers.

Everything here works unchanged as a single process: when RANK / WORLD_SIZE are absent the
collectives return their input, so CPU tests and one-GPU runs need no process group.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int


def info() -> DistInfo:
    """Rank, local rank and world size, from the process group if one is up, else torchrun's env."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return DistInfo(torch_dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), torch_dist.get_world_size())
    return DistInfo(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def init(backend: str | None = None) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch_dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch_dist.init_process_group(backend=backend)
    return info()


def pick_device(name: str, local_rank: int = 0, setting: str = "--device", error: type = ValueError) -> torch.device:
    """auto: this rank's GPU (cuda:LOCAL_RANK) when CUDA is there, else the CPU; cuda: that GPU, refused
    without CUDA (`error`, naming `setting`); cpu; cuda:N."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"{setting}={name} but CUDA is not available here; use {setting}=auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank) if name in ("auto", "cuda") else torch.device(name)


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (same shape on every rank) from all ranks along dim 0, in rank order."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks (a new tensor; the input is left alone)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out / torch_dist.get_world_size()


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (unchanged in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """[rank 0's obj, rank 1's obj, ...] on every rank ([obj] in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def slurm_to_torchrun_env() -> None:
    """Under SLURM without torchrun (srun, or Hydra's submitit launcher with one task per GPU),
    derive torchrun's RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from SLURM's."""
    env = os.environ
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return
    env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_LOCALID"], env["SLURM_NTASKS"]
    if "MASTER_ADDR" not in env:
        if shutil.which("scontrol") is None:
            raise RuntimeError("under SLURM without torchrun, MASTER_ADDR is needed: set it, or run via torchrun")
        hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], check=True,
                               capture_output=True, text=True).stdout.split()
        env["MASTER_ADDR"] = hosts[0]
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))  # one port per job
