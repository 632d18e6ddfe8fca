"""Seeing what training does: where the time goes, and where the numbers are written.

`StepClock` splits each step's wall time into phases (data wait, forward+backward+optimiser
step, bank update, checkpoint; the rest is "other": LR, logging, Python). It never makes the host
wait for the GPU (trainer.sync_timing=false, the default):
  - on the CPU every phase is host time (time.perf_counter);
  - on CUDA, data and checkpoint are host time (the host blocked on the loader; a synchronous
    save), while compute and bank are GPU time: CUDA events recorded on the current stream at
    the phase's start and end, read once they have completed (Event.query, which does not wait),
    at the end of a later step. An interval's compute and bank figures are therefore those of the
    steps whose events had completed by then (usually all but the newest one or two, which count
    in the next interval); the run's summary waits for the last events once, after training.
With sync=True (trainer.sync_timing=true) it instead calls torch.cuda.synchronize at the end of
every phase and charges host time: an exact host-side split, at the price of three device-wide
syncs per step that also wait on DALI's prefetch.

`MetricsLogger` is rank 0's output: one JSON object per line in run_dir/metrics.jsonl, the same
scalars in TensorBoard (run_dir/tb), and a tqdm bar on a terminal; a plain line per log interval
instead when stderr is a file or a pipe (a SLURM log) or with trainer.progress=false. On other
ranks every method is a no-op, so the loop calls it unconditionally.

metrics.jsonl fields: README.md (the run directory's files) and loop.py `log_interval`; knn_top1 and
knn_time_s only in the lines of the steps the kNN monitor scored (pirl_fast/train/knn_monitor.py). The losses
are means over the interval's steps, averaged over ranks; lr is the last step's; corrupt_skipped
counts since this process started. A resumed run appends: steps logged after the last checkpoint of
a crashed run appear twice (the later line is the one the resumed run computed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pirl_fast.runtime.progress import is_terminal
from pirl_fast.runtime.progress import progress as progress_bar

PHASES = ("data", "compute", "bank", "checkpoint")
DEVICE_PHASES = ("compute", "bank")  # on CUDA without sync: timed by CUDA events (GPU time)


class StepClock:
    """Per-phase wall time, for the current log interval and for the whole run (after warm-up)."""

    def __init__(self, device: torch.device, sync: bool, warmup_steps: int):
        self.sync = sync and device.type == "cuda"
        self.events = device.type == "cuda" and not sync  # compute and bank by CUDA events
        self.device = device
        self.warmup_steps = warmup_steps
        self.steps_seen = 0
        self.interval = self._zero()
        self.total = self._zero()
        self._pending: list[tuple] = []  # (phase, start, end, counts in total) of closed steps, unread
        self.restart()

    @staticmethod
    def _zero() -> dict[str, float]:
        return {**{p: 0.0 for p in PHASES}, "wall": 0.0, "samples": 0, "steps": 0}

    def restart(self) -> None:
        """Start timing the next step from now (after set-up, resume, or a pause)."""
        self._step = {p: 0.0 for p in PHASES}
        self._step_events: list[tuple] = []  # (phase, start, end) of the step in progress
        self._step_start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time spent inside the `with` block (GPU time for compute and bank on CUDA) to `name`."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
        start = self._record() if self.events and name in DEVICE_PHASES else None
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            if start is None:
                self._step[name] += time.perf_counter() - t0
            else:
                self._step_events.append((name, start, self._record()))

    def _record(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def end_step(self, samples: int) -> None:
        """Close the step: `samples` is the global number of samples it processed."""
        now = time.perf_counter()
        step = {**self._step, "wall": now - self._step_start, "samples": samples, "steps": 1}
        self.steps_seen += 1
        counted = self.steps_seen > self.warmup_steps
        targets = [self.interval] + ([self.total] if counted else [])
        for acc in targets:
            for key, value in step.items():
                acc[key] += value
        self._pending += [(name, start, end, counted) for name, start, end in self._step_events]
        self._read_events(wait=False)
        self.restart()

    def _read_events(self, wait: bool) -> None:
        """Add the GPU time of completed phases (all of them with wait=True) to the accumulators."""
        while self._pending:
            name, start, end, counted = self._pending[0]
            if wait:
                end.synchronize()
            elif not end.query():  # recorded in stream order: the later ones are not done either
                return
            seconds = start.elapsed_time(end) / 1e3
            self.interval[name] += seconds
            if counted:
                self.total[name] += seconds
            self._pending.pop(0)

    def take_interval(self) -> dict[str, float]:
        """The figures of the steps since the last call (rates and shares), then start a new interval."""
        self._read_events(wait=False)
        stats = self._rates(self.interval)
        self.interval = self._zero()
        return stats

    def summary(self) -> dict[str, Any]:
        """Run totals after warm-up: samples/s, data-wait share, and the time split by phase (after
        training: on CUDA it waits for the last steps' timing events)."""
        self._read_events(wait=True)
        stats = self._rates(self.total)
        wall = self.total["wall"]
        split = {p: self.total[p] for p in PHASES}
        split["other"] = max(0.0, wall - sum(split.values()))
        return {
            "steps_timed": int(self.total["steps"]),
            "warmup_steps_excluded": min(self.steps_seen, self.warmup_steps),
            "samples_timed": int(self.total["samples"]),
            "wall_s": wall,
            "samples_per_s": stats["samples_per_s"],
            "data_wait_share": stats["data_wait_share"],
            "time_s": split,
            "time_share": {p: (t / wall if wall > 0 else 0.0) for p, t in split.items()},
        }

    @staticmethod
    def _rates(acc: dict[str, float]) -> dict[str, float]:
        wall = acc["wall"]
        return {
            "samples_per_s": acc["samples"] / wall if wall > 0 else 0.0,
            "data_wait_share": acc["data"] / wall if wall > 0 else 0.0,
            "step_time_s": wall / acc["steps"] if acc["steps"] else 0.0,
        }


def format_summary(s: dict[str, Any]) -> str:
    """The end-of-run summary (train.make_summary) in two lines for people."""
    split = ", ".join(f"{phase} {s['time_share'][phase]:.0%}" for phase in s["time_s"])
    graph = " (its CPU graph)" if s["backend"] == "dali" and s["device"] == "cpu" else ""
    return (f"done ({s['stopped_by']}) at step {s['step']}, epoch {s['epoch']}: {s['samples_per_s']:.1f} samples/s "
            f"over {s['steps_timed']} timed steps ({s['warmup_steps_excluded']} warm-up left out) on "
            f"{s['world_size']} x {s['device']}, data.backend={s['backend']}{graph}; "
            f"data wait {s['data_wait_share']:.0%}; time: {split}\n"
            f"checkpoint: {s['checkpoint']}")


def gpu_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last call (GiB); 0 on the CPU."""
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


class MetricsLogger:
    """metrics.jsonl + TensorBoard + tqdm, on rank 0 only (a no-op elsewhere)."""

    def __init__(self, run_dir: str | Path, enabled: bool, progress: bool, total_steps: int, initial_step: int):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # appended to on resume
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

        self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=initial_step or None)
        self.total_steps = total_steps
        self.knn = ""  # the last kNN top-1 (trainer.knn_every), shown on the progress line until the next one
        # A bar only where it can redraw in place; otherwise (trainer.progress=false, a pipe, a SLURM log)
        # one plain line per log interval, so a run is never silent until its end.
        if progress and is_terminal():
            self.bar = progress_bar(total=total_steps, initial=initial_step, unit="step")
        self.plain = self.bar is None

    def log(self, record: dict[str, Any]) -> None:
        """One JSON line; numeric fields also go to TensorBoard under train/<key>, at record['step']."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"train/{key}", value, step)
        if "knn_top1" in record:
            self.knn = f"{record['knn_top1']:.2%}"
        if self.plain:
            knn = f"  knn top-1 {self.knn}" if "knn_top1" in record else ""
            print(f"step {step}/{self.total_steps}  loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
                  f"{record['samples_per_s']:.1f} samples/s  data wait {record['data_wait_share']:.0%}{knn}",
                  flush=True)
        else:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}",
                                 samples_s=f"{record['samples_per_s']:.1f}", **({"knn": self.knn} if self.knn else {}),
                                 refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        """A line for people, printed without breaking the progress bar (rank 0 only)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        self.bar = self.tb = self.jsonl = None
