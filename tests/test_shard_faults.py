"""Faults a real cluster throws at the sharder (issue 11), each reproduced for real where the machine
allows: two sharders on one destination, a worker killed as the OOM killer does, a FIFO and a link
to /dev/zero among the images, a destination that is full or read-only, a source with nothing
usable; plus the pre-manifest re-check and what a refusal says about DST."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import pirl_fast.shard.write as shard_write
from pirl_fast.shard.cli import Options, main, run_shard
from pirl_fast.shard.format import MANIFEST_NAME, encode_int64, parse_index
from pirl_fast.shard.lock import LOCK_NAME
from pirl_fast.shard.pool import run_tasks
from pirl_fast.shard.sample_data import write_sample_folder
from pirl_fast.shard.source import SourceError
from pirl_fast.shard.state import PROGRESS_NAME
from pirl_fast.shard.verify import verify_shards

ARGS = ["--samples-per-shard", "3", "--max-side", "0"]  # 12 images -> 4 shards; max-side 0: output ~ input size
WAIT = 120  # seconds a subprocess may take on a loaded 2-core machine before the test calls it hung

# Runs the sharder with hooks set by environment variables; spawned workers import this file as
# their __main__ too, so the hooks apply inside the workers as well.
HOOKS = '''
import os, signal, sys, time
from pathlib import Path
import pirl_fast.shard.cli as s
import pirl_fast.shard.write as w

finish, write = w.finish_shard, w.write_shard

def finish_and_wait(dst, k, entries, base):  # PAUSE_DIR: after shard 1, say "ready" and wait for "go"
    record = finish(dst, k, entries, base)
    pause = os.environ.get("PAUSE_DIR")
    if pause and k == 1 and not (Path(pause) / "go").exists():
        (Path(pause) / "ready").touch()
        while not (Path(pause) / "go").exists():
            time.sleep(0.05)
    return record

def write_or_die(task):  # KILL_SHARD: the worker writing that shard is SIGKILLed, as by the OOM killer
    if task[1].endswith(os.environ.get("KILL_SHARD", "never")):
        os.kill(os.getpid(), signal.SIGKILL)
    return write(task)

w.finish_shard, w.write_shard = finish_and_wait, write_or_die
if __name__ == "__main__":
    sys.exit(s.main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_sample_folder(tmp_path_factory.mktemp("faults") / "src", classes=2, per_class=6, seed=3)


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory) -> Path:
    """The reference: the same source sharded once, undisturbed."""
    dst = tmp_path_factory.mktemp("clean") / "shards"
    assert main([str(src), str(dst), *ARGS, "--workers", "1"]) == 0
    return dst


@pytest.fixture
def hooks(tmp_path) -> Path:
    path = tmp_path / "shard_with_hooks.py"
    path.write_text(HOOKS)
    return path


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))}


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def start(hooks: Path, args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(hooks), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **env})


def wait_ready(proc: subprocess.Popen, pause: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not (pause / "ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the paused sharder never got ready (rc {proc.poll()}): {proc.communicate()[1]}")
        time.sleep(0.05)


def shard_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pirl_fast.shard", *args], capture_output=True, text=True,
                          timeout=WAIT)


# ------------------------------------------------------------------ two sharders, one destination

def test_second_sharder_is_refused_naming_the_holder_and_sigterm_leaves_a_resumable_dst(src, clean, hooks,
                                                                                        tmp_path):
    dst, pause = tmp_path / "dst", tmp_path / "pause"
    pause.mkdir()
    args = [str(src), str(dst), *ARGS]
    first = start(hooks, [*args, "--workers", "2"], PAUSE_DIR=str(pause))
    wait_ready(first, pause)  # shard 1 finished, workers busy with shards 2 and 3: the run holds DST
    for extra in ([], ["--resume"], ["--overwrite"]):
        second = shard_cli(*args, "--workers", "1", *extra)
        assert second.returncode == 2, second.stderr
        assert f"being written by another sharder: pid {first.pid} on host" in second.stderr
        assert "command: " in second.stderr and "shard_with_hooks.py" in second.stderr and "started" in second.stderr
    # SIGTERM (what SLURM and `kill` send): workers stopped, this run's temp files removed, exit 143.
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=WAIT)
    assert first.returncode == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM)" in err and "--resume" in err
    assert temp_files(dst) == [] and not (dst / LOCK_NAME).exists()
    assert not (dst / MANIFEST_NAME).exists() and (dst / "shard-000001.tar").exists()
    assert main([*args, "--workers", "1", "--resume"]) == 0
    assert shard_bytes(dst) == shard_bytes(clean) and not verify_shards(dst)
    assert not (dst / LOCK_NAME).exists()  # a finished shard folder holds shards and manifest only


def test_a_dataset_root_and_its_split_exclude_each_other(src, hooks, tmp_path):
    root = tmp_path / "root"
    (root / "train").mkdir(parents=True)
    shutil.copytree(src, root / "train", dirs_exist_ok=True)
    dst, pause = tmp_path / "dst", tmp_path / "pause"
    pause.mkdir()
    first = start(hooks, [str(root), str(dst), *ARGS, "--workers", "1"], PAUSE_DIR=str(pause))
    wait_ready(first, pause)
    for target in (dst, dst / "train"):  # the root again, or its train split as a shard folder of its own
        second = shard_cli(str(src), str(target), *ARGS, "--workers", "1", "--overwrite")
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
    (pause / "go").touch()
    out, err = first.communicate(timeout=WAIT)
    assert first.returncode == 0, err
    assert not verify_shards(dst)


def test_a_killed_holder_leaves_no_lock(src, clean, tmp_path):
    """The lock is the kernel's: a holder killed with SIGKILL leaves its lock file, which locks nothing."""
    dst = tmp_path / "dst"
    code = ("import os, signal, sys\nfrom pirl_fast.shard.lock import hold\n"
            f"with hold([{str(dst)!r}]):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code], timeout=WAIT)
    assert killed.returncode == -signal.SIGKILL and (dst / LOCK_NAME).exists()
    assert main([str(src), str(dst), *ARGS, "--workers", "1"]) == 0
    assert shard_bytes(dst) == shard_bytes(clean) and not (dst / LOCK_NAME).exists()


def test_a_filesystem_without_locks_is_refused_unless_no_lock(src, tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    dst = tmp_path / "dst"
    assert main([str(src), str(dst), *ARGS, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "does not support flock" in err and "--no-lock" in err and "Traceback" not in err
    assert not dst.exists()  # made for the lock, removed again
    assert main([str(src), str(dst), *ARGS, "--workers", "1", "--no-lock"]) == 0


def test_the_manifest_is_never_written_over_shards_that_changed(src, clean, tmp_path, monkeypatch, capsys):
    """A second writer shifting indices (the fault seen with two sharders) after a shard was finished:
    the re-check before the manifest stops the run; --resume redoes what does not match."""
    dst = tmp_path / "dst"
    real = shard_write.finish_shard

    def finish_then_damage(dst_, k, entries, base):
        record = real(dst_, k, entries, base)
        if k == 2:  # shard 0's last sample gets another index, in place (same size, same inode)
            last = parse_index((dst_ / "shard-000000.idx").read_text())[-1]
            with open(dst_ / "shard-000000.tar", "r+b") as f:
                f.seek(last.offset_of("idx"))
                f.write(encode_int64(7))
        return record

    monkeypatch.setattr(shard_write, "finish_shard", finish_then_damage)
    assert main([str(src), str(dst), *ARGS, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "shard-000000.tar: sample" in err and "has index 7, expected 2" in err and "manifest.json was not" in err
    assert not (dst / MANIFEST_NAME).exists() and temp_files(dst) == []  # nor its temp file
    monkeypatch.setattr(shard_write, "finish_shard", real)
    assert main([str(src), str(dst), *ARGS, "--workers", "1", "--resume"]) == 0
    assert shard_bytes(dst) == shard_bytes(clean)


# ------------------------------------------------------------------ a dead worker, odd files

def test_a_killed_worker_fails_the_run_at_once_and_resume_finishes_it(src, clean, hooks, tmp_path):
    dst = tmp_path / "dst"
    args = [str(src), str(dst), *ARGS]
    proc = subprocess.run([sys.executable, str(hooks), *args, "--workers", "2"], capture_output=True, text=True,
                          timeout=WAIT, env={**os.environ, "KILL_SHARD": ".shard-000002.tar.tmp"})
    assert proc.returncode == 2, proc.stderr
    assert "was killed by SIGKILL (signal 9) while writing" in proc.stderr and "shard-000002.tar" in proc.stderr
    assert "OOM killer" in proc.stderr and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert temp_files(dst) == [] and (dst / PROGRESS_NAME).exists() and not (dst / MANIFEST_NAME).exists()
    assert main(args + ["--workers", "1"]) == 2  # no flag: refused, saying it is this plan, unfinished
    assert main(args + ["--workers", "2", "--resume"]) == 0
    assert shard_bytes(dst) == shard_bytes(clean) and not verify_shards(dst)


def test_worker_exceptions_reach_the_main_process(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(run_tasks(os.path.getsize, [str(tmp_path), str(tmp_path / "nowhere")], workers=2))


def test_fifo_device_link_and_oversized_files_are_skipped_unread(src, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(src, odd)
    cls = sorted(p for p in odd.iterdir())[0]
    os.mkfifo(cls / "pipe.jpg")  # read_bytes() on it would wait for a writer for ever
    (cls / "zero.jpg").symlink_to("/dev/zero")  # would be read until MemoryError
    dst = tmp_path / "dst"
    limit = sorted(p.stat().st_size for p in src.rglob("*.*"))[6]  # about half the images are larger
    proc = shard_cli(str(odd), str(dst), *ARGS, "--workers", "1", "--max-bytes", f"{limit}")
    assert proc.returncode == 0, proc.stderr
    skipped = {s["path"]: s["reason"] for s in json.loads((dst / MANIFEST_NAME).read_text())["skipped"]}
    big = {p.relative_to(odd).as_posix() for p in odd.rglob("*") if p.is_file() and p.stat().st_size > limit}
    assert big and set(skipped) == big | {f"{cls.name}/pipe.jpg", f"{cls.name}/zero.jpg"}
    assert skipped[f"{cls.name}/pipe.jpg"] == "not a regular file (a FIFO)"
    assert skipped[f"{cls.name}/zero.jpg"] == "not a regular file (a character device, via a symlink)"
    assert all(skipped[p].startswith("larger than --max-bytes") for p in big)
    for path, reason in skipped.items():  # the output lists them too
        assert f"skipped {path}: {reason}" in proc.stdout
    # At the default limit only the FIFO and the device are skipped.
    assert main([str(odd), str(tmp_path / "dst2"), *ARGS, "--workers", "1"]) == 0
    again = json.loads((tmp_path / "dst2" / MANIFEST_NAME).read_text())
    assert {s["path"] for s in again["skipped"]} == {f"{cls.name}/pipe.jpg", f"{cls.name}/zero.jpg"}


def test_max_bytes_accepts_suffixes(tmp_path, capsys):
    from pirl_fast.shard.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["a", "b"]).max_bytes == 256 << 20
    assert [parse(["a", "b", "--max-bytes", v]).max_bytes for v in ("1000", "64K", "256M", "2G", "3MiB")] == \
        [1000, 64 << 10, 256 << 20, 2 << 30, 3 << 20]
    with pytest.raises(SystemExit):
        parse(["a", "b", "--max-bytes", "lots"])
    assert "--max-bytes" in capsys.readouterr().err


# ------------------------------------------------------------------ nothing usable, empty classes

def test_a_source_with_nothing_usable_exits_2(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "x.jpg").write_bytes(b"not an image")
    assert main([str(src), str(tmp_path / "dst"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "nothing usable" in err and "cat/x.jpg: not an image" in err
    assert not (tmp_path / "dst").exists()


def test_classes_without_usable_images_keep_their_ids_with_a_warning(src, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(src, odd)
    (odd / "c05_broken").mkdir()
    (odd / "c05_broken" / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    (odd / "c06_empty").mkdir()
    dst = tmp_path / "dst"
    assert main([str(odd), str(dst), *ARGS, "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "warning: 2 class(es) have no usable image, so no samples: c05_broken, c06_empty" in err
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    assert manifest["classes"] == ["c00_stripes", "c01_checks", "c05_broken", "c06_empty"]
    assert manifest["num_samples"] == 12


# ------------------------------------------------------------------ full and read-only destinations

@contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (needs root's mount(2)); skips the test where it cannot be mounted."""
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_destination_stops_with_the_space_needed_and_resumes(src, clean, tmp_path, capsys):
    """A real tmpfs too small for the shards (half of what they need)."""
    need = sum(p.stat().st_size for p in clean.glob("shard-*"))
    with tmpfs(tmp_path / "small", f"size={need // 2 // 4096 * 4096}") as mnt:
        dst = mnt / "shards"
        args = [str(src), str(dst), *ARGS, "--workers", "1"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "no space left on device: need about" in err and f"MB in {dst}, have" in err, err
        assert "--resume" in err and "Traceback" not in err
        assert temp_files(dst) == [] and not (dst / MANIFEST_NAME).exists()
        subprocess.run(["mount", "-o", f"remount,size={4 * need // 4096 * 4096}", str(mnt)], check=True)
        assert main(args + ["--resume"]) == 0
        assert shard_bytes(dst) == shard_bytes(clean)


def test_no_space_in_the_middle_of_a_shard_is_reported_and_resumable(src, clean, tmp_path, monkeypatch, capsys):
    """ENOSPC raised by a write inside a shard (simulated: works without root)."""
    dst = tmp_path / "dst"
    real = shard_write.ShardWriter.add
    calls = []

    def add_or_fail(self, *a, **k):
        calls.append(1)
        if len(calls) == 8:  # the 2nd sample of shard 2
            raise OSError(errno.ENOSPC, "No space left on device", str(dst / ".shard-000002.tar.tmp"))
        return real(self, *a, **k)

    monkeypatch.setattr(shard_write.ShardWriter, "add", add_or_fail)
    args = [str(src), str(dst), *ARGS, "--workers", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no space left on device: need about" in err and f"(writing {dst}/.shard-000002.tar.tmp" in err
    assert "2 of 4 shards are finished and kept" in err and "--resume" in err
    assert temp_files(dst) == []
    monkeypatch.setattr(shard_write.ShardWriter, "add", real)
    assert main(args + ["--resume"]) == 0
    assert shard_bytes(dst) == shard_bytes(clean)


def test_a_run_that_will_not_fit_stops_after_its_first_shard(src, tmp_path, monkeypatch, capsys):
    """Free space below what the measured output/input ratio says the rest needs: stop before filling the disk."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    dst = tmp_path / "dst"
    assert main([str(src), str(dst), *ARGS, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "warning: this may not fit" in err  # before any write: from the input sizes
    assert "no space left on device: need about" in err and f"MB in {dst}, have 0.1 MB" in err
    assert "1 of 4 shards are finished and kept" in err
    assert [p.name for p in dst.glob("shard-*.tar")] == ["shard-000000.tar"]


@pytest.mark.parametrize("inside", [False, True])
def test_a_read_only_destination_exits_2_with_a_clear_message(src, tmp_path, capsys, inside):
    """As root chmod does not stop writes, so a read-only tmpfs stands in (skipped where it cannot be mounted)."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        dst = mnt / "shards" if inside else mnt
        assert main([str(src), str(dst), *ARGS, "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert "read-only file system: choose a DST on a writable filesystem" in err and "Traceback" not in err


# ------------------------------------------------------------------ what a refusal says

def test_refusals_say_what_the_destination_holds(src, clean, hooks, tmp_path, capsys):
    dst = tmp_path / "dst"
    args = [str(src), str(dst), *ARGS, "--workers", "1"]
    proc = subprocess.run([sys.executable, str(hooks), *args], capture_output=True, text=True, timeout=WAIT,
                          env={**os.environ, "KILL_SHARD": ".shard-000002.tar.tmp"})  # in-process: the sharder dies
    assert proc.returncode == -signal.SIGKILL
    assert main(args) == 2
    assert "holds an unfinished run of this same plan (interrupted after 2 of 4 shards): pass --resume" in \
        capsys.readouterr().err
    assert main([*args, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished run of a different plan (--seed 0 there, 1 now; 0 of its 2 finished shards" in err
    assert "--overwrite" in err
    finished = tmp_path / "finished"
    shutil.copytree(clean, finished)
    assert main([str(src), str(finished), "--samples-per-shard", "4", "--max-side", "0", "--workers", "1"]) == 2
    assert ("holds the finished shards of a different plan (--samples-per-shard 3 there, 4 now): pass --overwrite"
            in capsys.readouterr().err)
    changed = tmp_path / "changed"
    shutil.copytree(src, changed)
    opts = Options(src=str(changed), dst=str(tmp_path / "changed_shards"), samples_per_shard=3, max_side=0)
    run_shard(opts)
    with open(next(changed.rglob("*.JPEG")), "ab") as f:
        f.write(b"\0")  # one input one byte longer: same options, same file count
    with pytest.raises(SourceError, match="same options and file count, but input files changed since"):
        run_shard(opts)
