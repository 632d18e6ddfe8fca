"""Stopping on a signal: SIGTERM, SIGINT or SIGUSR1 become one checkpoint at a step boundary on every rank.

Who receives what (a rank, the process group, every process of a SLURM job, torchrun and what it
forwards) and the exit statuses (128 + the signal: 143, 130, 138): README.md, "Signals" and "SLURM";
torchrun's side was read in torch 2.14's torch/distributed/elastic/multiprocessing/api.py,
subprocess_handler/subprocess_handler.py and agent/server/api.py. How a stop request travels:
    1. `StopRequest.handler`, on the main thread of a rank, only records the signal. DataLoader
       workers ignore the stop signals (`shield_worker`): the rank that owns them decides, and shuts
       them down after its checkpoint, instead of dying under it ("DataLoader worker is killed by
       signal"). DALI's threads never run Python signal handlers. Under torchrun a rank also gets a
       SIGTERM when torchrun dies (`stop_with_launcher`), e.g. of a SIGUSR1 it does not handle.
    2. The next `train_step` all-reduces one flag per stop signal together with the losses, so every
       rank learns at the same step that some rank was asked to stop, even a rank that got no signal.
    3. Every rank finishes that step, takes part in the checkpoint (its RNG states are gathered),
       rank 0 writes it, and every rank exits with 128 + the signal number (`STOP_SIGNALS` order
       decides when ranks got different signals); summary.json records `stopped_by`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Priority order: when ranks received different signals, the first of these that any rank got is
# the one acted on (termination outranks an interactive stop, which outranks a requeue request).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
WHAT_HAPPENS = {
    signal.SIGTERM: "checkpointing at the end of this step, then exiting with 143",
    signal.SIGINT: "checkpointing at the end of this step, then exiting with 130",
    signal.SIGUSR1: "checkpointing at the end of this step, then exiting with 138 so the job can be requeued",
}


def under_torchrun() -> bool:
    """True in a process started by torchrun (its elastic agent sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_launcher() -> None:
    """Under torchrun on Linux: ask the kernel for a SIGTERM when torchrun dies (killed, out of
    memory, or a signal it does not handle), so that the rank checkpoints and exits instead of
    training on, orphaned. Not for plain `python -m` runs, whose parent is a shell that may
    legitimately exit first (nohup)."""
    if under_torchrun() and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def exit_status(sig: signal.Signals) -> int:
    """The shell's status for "stopped by `sig`": 128 + its number."""
    return 128 + int(sig)


class StopRequest:
    """The stop signals this process received, in arrival order; set from a signal handler."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.received: list[signal.Signals] = []
        self.prefix = f"[rank {rank}] " if world_size > 1 else ""

    def flags(self) -> list[float]:
        """One 0/1 per STOP_SIGNALS: what this rank contributes to the step's all-reduce."""
        return [float(s in self.received) for s in STOP_SIGNALS]

    @staticmethod
    def decide(flags: list[float]) -> signal.Signals | None:
        """The signal to act on, from all-reduced `flags` (any rank > 0), or None: keep training."""
        return next((s for s, f in zip(STOP_SIGNALS, flags) if f > 0), None)

    def handler(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        if sig in self.received:
            if sig == signal.SIGINT and not under_torchrun():
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
            return  # a copy (SLURM signals every process, torchrun forwards it too): already acted on
        first = not self.received
        self.received.append(sig)
        if first:
            hint = "" if under_torchrun() or sig != signal.SIGINT else " (Ctrl-C again to abort without a checkpoint)"
            # os.write, not print: a print here can collide with a print the signal interrupted.
            os.write(2, f"\n{self.prefix}{sig.name} received: {WHAT_HAPPENS[sig]}{hint}\n".encode())

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle STOP_SIGNALS with `handler` inside the block (main thread only: elsewhere, e.g. a
        notebook's worker thread, Python cannot install handlers and the block runs without)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self.handler) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@contextmanager
def blocked() -> Iterator[None]:
    """Hold STOP_SIGNALS back on this thread inside the block; they are delivered when it ends.

    Wrap the start of worker processes in it: a fork inherits the blocked mask, so no stop signal
    reaches a worker before `shield_worker` has installed its own dispositions."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def shield_worker(closing, worker_id: int | None = None) -> None:
    """Stop-signal dispositions for a DataLoader worker: worker_init_fn=functools.partial(shield_worker, closing).

    SIGINT and SIGUSR1 are ignored; SIGTERM is ignored until `closing` (a shared-memory flag the
    loader sets when it shuts down) is set, so the loader's own terminate() of a worker that does not
    exit in time still works. Then the signals blocked by `blocked()` are let through."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def on_sigterm(signum, frame):
        if bool(closing):
            os._exit(exit_status(signal.SIGTERM))

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
