"""MemoryBank: init, negative sampling and its resumable stream, reads, the update rule, validation, two ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pirl_fast.model.bank_kernels import bank_update
from pirl_fast.model.loss import estimate_z
from pirl_fast.model.memory_bank import BankConfig, MemoryBank

ROOT = Path(__file__).resolve().parents[1]


def test_init_unit_rows_seeded_and_dtype():
    a = MemoryBank(50, 16, BankConfig(seed=3))
    b = MemoryBank(50, 16, BankConfig(seed=3))
    c = MemoryBank(50, 16, BankConfig(seed=4))
    assert a.bank.shape == (50, 16) and a.bank.dtype == torch.float32
    assert torch.allclose(a.bank.norm(dim=1), torch.ones(50), atol=1e-6)
    assert torch.equal(a.bank, b.bank) and not torch.equal(a.bank, c.bank)
    h = MemoryBank(50, 16, BankConfig(seed=3, dtype="bfloat16"))
    assert h.bank.dtype == torch.bfloat16 and torch.equal(h.bank, a.bank.to(torch.bfloat16))
    assert "bank" in dict(a.named_buffers())


def test_negatives_shape_range_and_fresh_draws():
    bank = MemoryBank(13, 4, BankConfig(num_negatives=2000))
    first, second = bank.sample_negatives(3), bank.sample_negatives(3)
    assert first.shape == (3, 2000) and first.dtype == torch.int64
    assert int(first.min()) >= 0 and int(first.max()) < 13
    assert not torch.equal(first, second), "each call must be a fresh draw (one per loss term)"
    counts = torch.bincount(torch.cat([first, second]).flatten(), minlength=13).double()  # 12000 draws
    expected = 12000 / 13
    assert counts.min() > 0.8 * expected and counts.max() < 1.2 * expected  # ~10 sigma margin: uniform


def test_negative_stream_resumes_from_state_dict():
    run = MemoryBank(100, 8, BankConfig(num_negatives=7, seed=5))
    for _ in range(3):
        run.sample_negatives(4)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in run.state_dict().items()}
    expected = [run.sample_negatives(4) for _ in range(2)]
    resumed = MemoryBank(100, 8, BankConfig(num_negatives=7, seed=5))
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.sample_negatives(4), e) for e in expected)
    fresh = MemoryBank(100, 8, BankConfig(num_negatives=7, seed=5))
    assert not torch.equal(fresh.sample_negatives(4), expected[0])  # the draw count is what resumes
    with pytest.raises(ValueError, match="seed"):
        MemoryBank(100, 8, BankConfig(num_negatives=7, seed=6)).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        MemoryBank(99, 8, BankConfig(num_negatives=7, seed=5)).load_state_dict(state)


def test_rows_and_scores():
    bank = MemoryBank(30, 8, BankConfig(dtype="bfloat16", kernel="torch"))
    index = torch.tensor([4, 29, 4])
    rows = bank.rows(index)
    assert rows.dtype == torch.float32 and torch.equal(rows, bank.bank[index].float())
    rows.add_(1.0)
    assert not torch.equal(rows, bank.bank[index].float()), "rows() must return a copy"
    q = torch.randn(3, 8)
    neg = torch.tensor([[0, 1], [2, 29], [4, 4]])
    expected = torch.stack([bank.bank[neg[b]].double() @ q[b].double() for b in range(3)])
    assert torch.allclose(bank.scores(q, neg).double(), expected, atol=1e-5)
    with pytest.raises(IndexError, match=r"\[0, 30\)"):
        bank.rows(torch.tensor([30]))


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_update_rule(kernel, triton_device):
    mu = 0.25
    bank = MemoryBank(20, 6, BankConfig(momentum=mu, kernel=kernel))
    if kernel == "triton":
        bank.to(triton_device)
    before = bank.bank.clone().cpu()
    index = torch.tensor([3, 8, 3])  # 3 twice: updated once with the mean of its two embeddings
    f = F.normalize(torch.randn(3, 6), dim=1)
    bank.update(index, f)
    bank.cpu()
    for i, fi in ((8, f[1]), (3, (f[0] + f[2]) / 2)):
        v = mu * before[i].double() + (1 - mu) * fi.double()
        assert torch.allclose(bank.bank[i].double(), v / v.norm(), atol=2e-6)
    untouched = [i for i in range(20) if i not in (3, 8)]
    assert torch.equal(bank.bank[untouched], before[untouched])


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("mu", [0.5, 0.8])
def test_first_update_replace(kernel, mu):
    """first_update=replace: a row's first write is normalize(mean f), later writes blend as usual."""
    bank = MemoryBank(20, 6, BankConfig(momentum=mu, kernel=kernel, first_update="replace"))
    before = bank.bank.clone()
    f = F.normalize(torch.randn(3, 6), dim=1)
    bank.update(torch.tensor([3, 8, 3]), f)
    for i, fi in ((8, f[1]), (3, (f[0] + f[2]) / 2)):
        assert torch.allclose(bank.bank[i].double(), fi.double() / fi.double().norm(), atol=2e-6)
    assert bank.seen.tolist() == [i in (3, 8) for i in range(20)]
    untouched = [i for i in range(20) if i not in (3, 8)]
    assert torch.equal(bank.bank[untouched], before[untouched])
    after_first = bank.bank.clone()
    g = F.normalize(torch.randn(2, 6), dim=1)
    bank.update(torch.tensor([8, 5]), g)  # 8 seen: blends; 5 new: replaced
    v = mu * after_first[8].double() + (1 - mu) * g[0].double()
    assert torch.allclose(bank.bank[8].double(), v / v.norm(), atol=2e-6)
    assert torch.allclose(bank.bank[5], g[1], atol=2e-6)
    state = bank.state_dict()
    assert state["seen"].sum() == 3
    restored = MemoryBank(20, 6, BankConfig(momentum=mu, kernel=kernel, first_update="replace"))
    restored.load_state_dict(state)
    assert torch.equal(restored.seen, bank.seen) and torch.equal(restored.bank, bank.bank)
    del state["seen"]  # a checkpoint written before `seen` existed: its rows count as written
    restored.load_state_dict(state)
    assert bool(restored.seen.all())


def test_validation_names_choices():
    with pytest.raises(ValueError, match="bfloat16.*float32"):
        MemoryBank(5, 4, BankConfig(dtype="float16"))
    with pytest.raises(ValueError, match="auto.*triton.*torch.*naive"):
        MemoryBank(5, 4, BankConfig(kernel="cublas"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MemoryBank(5, 4, BankConfig(momentum=1.5))
    with pytest.raises(ValueError, match=">= 1"):
        MemoryBank(5, 4, BankConfig(num_negatives=0))
    with pytest.raises(ValueError, match="blend.*replace"):
        MemoryBank(5, 4, BankConfig(first_update="overwrite"))
    with pytest.raises(ValueError, match="momentum < 1"):
        MemoryBank(5, 4, BankConfig(first_update="replace", momentum=1.0))
    with pytest.raises(ValueError, match=r"embedding \(B, 4\)"):
        MemoryBank(5, 4, BankConfig()).update(torch.tensor([1]), torch.randn(1, 3))


def test_two_ranks_keep_identical_banks(tmp_path, needs_interpreter):
    """torchrun, 2 gloo processes, different data per rank: both copies equal the single-process result.
    The workers run Triton on CPU tensors, and so does the replay here: it needs the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_bank_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    sys.path.insert(0, str(ROOT / "tests"))
    from dist_bank_worker import BANKS, DIM, NUM_SAMPLES

    for name, cfg in BANKS.items():
        assert torch.equal(r0["banks"][name], r1["banks"][name]), f"{name}: the ranks' banks differ"
        local = MemoryBank(NUM_SAMPLES, DIM, cfg).bank  # replay the gathered batches in one process
        for (i0, e0), (i1, e1) in zip(r0["steps"], r1["steps"]):
            bank_update(local, torch.cat([i0, i1]), torch.cat([e0, e1]), cfg.momentum, cfg.kernel)
        assert torch.equal(local, r0["banks"][name]), f"{name}: ranks did not apply the gathered update"
        assert not torch.equal(local, MemoryBank(NUM_SAMPLES, DIM, cfg).bank)
    assert not torch.equal(r0["negatives"], r1["negatives"]), "ranks should draw different negatives"
    z_mean = (estimate_z(r0["pos"], r0["neg"], 0.07, NUM_SAMPLES)
              + estimate_z(r1["pos"], r1["neg"], 0.07, NUM_SAMPLES)) / 2
    assert torch.allclose(r0["z"], z_mean, rtol=1e-6) and torch.equal(r0["z"], r1["z"])
