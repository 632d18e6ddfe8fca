"""The loader layer: one batch contract (`Batch`) for every backend, built by `build_loader`.

Backends (DataConfig.backend):
    dali       dali_pipelines/pirl.py: GPU decode + augment when the device is CUDA, the same graph
               on the CPU otherwise (pirl_fast/data/loader_dali.py)
    torch      the `webdataset` library + torchvision transforms v2 in DataLoader workers, the same
               augmentations; the fallback without DALI and the baseline (pirl_fast/data/loader_torch.py)
    synthetic  random tensors made on the device, for compute-only timing (loader_synthetic.py)

The epoch, corrupt-sample and patch-order contract every backend keeps: pirl_fast/data/batch.py.
"""

from __future__ import annotations

import dataclasses

import torch

from pirl_fast.data.batch import PIRLLoader
from pirl_fast.data.config import DataConfig, check_config, resolve_workers
from pirl_fast.shard.format import Manifest, check_shard_files, load_manifest
from pirl_fast.shard.splits import resolve_shards

DALI_INSTALL = "pip install nvidia-dali-cuda130"  # pyproject.toml's pin; the CPU graph needs no GPU


class BackendUnavailable(ImportError):
    """data.backend names a loader whose library is not installed; the message says how to get it."""


def resolve_backend(backend: str) -> tuple[str, str | None]:
    """(the backend to build, a one-line notice or None). "auto" is dali where NVIDIA DALI imports (the
    GPU graph on CUDA, its CPU graph otherwise), else torch with a notice saying so; an explicit "dali"
    without DALI raises BackendUnavailable, naming the fix."""
    if backend not in ("auto", "dali"):
        return backend, None
    from pirl_fast.data.loader_dali import dali_import_error  # here: importing loader_dali imports DALI

    error = dali_import_error()
    if error is None:
        return "dali", None
    if backend == "dali":
        raise BackendUnavailable(f"data.backend=dali but NVIDIA DALI does not import here ({error}): {DALI_INSTALL}, "
                                 "or use data.backend=auto (DALI where installed, else torch) or data.backend=torch")
    return "torch", (f"data.backend=auto: NVIDIA DALI does not import here ({error}), so the torch backend loads "
                     f"the data (webdataset + torchvision workers; {DALI_INSTALL} for the fast path)")


def check_shards(cfg: DataConfig) -> Manifest:
    """Load the manifest and check every shard before any reader opens it, so errors are ours
    (shard/format.py check_shard_files; with cfg.verify_sha256 the tars' SHA-256 too). A dataset
    root's shards (cfg.shards/train, cfg.shards/val, ...) mean their train split (splits.py)."""
    manifest = load_manifest(resolve_shards(cfg.shards, "train").dir)
    check_shard_files(manifest, cfg.verify_sha256,
                      fix=f"re-run `python -m pirl_fast.shard SRC {cfg.shards}` (or restore the file from a copy)")
    return manifest


def build_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> PIRLLoader:
    """The loader for this rank: `len()` batches of cfg.batch_size // world_size samples per epoch.

    data.backend=auto and data.workers=auto are resolved here (the trainer resolves the backend
    earlier, to say which it chose)."""
    cfg = dataclasses.replace(cfg, backend=resolve_backend(cfg.backend)[0], workers=resolve_workers(cfg.workers))
    per_rank = check_config(cfg, world_size)
    device = torch.device(device)
    if cfg.backend == "synthetic":
        from pirl_fast.data.loader_synthetic import SyntheticLoader

        return SyntheticLoader(cfg, per_rank, rank, world_size, device)
    manifest = check_shards(cfg)
    if cfg.backend == "dali":
        from pirl_fast.data.loader_dali import DaliLoader

        return DaliLoader(cfg, manifest, per_rank, rank, world_size, device)
    from pirl_fast.data.loader_torch import TorchLoader

    return TorchLoader(cfg, manifest, per_rank, rank, world_size, device)
