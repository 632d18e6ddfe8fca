"""One rank of test_nodes.py's torchrun runs (run by torchrun, not collected by pytest).

    torchrun ... tests/train_nodes_worker.py OUT_DIR [hydra overrides...]

Trains through `pirl_fast.train.loop.run_training` and saves OUT_DIR/rank<R>.pt: this rank's trained
parameters and bank, the sample indices of every batch it trained on (with the step and epoch), the
steps at which it called checkpoint.save (only rank 0 should), and which torchrun attempt it was.

PIRL_TEST_KILL_AT=R:S makes rank R SIGKILL itself just before its step S, in torchrun's first attempt
only (TORCHELASTIC_RESTART_COUNT=0): a rank lost mid-epoch, as the OOM killer or a dead node loses it.

PIRL_TEST_NO_SPACE_AT=S makes the disk fill during rank 0's checkpoint write at step S (torch.save
raises ENOSPC, as a full disk does); every rank then writes its one-line error to OUT_DIR/rank<R>.error
and exits 2.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from pirl_fast.train import checkpoint, loop


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)  # several processes on a small machine: no thread oversubscription
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    kill = os.environ.get("PIRL_TEST_KILL_AT", "")
    no_space_at = int(os.environ.get("PIRL_TEST_NO_SPACE_AT", 0))
    seen: list[list] = []  # [step, epoch, sample indices]
    saves: list[int] = []
    train_step, save, torch_save = loop.train_step, checkpoint.save, torch.save

    def recording_step(run, batch):
        if attempt == 0 and kill == f"{run.rank}:{run.step + 1}":
            os.kill(os.getpid(), signal.SIGKILL)
        seen.append([run.step + 1, run.epoch, batch.index.tolist()])
        return train_step(run, batch)

    def recording_save(run_dir, state, keep):
        saves.append(int(state["step"]))
        if int(state["step"]) == no_space_at:
            def full_disk(obj, f, *args, **kwargs):
                f.write(b"\0" * 4096)  # part of the file made it to the disk
                raise OSError(errno.ENOSPC, "No space left on device")
            torch.save = full_disk
        try:
            return save(run_dir, state, keep)
        finally:
            torch.save = torch_save

    loop.train_step, checkpoint.save = recording_step, recording_save
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    try:
        run, summary = loop.run_training(cfg)
    except loop.DiskFullError as e:
        (out / f"rank{os.environ['RANK']}.error").write_text(str(e))
        sys.exit(2)
    torch.save({
        "params": {name: p.detach().cpu() for name, p in run.module.named_parameters()},
        "bank": run.bank.bank.detach().cpu(),
        "seen": seen, "saves": saves, "attempt": attempt, "world_size": run.world_size, "summary": summary,
    }, out / f"rank{run.rank}.pt")


if __name__ == "__main__":
    main()
