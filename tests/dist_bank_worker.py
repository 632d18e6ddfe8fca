"""Two-process worker for tests/test_memory_bank.py (run by torchrun with the gloo backend).

Each rank updates its own copies of two memory banks (torch kernel / float32, Triton kernel /
bfloat16) with different per-rank data for several steps, draws negatives, estimates Z, and
saves everything it saw and produced to <out_dir>/rank<r>.pt for the test to check.

    torchrun --standalone --nproc_per_node=2 tests/dist_bank_worker.py OUT_DIR
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from pirl_fast.model.loss import estimate_z
from pirl_fast.model.memory_bank import BankConfig, MemoryBank
from pirl_fast.runtime import dist

NUM_SAMPLES, DIM, BATCH, STEPS = 40, 16, 6, 4
BANKS = {"torch": BankConfig(num_negatives=5, kernel="torch", dtype="float32", momentum=0.5, seed=11),
         "triton": BankConfig(num_negatives=5, kernel="triton", dtype="bfloat16", momentum=0.3, seed=11)}


def main(out_dir: str) -> None:
    info = dist.init("gloo")
    gen = torch.Generator().manual_seed(1000 + info.rank)  # different data on each rank
    banks = {name: MemoryBank(NUM_SAMPLES, DIM, cfg) for name, cfg in BANKS.items()}
    steps = []
    for _ in range(STEPS):
        index = torch.randint(NUM_SAMPLES, (BATCH,), generator=gen)
        index[0] = 7  # sample 7 on both ranks every step: a cross-rank duplicate
        embedding = torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=gen), dim=1)
        for bank in banks.values():
            bank.update(index, embedding)
        steps.append((index, embedding))
    pos = torch.rand(BATCH, generator=gen) * 2 - 1
    neg = torch.rand(BATCH, 9, generator=gen) * 2 - 1
    result = {
        "steps": steps,
        "banks": {name: bank.bank.clone() for name, bank in banks.items()},
        "negatives": banks["torch"].sample_negatives(BATCH),
        "pos": pos, "neg": neg, "z": estimate_z(pos, neg, 0.07, NUM_SAMPLES),
    }
    torch.save(result, os.path.join(out_dir, f"rank{info.rank}.pt"))
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
