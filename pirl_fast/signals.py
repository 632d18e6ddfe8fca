"""Stopping on a signal: SIGTERM, SIGINT or SIGUSR1 become one checkpoint at a step boundary on every rank.

How a stop request travels:
    1. Any process of the job receives the signal: a rank (kill PID, SLURM, a cluster agent), the
       whole process group (Ctrl-C in a terminal, `kill -TERM -PGID`, SLURM signalling every
       process of a job step), or torchrun, which forwards SIGTERM / SIGINT (and SIGUSR1 when told
       to, below) to every rank it started.
    2. `StopRequest.handler`, on the main thread of a rank, only records the signal. DataLoader
       workers ignore the stop signals (`shield_worker`): the rank that owns them decides, and shuts
       them down after its checkpoint, instead of dying under it ("DataLoader worker is killed by
       signal"). DALI's threads never run Python signal handlers.
    3. The next `train_step` all-reduces one flag per stop signal together with the losses, so every
       rank learns at the same step that some rank was asked to stop, even a rank that got no signal.
    4. Every rank finishes that step, takes part in the checkpoint (its RNG states are gathered),
       rank 0 writes it, and every rank exits with 128 + the signal number (`STOP_SIGNALS` order
       decides when ranks got different signals).

Exit statuses of `python -m pirl_fast.train` (and of each rank under torchrun or srun):
    143 (128 + SIGTERM)  pre-emption, scancel, the end of a SLURM time limit, kill
    130 (128 + SIGINT)   Ctrl-C; a second Ctrl-C aborts without a checkpoint (not under torchrun,
                         whose forwarding delivers every Ctrl-C twice: there torchrun's SIGKILL after
                         --shutdown-timeout is the hard stop)
    138 (128 + SIGUSR1)  "checkpoint, then exit so the job can be requeued": SLURM's
                         `--signal=USR1@120` warning before the time limit (README, SLURM)
torchrun itself exits 1 whenever a rank exits non-zero or it was signalled (torch 2.14,
torch/distributed/elastic/agent/server/api.py: SignalException / ChildFailedError); the run's
summary.json records `stopped_by` for scripts that need to know why.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

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
            return  # the same signal again (torchrun's forwarded copy of a group signal): already acted on
        first = not self.received
        self.received.append(sig)
        if first:
            hint = "" if under_torchrun() or sig != signal.SIGINT else " (Ctrl-C again to abort without a checkpoint)"
            # os.write, not print: a print here can collide with a print the signal interrupted.
            os.write(2, f"\n{self.prefix}{sig.name} received: {WHAT_HAPPENS[sig]}{hint}\n".encode())

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
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
