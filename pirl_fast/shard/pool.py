"""The sharder's worker processes: one task (one shard) at a time each; a worker that dies fails the run.

multiprocessing.Pool hangs for ever when one of its workers is killed (the OOM killer's SIGKILL):
the task that worker held is lost, the pool starts a replacement and waits for a result that never
comes. Here every worker has its own pipe, and the main process waits on the pipes and on the
workers' process sentinels together, so a death is seen at once and raised as WorkerDied.

Workers are spawned (not forked: the parent may hold threads and a tqdm bar), ignore SIGINT (Ctrl-C
reaches the whole process group; the main process stops them itself), and on Linux ask the kernel
to SIGKILL them when the main process dies, so no orphan keeps writing temp files into DST after a
`kill -9` of the sharder.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from typing import Any

PR_SET_PDEATHSIG = 1  # prctl(2) option: signal this process when its parent dies


class WorkerDied(Exception):
    """A worker process died while the run needed it (killed, or crashed in C code)."""


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux: workers still end when their pipe closes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker(conn, fn: Callable[[Any], Any], parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    while True:
        try:
            item = conn.recv()
        except EOFError:  # the main process closed the pipe
            return
        if item is None:
            return
        t, task = item
        try:
            conn.send((t, True, fn(task)))
        except Exception as e:  # noqa: BLE001 -- handed to the main process, which re-raises it
            try:
                conn.send((t, False, e))
            except Exception:  # noqa: BLE001 -- an exception that does not pickle: send its text
                conn.send((t, False, RuntimeError(traceback.format_exc())))


def run_tasks(fn: Callable[[Any], Any], tasks: list[Any], workers: int,
              describe: Callable[[int], str] = str) -> Iterator[tuple[int, Any]]:
    """Yield (t, fn(tasks[t])) as tasks complete, in any order, run by up to `workers` processes.

    `fn` must be importable by name (spawned workers unpickle it). An exception raised by fn is
    re-raised here; a worker that dies raises WorkerDied naming the task it held (`describe(t)`).
    Workers are stopped when the generator finishes, raises or is closed."""
    ctx = multiprocessing.get_context("spawn")
    procs, conns, busy = [], [], {}
    todo = iter(range(len(tasks)))

    def give(w: int) -> None:
        t = next(todo, None)
        busy.pop(w, None)
        if t is not None:
            try:
                conns[w].send((t, tasks[t]))
            except OSError:  # the worker died after its last result
                raise WorkerDied(_death(procs[w], describe(t))) from None
            busy[w] = t

    finished = False
    try:
        for w in range(min(workers, len(tasks))):
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child_end, fn, os.getpid()), daemon=True,
                            name=f"pirl_fast.shard worker {w}")
            p.start()
            child_end.close()
            procs.append(p)
            conns.append(parent_end)
            give(w)
        while busy:
            ready = wait([conns[w] for w in busy] + [procs[w].sentinel for w in busy])
            for w in list(busy):
                if conns[w] in ready:
                    try:
                        t, ok, result = conns[w].recv()
                    except EOFError:  # died mid-send: its sentinel says how
                        raise WorkerDied(_death(procs[w], describe(busy[w]))) from None
                    if not ok:
                        raise result
                    give(w)
                    yield t, result
                elif procs[w].sentinel in ready:
                    raise WorkerDied(_death(procs[w], describe(busy[w])))
        finished = True
    finally:  # all done: idle workers are told to exit; otherwise (an error, Ctrl-C) they are stopped now
        for c, p in zip(conns, procs):
            try:
                c.send(None) if finished else p.terminate()
            except OSError:
                pass
        for p in procs:
            p.join(timeout=10)
            if p.exitcode is None:
                p.kill()
                p.join()
        for c in conns:
            c.close()


def _death(proc, what: str) -> str:
    """Why the worker `proc` (dead or dying) ended, waiting for its exit status."""
    proc.join()
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name} (signal {-code})"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    hint = (" -- SIGKILL is what the Linux OOM killer sends: check `dmesg | grep -i oom`, and lower --workers "
            "if memory is short" if code == -signal.SIGKILL else "")
    return f"worker process {proc.pid} {how} while writing {what}{hint}"
