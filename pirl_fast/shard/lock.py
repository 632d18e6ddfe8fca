"""One sharder per destination: an exclusive lock on every folder a `pirl_fast.shard` run writes.

Two sharders writing one DST overwrite each other's temp files and shift each other's sample indices
(the second may even exit 0 over broken shards). So every run holds, for its whole length (scan,
shards, manifest; with --resume too), flock(LOCK_EX) on DST/.pirl_fast-shard.lock and on that file in
each DST/<split>/ it writes or removes; a second run is refused at once (exit 2), naming the holder
(pid, host, start time, command) the lock file records. What the kernel's lock guarantees and what it
does not (NFS, Lustre, --no-lock): shards/README.md ("One sharder per destination").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".pirl_fast-shard.lock"
# flock errors that mean "this filesystem does not do locks", not "someone else holds it".
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class LockError(Exception):
    """DST is locked by another sharder, or cannot be locked (exit code 2); the message says what to do."""


@dataclass
class _Held:
    fd: int
    count: int  # nested holds in this process (main() locks DST before the scan, run_shard again)
    created: list[Path]  # folders this lock made, removed again on release when left empty


_held: dict[str, _Held] = {}  # real path of a locked folder -> its lock, for this process


def _holder(fd: int) -> str:
    """The holder's details as written into the lock file, for the refusal message."""
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0).decode())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return (f"pid {info['pid']} on host {info['host']}, started {started} "
                f"({(time.time() - info['started']) / 60:.0f} min ago), command: {info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet (it has just started)"


def _new_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, innermost first."""
    missing = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing


def _acquire(folder: Path) -> None:
    created = _new_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(folder)
        if key in _held:
            _held[key].count += 1
            return
        path = os.path.join(key, LOCK_NAME)
        fd = _lock(folder, path)
    except BaseException:
        _remove_empty(created)
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": shlex.join(getattr(sys, "orig_argv", sys.argv))}
    with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, a second run just cannot name us
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = _Held(fd, 1, created)


def _lock(folder: Path, path: str) -> int:
    """An fd of `path` holding flock(LOCK_EX); raises LockError when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockError(f"{folder} is being written by another sharder: {holder}. Two sharders writing one "
                            "destination corrupt each other's shards: wait for it to finish (or stop it), or "
                            "choose another DST") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _UNSUPPORTED:
                raise
            os.unlink(path)  # no process can lock on this filesystem, so the file is nobody's
            raise LockError(f"cannot lock {path} ({e.strerror}): this filesystem does not support flock (Lustre "
                            "mounted without `-o flock`, NFSv3 without a reachable lock daemon?). Shard onto a local "
                            "disk and copy, mount with locking, or pass --no-lock if you are sure no other sharder "
                            "writes there") from e
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)  # the previous holder removed the file between our open and our flock: lock the new one


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:  # innermost first
        try:
            p.rmdir()
        except OSError:
            return  # not empty (or gone): leave it and its parents


def _release(folder: Path) -> None:
    key = os.path.realpath(folder)
    held = _held[key]
    held.count -= 1
    if held.count:
        return
    del _held[key]
    with contextlib.suppress(OSError):  # unlinked while still held: a waiting opener re-checks the inode
        os.unlink(os.path.join(key, LOCK_NAME))
    os.close(held.fd)
    _remove_empty(held.created)


@contextmanager
def hold(folders: Iterable[str | os.PathLike], enabled: bool = True) -> Iterator[None]:
    """Lock each folder (made if missing) for the block, in the order given; raises LockError at the
    first one another process holds, releasing those already taken. Re-entrant within a process.
    enabled=False (--no-lock): no lock at all."""
    with ExitStack() as stack:
        if enabled:
            for folder in folders:
                folder = Path(folder)
                _acquire(folder)
                stack.callback(_release, folder)
        yield
