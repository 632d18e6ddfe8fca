"""Checkpoint files: atomic writes, weights_only loading, corrupt-file fallback, pruning, RNG round trip."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pirl_fast.runtime import atomic
from pirl_fast.runtime.atomic import NoSpaceError
from pirl_fast.train import checkpoint, run_dirs
from pirl_fast.train.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]


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
        checkpoint.load(tmp_path / "x.pt", run_dirs.TRAINING_KEYS)


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


# ---------------------------------------------------------------------------------------------- temp files, full disks
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_save_killed_mid_write_leaves_a_temp_file_that_the_next_start_removes(tmp_path):
    """The fault: SIGKILL during a save leaves `.step_*.pt.<host>.<pid>.*.tmp` behind (atomic_write
    can clean up after exceptions, not after a kill); the next run's cleanup removes it."""
    script = ("import sys, time; from pirl_fast.runtime.atomic import atomic_write\n"
              "with atomic_write(sys.argv[1], 'wb') as f:\n"
              "    f.write(b'x' * 4096); f.flush(); print('writing', flush=True); time.sleep(600)\n")
    target = tmp_path / "checkpoints" / "step_000000003.pt"
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    (temp,) = target.parent.glob(".step_000000003.pt.*.tmp")
    proc.kill()
    proc.wait()
    assert temp.exists() and not target.exists()
    assert checkpoint.remove_stale_temps(tmp_path) == [(temp, 4096)]
    assert not any(target.parent.iterdir())


def test_stale_temp_cleanup_touches_only_our_names_and_never_a_live_writer(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    hour_ago = time.time() - 2 * atomic.STALE_AFTER_S
    files = {
        f".step_000000005.pt.{atomic.HOST}.{dead_pid()}.a1b2c3d4.tmp": ("removed", None),  # this host, writer gone
        f".step_000000006.pt.{atomic.HOST}.{os.getpid()}.a1b2c3d4.tmp": ("kept", hour_ago),  # a live writer: never
        ".step_000000007.pt.othernode.12.a1b2c3d4.tmp": ("kept", None),  # another host's, recently written
        ".step_000000008.pt.othernode.12.zz99yy88.tmp": ("removed", hour_ago),  # another host's, untouched for long
        ".step_000000009.pt.k2j3h4g5.tmp": ("kept", None),  # the name before host and pid were in it: recent
        ".step_000000010.pt.q9w8e7r6.tmp": ("removed", hour_ago),  # ... and untouched for long
        "notes.tmp": ("kept", hour_ago), ".step_000000011.pt": ("kept", hour_ago),
        "step_000000004.pt": ("kept", hour_ago),
        ".step_000000012.pt.othernode.12.TOOLONG_random.tmp": ("kept", hour_ago),  # not mkstemp's 8 characters
    }
    for name, (_, mtime) in files.items():
        (folder / name).write_bytes(b"123")
        if mtime:
            os.utime(folder / name, (mtime, mtime))
    removed = checkpoint.remove_stale_temps(tmp_path)
    assert sorted(p.name for p, _ in removed) == sorted(n for n, (fate, _) in files.items() if fate == "removed")
    assert sorted(p.name for p in folder.iterdir()) == sorted(n for n, (fate, _) in files.items() if fate == "kept")


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, fake_state(1), keep=3)
    state = {**fake_state(2), "bank": {"bank": torch.zeros(1 << 20)}}  # 4 MiB of tensors
    need = checkpoint.state_bytes(state)
    assert 4 << 20 < need < 6 << 20
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 3 << 20))
    with pytest.raises(NoSpaceError, match=r"no space left on device: need about 5 MB in .*checkpoints, have 3 MB "
                                           r"free \(the 1 checkpoints kept there use 0 MB"):
        checkpoint.save(tmp_path, state, keep=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000000001.pt"]  # nothing written


def test_state_bytes_is_about_the_file_size(tmp_path):
    state = {**fake_state(3), "bank": {"bank": torch.randn(256, 128)}, "model": {"w": torch.randn(1000, 100)}}
    path = checkpoint.save(tmp_path, state, keep=1)
    assert path.stat().st_size <= checkpoint.state_bytes(state) <= path.stat().st_size + (2 << 20)


def test_a_full_tmpfs_gives_the_clear_error_before_and_during_the_write(tmp_path):
    """A real 2 MiB tmpfs, mounted in a private mount namespace (skipped where that is not allowed):
    a 4 MiB checkpoint is refused up front; one whose size the estimate misses (a big non-tensor
    value) runs into ENOSPC mid-write and reports it the same way instead of "unexpected pos"."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    mount = tmp_path / "small"
    mount.mkdir()
    script = (
        "import sys, torch\n"
        "from pirl_fast.train import checkpoint\n"
        "from pirl_fast.runtime.atomic import NoSpaceError\n"
        "for name, extra in (('tensors', {'big': torch.zeros(1 << 20)}), ('a list', {'big': list(range(600_000))})):\n"
        "    try:\n"
        "        checkpoint.save(sys.argv[1], {'step': 1, **extra}, keep=2)\n"
        "    except NoSpaceError as e:\n"
        "        print(name, '->', e)\n")
    (tmp_path / "save.py").write_text(script)
    mount_and_run = f'mount -t tmpfs -o size=2m tmpfs {mount} && exec "$0" {tmp_path / "save.py"} {mount}'
    cmd = ["unshare", "-rm", "sh", "-c", mount_and_run, sys.executable]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            timeout=120)
    if "mount" in result.stderr and result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert lines[0].startswith(f"tensors -> no space left on device: need about 5 MB in "
                               f"{mount}/checkpoints, have 2 MB free")
    assert lines[1].startswith(f"a list -> no space left on device while writing step_000000001.pt: need "
                               f"about 1 MB in {mount}/checkpoints, have 2 MB free")
    assert "unexpected pos" not in result.stdout + result.stderr
