"""One rank of the two-process test in test_train.py (run by torchrun, not collected by pytest).

    torchrun --standalone --nproc_per_node=2 tests/train_ddp_worker.py OUT_DIR [hydra overrides...]

Trains through `pirl_fast.train.loop.run_training` (exactly what `python -m pirl_fast.train` runs, minus
Hydra's argument parsing) and then saves this rank's trained parameters, bank, optimiser momentum
and NCE normalisers to OUT_DIR/rank<R>.pt, so the test can compare the ranks with each other.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from pirl_fast.train.loop import run_training


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)  # two processes on a small machine: no thread oversubscription
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run, summary = run_training(cfg)
    momentum = [run.optimizer.state[p]["momentum_buffer"].detach().cpu() for p in run.module.parameters()]
    torch.save({
        "params": {name: p.detach().cpu() for name, p in run.module.named_parameters()},
        "bank": run.bank.bank.detach().cpu(),
        "momentum": momentum,
        "z": run.criterion.state_dict(),
        "summary": summary,
    }, out / f"rank{run.rank}.pt")


if __name__ == "__main__":
    main()
