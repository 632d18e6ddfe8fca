"""Crash-safe file writes: a reader sees either the old file or the complete new one, never a
torn write (temp file in the same directory, fsync, rename, fsync the directory).

Used for checkpoints, shard manifests and benchmark results. `require_free_space` refuses a
write of known size up front with "no space left on device: need about N MB in DIR, have M MB".
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", perms: int = 0o644) -> Iterator[IO]:
    """`with atomic_write(path, "w") as f: f.write(...)`: `path` appears only once the block ends
    without an exception; on an exception the temp file is removed and `path` is left alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


class NoSpaceError(OSError):
    """Not enough free space for a write whose size is known (errno ENOSPC); str() is the message."""

    def __str__(self) -> str:
        return self.strerror


def no_space_message(directory: str | os.PathLike, need_bytes: int) -> str:
    """'no space left on device: need about N MB in DIR, have M MB' (free space as an unprivileged user sees it)."""
    free = shutil.disk_usage(directory).free
    return f"no space left on device: need about {need_bytes / 1e6:.1f} MB in {directory}, have {free / 1e6:.1f} MB"


def require_free_space(directory: str | os.PathLike, need_bytes: int) -> None:
    """Raise NoSpaceError (no_space_message) before a write of about `need_bytes` into `directory`
    when its filesystem has less free; the caller decides how much margin `need_bytes` includes."""
    if shutil.disk_usage(directory).free < need_bytes:
        raise NoSpaceError(errno.ENOSPC, no_space_message(directory, need_bytes))
