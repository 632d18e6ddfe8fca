"""torchrun-native distributed helpers.

Everything here works unchanged as a single process: when RANK / WORLD_SIZE are absent the
collectives return their input, so CPU tests and one-GPU runs need no process group.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
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
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU).

    Under torchrun's shared store (TORCHELASTIC_USE_AGENT_STORE=True, its default with c10d
    rendezvous) the group meets under a namespace of its own attempt; see `fresh_namespace`."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch_dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            agent = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                        is_master=False, timeout=INIT_TIMEOUT)
            store = fresh_namespace(agent, rank, world_size, INIT_TIMEOUT)
            torch_dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        else:
            torch_dist.init_process_group(backend=backend)
    return info()


INIT_TIMEOUT = timedelta(minutes=30)  # torch's default for a process group's collectives
NAMESPACE = "pirl_fast/group"


def fresh_namespace(store: torch_dist.Store, rank: int, world_size: int, timeout: timedelta,
                    poll_s: float = 0.02) -> torch_dist.PrefixStore:
    """`store` seen under a prefix that this attempt of the group alone uses, agreed by all its ranks.

    Why: torchrun (torch 2.14) keeps one shared store for the whole job, and a group restarted under
    --max-restarts finds the keys its dead predecessor wrote. Gloo (and NCCL) publish each rank's
    address under fixed keys, so a new rank could read a dead rank's address and be refused
    ("Gloo connectFullMesh failed ... Connection refused"; pytorch/pytorch#135712). torchrun's
    TORCHELASTIC_RESTART_COUNT cannot name the attempt: it is counted per node.

    How: rank 0 takes a new generation number from a counter (store.add: a number no earlier rank 0
    got). Every other rank writes a nonce of its own process; rank 0 answers each nonce it reads with
    its generation; a rank takes the generation answered to its own nonce and confirms it. A stale
    nonce or answer left by a dead process never matches the live one, so every rank of the attempt
    ends on rank 0's generation, whatever order they start in."""
    deadline = time.monotonic() + timeout.total_seconds()

    def key(kind: str, r: int) -> str:
        return f"{NAMESPACE}/{kind}/{r}"

    def wait(what: str) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: no agreement on the process group's namespace after "
                               f"{timeout.total_seconds():.0f} s: {what}")
        time.sleep(poll_s)

    def read(k: str) -> str | None:
        return store.get(k).decode() if store.check([k]) else None

    if rank == 0:
        generation = store.add(f"{NAMESPACE}/generation", 1)
        answered: dict[int, str | None] = dict.fromkeys(range(1, world_size))
        while answered:
            for r in list(answered):
                nonce = read(key("hello", r))
                if nonce is None:
                    continue
                if nonce != answered[r]:
                    store.set(key("answer", r), f"{nonce}:{generation}")
                    answered[r] = nonce
                elif read(key("confirm", r)) == f"{nonce}:{generation}":
                    del answered[r]
            if answered:
                wait(f"rank(s) {sorted(answered)[:8]} did not join")
    else:
        nonce = uuid.uuid4().hex
        store.set(key("hello", rank), nonce)
        while True:
            answer = read(key("answer", rank)) or ""
            answered_nonce, _, answered_generation = answer.partition(":")
            if answered_nonce == nonce:
                store.set(key("confirm", rank), answer)
                generation = int(answered_generation)
                break
            wait("rank 0 did not answer")
    return torch_dist.PrefixStore(f"{NAMESPACE}/{generation}", store)


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
