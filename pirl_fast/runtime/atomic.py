"""Crash-safe file writes: a reader sees either the old file or the complete new one, never a
torn write (temp file in the same directory, fsync, rename, fsync the directory).

Used for checkpoints, shard manifests and benchmark results.

Temp files are named `.NAME.HOST.PID.XXXXXXXX.tmp` (NAME the target's name, HOST this machine,
PID the writing process, XXXXXXXX mkstemp's random part). A process killed mid-write leaves one
behind; `remove_stale_temp_files` deletes those whose writer is gone, and nothing else.
`require_free_space` refuses a write of known size up front with "no space left on device: need
about N MB in DIR, have M MB".
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"  # no dots: they separate the name's fields
# Our temp names; before the writer's host and pid were part of the name they were `.NAME.XXXXXXXX.tmp`.
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
OLD_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
# A temp file nobody has written to for this long has no live writer (a write keeps its mtime fresh):
# the rule for the files whose writer cannot be asked (another host's, or names without a pid).
STALE_AFTER_S = 3600
MB = 1 << 20


class NoSpaceError(OSError):
    """Not enough free space for a write whose size is known (errno ENOSPC); str() is the message."""

    def __init__(self, folder: str | os.PathLike, need: int, free: int, hint: str = "", during: str = ""):
        super().__init__(errno.ENOSPC, space_message(folder, need, free, during) + hint)

    def __str__(self) -> str:
        return self.strerror


def space_message(folder: str | os.PathLike, need: int, free: int, during: str = "") -> str:
    """'no space left on device: need about N MB in DIR, have M MB free'."""
    return f"no space left on device{during}: need about {_mb(need)} MB in {folder}, have {_mb(free)} MB free"


def _mb(n: int) -> str:
    """Whole MiB, or tenths below one MiB (so a nearly full disk does not read 'have 0 MB')."""
    return f"{n / MB:,.0f}" if n >= MB else f"{n / MB:.1f}"


def no_space_message(folder: str | os.PathLike, need: int) -> str:
    """space_message with the free space `folder`'s filesystem has now."""
    return space_message(folder, need, shutil.disk_usage(folder).free)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", perms: int = 0o644) -> Iterator[IO]:
    """`with atomic_write(path, "w") as f: f.write(...)`: `path` appears only once the block ends
    without an exception; on an exception the temp file is removed and `path` is left alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{HOST}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, perms)  # mkstemp makes 0600; these files are meant for every reader
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def require_free_space(folder: str | os.PathLike, need: int, hint: str = "") -> None:
    """Raise NoSpaceError before a write of about `need` bytes into `folder` that cannot fit."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise NoSpaceError(folder, need, free, hint)


def is_no_space(error: BaseException) -> bool:
    """Whether ENOSPC is anywhere in `error`'s chain (torch.save reports it as a RuntimeError,
    "unexpected pos", with the OSError only as its context)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def remove_stale_temp_files(folder: str | os.PathLike) -> list[tuple[Path, int]]:
    """Delete temp files of `atomic_write` in `folder` whose writer is gone; returns (path, bytes) of each.

    Gone: written on this host by a process that no longer exists, or (another host's, or an older
    name without host and pid) untouched for STALE_AFTER_S. Files that do not match our temp-name
    pattern are never touched, nor those of a live process writing into the same folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = TEMP_NAME.match(path.name)
        if match is None and OLD_TEMP_NAME.match(path.name) is None:
            continue
        try:
            stat = path.stat()
            if match is not None and match["host"] == HOST:
                stale = not process_exists(int(match["pid"]))
            else:
                stale = time.time() - stat.st_mtime > STALE_AFTER_S
            if stale and path.is_file():
                path.unlink()
                removed.append((path, stat.st_size))
        except FileNotFoundError:
            continue  # its writer finished (renamed it) or another cleaner got there first
    return removed


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def write_json(path: str | os.PathLike, payload: Any, indent: int = 1) -> None:
    """JSON to `path`, atomically, with a final newline."""
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=indent)
        f.write("\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

