"""Stop signals the way clusters send them (pirl_fast/runtime/signals.py): to the process group (which, as
torchrun starts each rank in a session of its own, reaches torchrun alone, and torchrun forwards
it to each rank's group), to every process of the job (SLURM's cgroup tracking: each rank then
gets it twice), to torchrun alone, or to one rank; with DataLoader workers and DALI threads running.

Each case starts a real `torchrun --nproc_per_node=2` (gloo on the CPU) or `python -m
pirl_fast.train`, waits until a step is logged (the run is past start-up, its DataLoader workers
are up), sends the signal, and checks: one checkpoint, written at the step every rank stopped at
and holding both ranks' RNG states; the exit status (128 + signal for the trainer; 1 for torchrun,
which reports any stopped or failed rank that way); no worker process left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pirl_fast.runtime.signals import STOP_SIGNALS, StopRequest, exit_status
from pirl_fast.train import checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=smoke", "trainer.progress=false", "data.image_size=32", "data.patch_crop_size=30",
        "data.patch_size=8", "data.batch_size=4", "bank.num_negatives=64", "data.synthetic_samples=64",
        "trainer.epochs=1000", "trainer.max_steps=100000", "trainer.ckpt_every=0", "trainer.ckpt_epoch_end=false",
        "trainer.log_every=1"]
BACKENDS = {"synthetic": ["data.backend=synthetic"], "torch-2-workers": ["data.backend=torch", "data.workers=2"],
            "dali": ["data.backend=dali", "data.workers=1"]}
READY_S, EXIT_S = 300, 240  # generous: a loaded 2-core machine; nothing here is a timing assertion


# ---------------------------------------------------------------------------------------------- the handler
def test_ranks_agree_on_the_signal_to_act_on():
    """The all-reduced flags are means over ranks: any rank's signal counts, in STOP_SIGNALS order."""
    assert StopRequest.decide([0.0, 0.0, 0.0]) is None
    assert StopRequest.decide([0.0, 0.0, 0.5]) == signal.SIGUSR1  # one of two ranks got the requeue signal
    assert StopRequest.decide([0.5, 0.0, 0.5]) == signal.SIGTERM  # termination outranks it
    assert [exit_status(s) for s in STOP_SIGNALS] == [143, 130, 138]


def test_repeated_signals_never_lose_the_checkpoint_under_torchrun(monkeypatch):
    """torchrun forwards a group's Ctrl-C, so each rank sees SIGINT twice: only outside torchrun
    does a second one mean "abort now"."""
    stop = StopRequest()
    stop.handler(signal.SIGTERM, None)
    stop.handler(signal.SIGTERM, None)
    stop.handler(signal.SIGUSR1, None)
    assert stop.received == [signal.SIGTERM, signal.SIGUSR1] and stop.flags() == [1.0, 0.0, 1.0]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    stop.handler(signal.SIGINT, None)
    stop.handler(signal.SIGINT, None)
    assert stop.flags() == [1.0, 1.0, 1.0]
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    with pytest.raises(KeyboardInterrupt):
        stop.handler(signal.SIGINT, None)


# ---------------------------------------------------------------------------------------------- real processes
def launch(tmp_path: Path, backend: str, shards: Path | None, torchrun: bool, forward_usr1: bool = True,
           ) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / "run"
    overrides = [*TINY, *BACKENDS[backend], f"hydra.run.dir={run_dir}"]
    if shards is not None:
        overrides.append(f"data.shards={shards}")
    if torchrun:
        # SIGUSR1 is not among torchrun's default signals_to_handle: without it, torchrun dies of it.
        forward = ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"] if forward_usr1 else []
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", *forward,
               "-m", "pirl_fast.train", *overrides]
    else:
        cmd = [sys.executable, "-m", "pirl_fast.train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a job's
    deadline = time.monotonic() + READY_S
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):  # the ready marker: step 1 logged
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step logged (exit {proc.poll()}):\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.2)
    return proc, run_dir


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rank_pid(torchrun_pid: int, rank: int) -> int:
    for pid in children(torchrun_pid):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    raise AssertionError(f"no rank {rank} among torchrun's children")


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_and_check(proc: subprocess.Popen, run_dir: Path, target: str, sig: signal.Signals, ranks: int,
                   returncode: int | None = None, acted_on: signal.Signals | None = None) -> str:
    """Send `sig` to `target` ("group", "every" process of the run, the "launcher", one "rank"), then
    check the exit status (default: 1 for torchrun, 128 + sig otherwise) and what the ranks acted on."""
    if target == "group":
        os.killpg(proc.pid, sig)
    elif target == "every":
        for pid in processes_mentioning(str(run_dir)):  # torchrun, the ranks, their DataLoader workers
            os.kill(pid, sig)
    elif target == "launcher":
        proc.send_signal(sig)
    else:
        os.kill(rank_pid(proc.pid, 1), sig)
    try:
        output, _ = proc.communicate(timeout=EXIT_S)
    finally:
        proc.kill()
    acted_on = acted_on or sig
    expected = returncode if returncode is not None else 1 if ranks > 1 else exit_status(sig)
    assert proc.returncode == expected, output[-4000:]
    assert "killed by signal" not in output and "KeyboardInterrupt" not in output, output[-4000:]
    assert f"{acted_on.name} received" in output, output[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    (path,) = checkpoint.list_checkpoints(run_dir)  # ckpt_every=0: the signal's checkpoint and no other
    state = checkpoint.load(path)
    assert summary["stopped_by"] == acted_on.name and summary["step"] == state["step"] >= 1
    assert summary["checkpoint"] == str(path) and len(state["rng"]) == ranks  # every rank's RNG states
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    deadline = time.monotonic() + 30
    while processes_mentioning(str(run_dir)):  # ranks and DataLoader workers: all gone
        assert time.monotonic() < deadline, f"left running: {processes_mentioning(str(run_dir))}"
        time.sleep(0.5)
    return output


@pytest.mark.parametrize("backend, target, sig", [
    ("torch-2-workers", "group", signal.SIGTERM),  # kill -TERM -PGID: torchrun killpg()s each rank's workers too
    ("dali", "every", signal.SIGINT),  # SLURM signalling every process: each rank gets it twice
    ("torch-2-workers", "rank", signal.SIGUSR1),  # one rank: the all-reduced flag stops the other too
])
def test_torchrun_two_ranks_stop_at_one_step_with_one_checkpoint(tmp_path, sample_shards, backend, target, sig):
    proc, run_dir = launch(tmp_path, backend, None if backend == "synthetic" else sample_shards, torchrun=True)
    output = stop_and_check(proc, run_dir, target, sig, ranks=2)
    if target == "rank":  # torchrun reports the ranks' own status before its own 1
        assert f"exitcode: {exit_status(sig)}" in output, output[-4000:]


def test_ranks_stop_when_torchrun_dies_of_a_signal_it_does_not_forward(tmp_path):
    """Plain torchrun and SLURM's --signal=USR1 sent to it alone: torchrun dies of SIGUSR1 (not in
    its default --signals-to-handle); its ranks get SIGTERM from the kernel (stop_with_launcher)
    and checkpoint instead of training on, orphaned."""
    proc, run_dir = launch(tmp_path, "synthetic", None, torchrun=True, forward_usr1=False)
    stop_and_check(proc, run_dir, "launcher", signal.SIGUSR1, ranks=2, returncode=-signal.SIGUSR1,
                   acted_on=signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["synthetic", "torch-2-workers", "dali"])
@pytest.mark.parametrize("target, sig", [("group", signal.SIGTERM), ("every", signal.SIGUSR1),
                                         ("launcher", signal.SIGINT), ("rank", signal.SIGTERM)])
def test_torchrun_every_backend_and_target(tmp_path, sample_shards, backend, target, sig):
    proc, run_dir = launch(tmp_path, backend, None if backend == "synthetic" else sample_shards, torchrun=True)
    stop_and_check(proc, run_dir, target, sig, ranks=2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_one_process_with_workers_stops_on_a_group_signal_and_resumes(tmp_path, sample_shards, sig):
    """python -m pirl_fast.train with 2 DataLoader workers, the signal to its process group: exit
    128 + signal (143, or 138 for the requeue signal) and a checkpoint the same command resumes from."""
    proc, run_dir = launch(tmp_path, "torch-2-workers", sample_shards, torchrun=False)
    stop_and_check(proc, run_dir, "group", sig, ranks=1)
    step = checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])["step"]
    resumed = subprocess.run(
        [sys.executable, "-m", "pirl_fast.train", *TINY, *BACKENDS["torch-2-workers"], f"data.shards={sample_shards}",
         f"hydra.run.dir={run_dir}", f"trainer.max_steps={step + 1}"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=EXIT_S)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["step"] == step + 1
