"""Checkpoints that survive a crash at any instant, and load without running code from the file.

Layout: run_dir/checkpoints/step_000001234.pt, one file per save, the newest `keep` kept.

A save writes a temporary file in the same folder, fsyncs it, renames it over the final name
(atomic on POSIX) and fsyncs the folder, so a reader sees either the previous set of files or the
new complete one, never half a file. Before writing, the free space is checked against the
checkpoint's size (the bytes of its tensors' storages, plus a margin): a full disk gives
"no space left on device: need about N MB in DIR, have M" (NoSpaceError), not torch's "unexpected
pos". Temp files of killed saves are removed at the next start (`remove_stale_temps`).
Loading uses `torch.load(weights_only=True)`: only tensors, numbers, strings, lists, tuples and
dicts are accepted, so the resolved config is stored as YAML
text and RNG states as tensors and lists (see `rng_state`).

`load_latest` walks the checkpoints newest first and returns the first one that loads and has
every required key; a corrupt or truncated newest file is skipped with a warning naming it.

When: every trainer.ckpt_every steps, at every epoch end (trainer.ckpt_epoch_end), at the end of
the run, and at the step boundary after SIGTERM / SIGINT. Never after a non-finite loss.

Contents (`run_state`): model, optimizer (momentum buffers), criterion (the frozen NCE
normalisers Z), bank (rows + its negative-draw counter), step (= the LR schedule's position),
epoch and batches_in_epoch (the loader's position), rng (every rank's torch / CUDA / numpy /
Python states and the loader's generators), config_yaml (the resolved config), world_size,
num_samples.

Resume (`resume_into`) is bit-for-bit the run that was not interrupted when (a) the world size
is the same, (b) the backend's batches depend only on its seed, the epoch and the restored RNGs:
`synthetic` always; `torch` always (the loader's `set_epoch` makes the shard order, split and
shuffle a function of (seed, epoch), augmentation runs on the restored global torch RNG with
data.workers=0, and each worker reseeds from (seed, epoch, rank, worker) at every epoch start
with workers > 0; data.workers must be the same as before); and (c) kernels are deterministic
(always on CPU; on CUDA, trainer.deterministic=true). With `dali` the resumed run skips the same
number of batches of the epoch (a fresh shuffle and fresh augmentations, since DALI keeps RNG
state we cannot save): the LR schedule, epoch boundaries, bank, Z, negatives and weights
continue exactly; the data order does not.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pirl_fast.atomic import MB, NoSpaceError, atomic_write, is_no_space, remove_stale_temp_files, require_free_space

CKPT_SUBDIR = "checkpoints"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")
# What train.py puts in every checkpoint (a checkpoint missing one of these is treated as corrupt).
REQUIRED_KEYS = ("format_version", "step", "epoch", "batches_in_epoch", "model", "optimizer", "criterion",
                 "bank", "rng", "config_yaml", "world_size", "num_samples")


# Keys that may differ on resume without changing what is computed (not warned about).
HARMLESS_CHANGES = {"resume", "run_dir", "trainer.max_steps", "trainer.progress", "trainer.log_every",
                    "trainer.ckpt_every", "trainer.ckpt_epoch_end", "trainer.keep_checkpoints", "trainer.compile",
                    "trainer.sync_timing", "trainer.timing_warmup_steps", "data.workers", "data.prefetch"}


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message says which files were tried."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CKPT_SUBDIR


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:09d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files in run_dir, newest (highest step) first; temporary files are ignored."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_atomic(state: dict[str, Any], path: str | os.PathLike, hint: str = "") -> None:
    """torch.save `state` to `path` so that `path` is always either absent, old, or complete.

    Refuses with NoSpaceError before writing when the folder lacks room for it (`hint` is added to
    the message), and turns an ENOSPC during the write into the same clear error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    need = state_bytes(state)
    require_free_space(path.parent, need, hint)
    try:
        with atomic_write(path, "wb") as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:
        if is_no_space(e):
            free = shutil.disk_usage(path.parent).free  # after the temp file was removed
            raise NoSpaceError(path.parent, need, free, hint, during=f" while writing {path.name}") from e
        raise


def state_bytes(state: Any) -> int:
    """About the size `torch.save(state)` writes: its tensors' storages (each once, as torch.save
    writes them), plus 1% and 1 MiB for the pickled rest."""
    storages: dict[int, int] = {}

    def visit(node: Any) -> None:
        if torch.is_tensor(node):
            storage = node.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)
    visit(state)
    return int(sum(storages.values()) * 1.01) + MB


def remove_stale_temps(run_dir: str | os.PathLike) -> list[tuple[Path, int]]:
    """Delete the temp files that killed saves left in run_dir/checkpoints (pirl_fast/atomic.py
    decides what is stale); returns (path, bytes) of each."""
    return remove_stale_temp_files(checkpoint_dir(run_dir))


def save(run_dir: str | os.PathLike, state: dict[str, Any], keep: int) -> Path:
    """Write state as the checkpoint for state["step"], then delete all but the newest `keep`."""
    path = checkpoint_path(run_dir, int(state["step"]))
    existing = list_checkpoints(run_dir)
    hint = (f" (the {len(existing)} checkpoints kept there use {sum(p.stat().st_size for p in existing) / MB:,.0f} MB; "
            f"trainer.keep_checkpoints={keep} keeps {keep} plus the one being written)" if existing else "")
    save_atomic(state, path, hint)
    for old in list_checkpoints(run_dir)[max(1, keep):]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load one checkpoint on the CPU with weights_only=True and check it has every required key."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a pirl_fast checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete pirl_fast checkpoint: missing {', '.join(missing)}")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state['format_version']}, this code reads "
                              f"{FORMAT_VERSION}")
    return state


def load_latest(run_dir: str | os.PathLike, loader: Callable[[Path], dict[str, Any]] = load,
                ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in run_dir that `loader` loads, or None if there are none at all.

    A newest file that fails to load (truncated, corrupt, incomplete) is skipped with a warning
    and the previous one is tried. If files exist but none loads, raises CheckpointError: silently
    starting from scratch would throw away a run. The trainer resumes with it (`load`: everything
    needed to continue) and eval reads with it (its own loader: the weights and config suffice).
    """
    candidates = list_checkpoints(run_dir)
    failures = []
    for path in candidates:
        try:
            return path, loader(path)
        except Exception as e:  # noqa: BLE001 -- any failure to read means: try the previous one
            failures.append(f"{path.name}: {type(e).__name__}: {e}")
            warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); falling back to the "
                          "previous one", RuntimeWarning, stacklevel=2)
    if candidates:
        raise CheckpointError(f"none of the {len(candidates)} checkpoints in {checkpoint_dir(run_dir)} loads:\n  "
                              + "\n  ".join(failures)
                              + "\nmove them away to start from scratch, or pass resume=PATH to a good copy")
    return None


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's RNG states as weights_only-safe values (tensors, ints, floats, lists).

    torch CPU, every CUDA device (when CUDA is initialised), numpy's and Python's global RNGs,
    plus any named extra generators (the memory bank's negative sampler).
    """
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what `rng_state` captured (CUDA states only onto as many devices as both sides have)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"the checkpoint has no state for the {name!r} generator "
                                  f"(it has {sorted(state['generators'])})")
        g.set_state(state["generators"][name])


# ---------------------------------------------------------------------------------------------- the run's state
def run_state(run, rngs: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything needed to continue `run` (a pirl_fast.train.Run) exactly where it is.

    rngs: every rank's `rng_state()`, in rank order (each rank has its own streams).
    """
    from pirl_fast.config import to_yaml

    return {
        "format_version": FORMAT_VERSION,
        "step": run.step,  # optimiser steps done: also the LR schedule's position (a pure function of it)
        "epoch": run.epoch,  # epochs done
        "batches_in_epoch": run.batches_in_epoch,  # batches of epoch `epoch` consumed (skipped on resume)
        "model": run.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),  # momentum buffers
        "criterion": run.criterion.state_dict(),  # the frozen NCE normalisers Z
        "bank": run.bank.state_dict(),  # rows + the negative stream's position
        "rng": rngs,
        "config_yaml": to_yaml(run.cfg),  # text, not an object: weights_only loading stays possible
        "world_size": run.world_size,
        "num_samples": run.loader.num_samples,
    }


def resume_into(run, path: Path | None, generators: dict[str, torch.Generator]) -> None:
    """Load checkpoint `path` into `run` (model, optimiser, Z, bank, position, RNGs); no-op for None.

    Loader position: the loader is set to the checkpoint's epoch (when it has `set_epoch`) and the
    batches already consumed in that epoch are drawn and dropped (with DALI this decodes them:
    at worst one epoch of loading, no compute), then every RNG is restored, since the skipping
    consumed random numbers. Exactness conditions: see the module docstring.
    """
    if path is None:
        return
    state = load(path)
    if state["num_samples"] != run.loader.num_samples:
        from pirl_fast.config import ConfigError

        raise ConfigError(f"checkpoint {path} was trained on {state['num_samples']} samples, but data.shards="
                          f"{run.cfg.data.shards} holds {run.loader.num_samples}: the memory bank has one row per "
                          "sample. Resume with the same shards, or start a new run (another hydra.run.dir)")
    _warn_config_changes(path, state["config_yaml"], run.cfg)
    try:
        run.module.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit model.arch={run.cfg.model.arch}, "
                              f"model.embed_dim={run.cfg.model.embed_dim}: resume with the checkpoint's model config "
                              f"(see config_yaml inside it). {e}") from e
    run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:  # the config, not the checkpoint, decides these
        group["momentum"] = run.cfg.optim.momentum
        group["weight_decay"] = run.cfg.optim.weight_decay if group.get("group") == "decay" else 0.0
    run.criterion.load_state_dict(state["criterion"])
    run.bank.load_state_dict(state["bank"])
    run.step, run.epoch, run.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
    can_set_epoch = hasattr(run.loader, "set_epoch")
    if can_set_epoch:
        run.loader.set_epoch(run.epoch)
    data = run.cfg.data
    exact = data.backend == "synthetic" or (data.backend == "torch" and (run.epoch == 0 or can_set_epoch))
    if not exact and run.rank == 0:
        warnings.warn(f"data.backend={data.backend} (data.workers={data.workers}) cannot restore its exact data "
                      f"stream: epoch {run.epoch} continues after the {run.batches_in_epoch} batches it had consumed, "
                      "but with a fresh sample order and fresh augmentations (everything else resumes exactly; "
                      "see pirl_fast/checkpoint.py)", RuntimeWarning, stacklevel=2)
    if run.batches_in_epoch:
        run.batches = iter(run.loader)
        for _ in range(run.batches_in_epoch):  # read and drop: the checkpointed run had consumed these
            next(run.batches)
    if len(state["rng"]) == run.world_size:
        set_rng_state(state["rng"][run.rank], generators)
    elif run.rank == 0:
        warnings.warn(f"checkpoint {path} was written by {len(state['rng'])} ranks, this run has {run.world_size}: "
                      "RNG streams start fresh (training continues correctly, but not bit for bit)",
                      RuntimeWarning, stacklevel=2)
    run.last_checkpoint = Path(path)


def _warn_config_changes(path: Path, saved_yaml: str, cfg) -> None:
    """Warn (rank 0) about keys whose value differs from the checkpoint's config: legitimate for
    e.g. trainer.epochs or max_steps, a mistake for most others."""
    from omegaconf import OmegaConf

    from pirl_fast.config import to_yaml

    def flat(node, prefix=""):
        out = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    before = flat(OmegaConf.to_container(OmegaConf.create(saved_yaml)))
    now = flat(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))))
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k) and k not in HARMLESS_CHANGES]
    if changed and int(os.environ.get("RANK", 0)) == 0:
        warnings.warn(f"resuming {path} with a different config:\n  " + "\n  ".join(changed), RuntimeWarning,
                      stacklevel=3)
