"""How many CPU cores a process's workers may use: the default of every `workers` setting.

`data.workers=auto` (DALI threads / DataLoader workers per rank), `eval --workers`, `shard --workers`
and the benchmarks' `--workers` all start from `cpus_per_rank()`. No torch import: the sharder uses it.
"""

from __future__ import annotations

import os


def cpus_per_rank() -> int:
    """CPU cores for this process's workers: the cores it may run on (its affinity mask, which
    taskset, cgroups and SLURM's --cpus-per-task set), shared among the LOCAL_WORLD_SIZE ranks torchrun
    started on this node; at least 1. (srun without torchrun usually binds each task to its own
    cores already, and sets no LOCAL_WORLD_SIZE.)"""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity masks
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
