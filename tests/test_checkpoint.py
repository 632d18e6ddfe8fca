"""Checkpoint files: atomic writes, weights_only loading, corrupt-file fallback, pruning, RNG round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pirl_fast import checkpoint
from pirl_fast.checkpoint import CheckpointError


def fake_state(step: int) -> dict:
    """A dict with every required key and weights_only-safe values."""
    return {"format_version": checkpoint.FORMAT_VERSION, "step": step, "epoch": 0, "batches_in_epoch": step,
            "model": {"w": torch.full((3,), float(step))}, "optimizer": {"state": {}, "param_groups": []},
            "criterion": {}, "bank": {"bank": torch.zeros(4, 2)}, "rng": [checkpoint.rng_state()],
            "config_yaml": "method: pirl\n", "world_size": 1, "num_samples": 4}


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = checkpoint.save(tmp_path, fake_state(7), keep=3)
    assert path == tmp_path / "checkpoints" / "step_000000007.pt"
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.full((3,), 7.0))


def test_a_failed_save_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "step_000000001.pt"
    checkpoint.save_atomic(fake_state(1), path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic(fake_state(2), path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1  # the old content, whole
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file was removed


def test_keeps_only_the_newest_checkpoints(tmp_path):
    for step in (5, 10, 15, 20):
        checkpoint.save(tmp_path, fake_state(step), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000000020.pt", "step_000000015.pt"]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    for step in (1, 2):
        checkpoint.save(tmp_path, fake_state(step), keep=5)
    newest = checkpoint.checkpoint_path(tmp_path, 2)
    newest.write_bytes(newest.read_bytes()[: 200])  # truncated, as after a crash mid-copy
    with pytest.warns(RuntimeWarning, match="step_000000002.pt is unreadable"):
        path, state = checkpoint.load_latest(tmp_path)
    assert path.name == "step_000000001.pt" and state["step"] == 1


def test_all_checkpoints_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    checkpoint.save(tmp_path, fake_state(3), keep=5)
    checkpoint.checkpoint_path(tmp_path, 3).write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        checkpoint.load_latest(tmp_path)
    assert checkpoint.load_latest(tmp_path / "elsewhere") is None  # no checkpoints at all: a fresh start


def test_incomplete_dict_is_rejected(tmp_path):
    state = fake_state(1)
    del state["bank"]
    torch.save(state, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="missing bank"):
        checkpoint.load(tmp_path / "x.pt")


class NotAllowed:
    """Any class: unpickling it would mean running code chosen by the file."""


def test_loading_refuses_arbitrary_objects(tmp_path):
    state = fake_state(1)
    state["config_yaml"] = NotAllowed()
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        checkpoint.load(tmp_path / "evil.pt")


def test_rng_state_round_trip_through_a_file_reproduces_every_stream(tmp_path):
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    gen.manual_seed(4)
    torch.rand(5), np.random.rand(5), random.random(), torch.rand(2, generator=gen)  # move every stream along
    state = fake_state(1)
    state["rng"] = [checkpoint.rng_state({"bank": gen})]
    checkpoint.save(tmp_path, state, keep=1)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], torch.rand(4, generator=gen))

    other = torch.Generator().manual_seed(999)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # scramble everything
    loaded = checkpoint.load(checkpoint.checkpoint_path(tmp_path, 1))
    checkpoint.set_rng_state(loaded["rng"][0], {"bank": other})
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], torch.rand(4, generator=other))
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    assert torch.equal(got[3], expected[3])


def test_missing_generator_state_is_named(tmp_path):
    state = checkpoint.rng_state({})
    with pytest.raises(CheckpointError, match="'bank'"):
        checkpoint.set_rng_state(state, {"bank": torch.Generator()})


def test_checkpoint_listing_ignores_temporary_and_foreign_files(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("step_000000004.pt", ".step_000000009.pt.abc.tmp", "notes.txt", "step_000000012.pt"):
        (folder / name).write_bytes(b"")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000000012.pt", "step_000000004.pt"]
    assert isinstance(checkpoint.list_checkpoints(tmp_path)[0], Path)
