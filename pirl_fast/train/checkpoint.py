"""Checkpoints that survive a crash at any instant, and load without running code from the file.

Layout: run_dir/checkpoints/step_000001234.pt, one file per save, the newest `keep` kept. A
checkpoint is a dict of named values (state dicts, numbers, strings, tensors, lists): the caller
decides what goes in and what loading it means (the trainer: pirl_fast/train/loop.py `save_checkpoint`,
`resume`); this module writes (`save_atomic`: pirl_fast/runtime/atomic.py, after a free-space check),
finds, checks and reads the files (`load_latest` falls back past a corrupt newest one). Loading uses
`torch.load(weights_only=True)`, so configs are stored as YAML text and RNG states as tensors and
lists (`rng_state`).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pirl_fast.runtime.atomic import (
    MB,
    NoSpaceError,
    atomic_write,
    is_no_space,
    remove_stale_temp_files,
    require_free_space,
)

CKPT_SUBDIR = "checkpoints"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message says which files were tried."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CKPT_SUBDIR


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:09d}.pt"


def step_of(path: str | os.PathLike | None) -> int | None:
    """The step in a checkpoint's file name (step_000000012.pt -> 12); None for other names."""
    m = _NAME.match(Path(path).name) if path is not None else None
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files in run_dir, newest (highest step) first; temporary files are ignored."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if (step := step_of(p)) is not None]
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
    """Delete the temp files that killed saves left in run_dir/checkpoints (pirl_fast/runtime/atomic.py
    decides what is stale); returns (path, bytes) of each."""
    return remove_stale_temp_files(checkpoint_dir(run_dir))


def save(run_dir: str | os.PathLike, state: dict[str, Any], keep: int) -> Path:
    """Write `state` (named values, with "step") as the checkpoint for state["step"], stamped with
    FORMAT_VERSION, then delete all but the newest `keep`."""
    state = {"format_version": FORMAT_VERSION, **state}
    path = checkpoint_path(run_dir, int(state["step"]))
    existing = list_checkpoints(run_dir)
    hint = (f" (the {len(existing)} checkpoints kept there use {sum(p.stat().st_size for p in existing) / MB:,.0f} MB; "
            f"trainer.keep_checkpoints={keep} keeps {keep} plus the one being written)" if existing else "")
    save_atomic(state, path, hint)
    for old in list_checkpoints(run_dir)[max(1, keep):]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike, required: Iterable[str] = ()) -> dict[str, Any]:
    """Load one checkpoint on the CPU with weights_only=True; CheckpointError unless it has this code's
    format and every `required` key."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a pirl_fast checkpoint dict")
    missing = [k for k in ("format_version", *required) if k not in state]
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
    starting from scratch would throw away a run. The trainer resumes with it (its loader requires
    everything needed to continue) and eval reads with it (its loader: the weights and config suffice).
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
