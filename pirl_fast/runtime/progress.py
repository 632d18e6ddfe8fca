"""Progress for people: a tqdm bar on a terminal, a few plain lines when the output is a file or a pipe.

    for images, labels in progress(loader, desc="features: train", unit="batch"):
        ...
    bar = progress(total=steps, desc="linear probes", unit="step")
    bar.update(1); bar.set_postfix(loss="0.31"); bar.close()

On a terminal (stderr is a TTY) this is tqdm. Otherwise (`| tee log`, `> log 2>&1`, a SLURM log, a
test) a bar would be hundreds of carriage-return frames joined into one long line, so it is
`PlainProgress` instead: one line every PLAIN_EVERY_S seconds while the work lasts, and one at the end
when it took at least PLAIN_MIN_S ("features: train: 48/48 batch in 12.3 s (3.9 batch/s), loss=0.31").
Both write to stderr, as tqdm does. The trainer's own per-interval lines use `is_terminal` too
(pirl_fast/train/metrics.py); the sharder, eval and bench use `progress`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

PLAIN_EVERY_S = 30.0  # a line at most this often: a 1-hour feature extraction logs ~120 lines
PLAIN_MIN_S = 2.0  # work done sooner than this prints nothing (a scan of three shards is not news)


def is_terminal(stream=None) -> bool:
    """True when `stream` (default stderr, where bars go) is a TTY that can redraw a bar in place."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, leave: bool = True, enabled: bool = True):
    """A tqdm bar on a terminal, else a PlainProgress; with enabled=False a silent one (tqdm disabled).

    Accepts what our callers pass to tqdm: iterate it, or update(n) / set_postfix(**kw) / write(text) /
    close() it; it is also a context manager."""
    from tqdm import tqdm  # imported here: pirl_fast.report and the sharder's workers import this module cheaply

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if is_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)


class PlainProgress:
    """tqdm's interface as plain lines on stderr: at most one per PLAIN_EVERY_S, and a last one at
    close() when the work took PLAIN_MIN_S or more."""

    disable = False

    def __init__(self, iterable: Iterable | None = None, *, total: int | None, desc: str, unit: str,
                 initial: int = 0, stream=None):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = initial
        self.initial = initial
        self.postfix: dict[str, Any] = {}
        self.stream = stream
        self.start = self.last_line = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_line >= PLAIN_EVERY_S and not (self.total and self.n >= self.total):  # the end: close()
            self.last_line = now
            self._line(now)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = {k: v for k, v in values.items()}

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def write(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        if now - self.start >= PLAIN_MIN_S or self.last_line > self.start:
            self._line(now, final=True)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = now - self.start
        done = self.n - self.initial
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total and not final else ""
        rate = f", {done / elapsed:.3g} {self.unit}/s" if elapsed > 0 and done else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        when = f"in {elapsed:.1f} s" if final else f"after {elapsed:.0f} s"
        self.write(f"{self.desc + ': ' if self.desc else ''}{count} {self.unit}{share} {when}{rate}{extra}")
