"""The fused bank loss (torch one-pass, Triton, naive) against float64 formulas.

The reference is the loss written from its formula in float64 on the gathered rows, and its
query gradient is float64 autograd of that formula with the positive score built from the
positive row (so the positive term's gradient is checked too). Bounds (stated, checked): the
loss to a relative 1e-5, the query gradient to 1e-5 * max|ref grad|, the score means to 1e-5
(fp32 accumulation over D <= 128 and K <= 300 terms, against the same stored bank values).
Triton runs on `triton_device` (tests/conftest.py): interpreted on CPU tensors without CUDA,
compiled on CUDA tensors with it.
"""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pirl_fast.model import bank_kernels
from pirl_fast.model import bank_loss as bank_loss_module
from pirl_fast.model.bank_loss import BankLoss, bank_loss
from pirl_fast.model.loss import estimate_z

DTYPES = [torch.float32, torch.bfloat16]
# (B, K, N, D): K is no multiple of BLOCK_K=64 nor of the forced torch chunk; D=128 is the real one
SIZES = [(3, 150, 40, 20), (4, 300, 97, 128), (1, 1, 2, 3)]
REL = 1e-5


def reference(query, pos_rows, bank, index, kind, tau, num_data, z):
    """float64 from the formulas of pirl_fast.model.loss, row by row: loss, grad_query, its scale, pos and neg means.

    The scale of the gradient is the larger of its positive and negatives' parts (float64 autograd
    through each separately): they cancel where the positive is the only negative, and an fp32
    result can only be as exact as the parts it sums.
    """
    q_pos = query.detach().double().requires_grad_()
    q_neg = query.detach().double().requires_grad_()
    m = bank.double()
    losses, negs = [], []
    for b in range(index.shape[0]):
        pos = pos_rows[b].double() @ q_pos[b] / tau  # the positive row is a constant; its score is not
        neg = m[index[b]] @ q_neg[b] / tau  # (K,)
        negs.append(neg.detach() * tau)
        if kind == "nce":
            shift = math.log(z) + math.log(index.shape[1] / num_data)  # log Z + log c
            losses.append(F.softplus(shift - pos) + F.softplus(neg - shift).sum())
        else:
            losses.append(torch.logsumexp(torch.cat([pos.view(1), neg]), 0) - pos)
    loss = torch.stack(losses).mean()
    grad_pos, grad_neg = torch.autograd.grad(loss, (q_pos, q_neg))
    scale = max(grad_pos.abs().max().item(), grad_neg.abs().max().item())
    pos_scores = (pos_rows.double() * query.detach().double()).sum(1)
    return loss.detach(), grad_pos + grad_neg, scale, pos_scores.mean(), torch.cat(negs).mean()


def make_case(size, dtype, seed):
    b, k, n, d = size
    gen = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(dtype)
    index = torch.randint(n, (b, k), generator=gen)
    index[:, k // 2:k // 2 + 5] = index[:, :1]  # duplicates: one row six times per sample
    positives = torch.randint(n, (b,), generator=gen)
    index[:, -1] = positives  # the positive among its own negatives (the paper does not exclude it)
    query = F.normalize(torch.randn(b, d, generator=gen), dim=1)
    return bank, index, positives, query


def run(kernel, query, pos_rows, bank, index, kind, tau, num_data, z, device="cpu"):
    """bank_loss on `device` -> (BankLoss, grad_query), on the CPU."""
    q = query.detach().clone().to(device).requires_grad_()
    pos = (pos_rows.to(device) * q).sum(1)  # (B,) differentiable, as PIRLCriterion builds it
    out = bank_loss(q, pos, bank.to(device), index.to(device), kind, tau, num_data, z, kernel)
    out.loss.backward()
    return BankLoss(*(t.cpu() for t in out)), q.grad.cpu()


def assert_close_rel(got, ref, scale, rel, what):
    err = (got.double() - ref).abs().max().item()
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} * {scale:.3g}"


@pytest.mark.parametrize("kernel", ["naive", "torch", "triton"])
@pytest.mark.parametrize("kind", ["nce", "infonce"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_loss_and_query_gradient_match_formula(kernel, kind, dtype, size, monkeypatch, triton_device):
    seed = zlib.crc32(repr((kernel, kind, dtype, size)).encode())  # fresh per case, reproducible
    bank, index, positives, query = make_case(size, dtype, seed)
    b, k, n, d = size
    monkeypatch.setattr(bank_kernels, "CHUNK_ELEMENTS", b * d * 7)  # torch: several chunks, the last partial
    monkeypatch.setattr(bank_kernels, "sm_count", lambda device: b)  # triton: 2 splits of K (if K > 64), uneven,
    monkeypatch.setattr(bank_kernels, "PROGRAMS_PER_SM", 2)  # of several BLOCK_K steps each (the running sums)
    tau = 0.07 if seed % 2 else 0.2  # the paper's and one strictly between it and 1
    pos_rows = bank[positives].float()  # (B, D) detached, as bank.rows gives them
    with torch.no_grad():  # a realistic Z: the estimate on this batch, as the first training step makes it
        z = estimate_z((pos_rows * query).sum(1), bank_kernels.naive_scores(query, bank, index), tau, 5 * n).item()
    device = triton_device if kernel == "triton" else "cpu"
    out, grad = run(kernel, query, pos_rows, bank, index, kind, tau, 5 * n, z, device)
    ref_loss, ref_grad, scale, ref_pos, ref_neg = reference(query, pos_rows, bank, index, kind, tau, 5 * n, z)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert math.isclose(out.loss.item(), ref_loss.item(), rel_tol=REL), f"{kernel} {kind} loss"
    assert_close_rel(grad, ref_grad, scale, REL, f"{kernel} {kind} grad_query")
    assert math.isclose(out.pos_mean.item(), ref_pos.item(), rel_tol=REL, abs_tol=1e-6)
    assert math.isclose(out.neg_mean.item(), ref_neg.item(), rel_tol=REL, abs_tol=1e-6)
    assert not out.pos_mean.requires_grad and not out.neg_mean.requires_grad


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["nce", "infonce"])
def test_far_from_the_typical_range(kernel, kind, triton_device):
    """tau = 0.01 (logits up to 100: exp overflows fp32) and a Z far from the batch's: log-space throughout."""
    bank, index, positives, query = make_case((3, 130, 30, 16), torch.float32, seed=5)
    pos_rows = bank[positives].float()
    for z in (1e-30, 1e30):
        out, grad = run(kernel, query, pos_rows, bank, index, kind, 0.01, 1000, z,
                        triton_device if kernel == "triton" else "cpu")
        ref_loss, ref_grad, scale, _, _ = reference(query, pos_rows, bank, index, kind, 0.01, 1000, z)
        assert math.isclose(out.loss.item(), ref_loss.item(), rel_tol=REL)
        assert_close_rel(grad, ref_grad, scale, REL, f"{kernel} {kind} grad_query at z={z}")


def test_gradient_reaches_query_and_pos_only():
    bank, index, positives, query = make_case((2, 70, 20, 8), torch.float32, seed=3)
    bank.requires_grad_()
    q = query.clone().requires_grad_()
    pos = torch.rand(2, requires_grad=True)  # a leaf: its own gradient is checked
    for kind in ("nce", "infonce"):
        q.grad = pos.grad = None
        ref_pos = pos.detach().clone().requires_grad_()
        ref_q = q.detach().clone().requires_grad_()
        bank_loss(q, pos, bank, index, kind, 0.1, 500, 2.0, "torch").loss.backward()
        bank_loss(ref_q, ref_pos, bank, index, kind, 0.1, 500, 2.0, "naive").loss.backward()
        assert bank.grad is None
        torch.testing.assert_close(pos.grad, ref_pos.grad, rtol=1e-4, atol=1e-6)  # fp32 against fp32
        torch.testing.assert_close(q.grad, ref_q.grad, rtol=1e-4, atol=1e-6)


class LargestNewStorage(TorchDispatchMode):
    """The largest storage (bytes) an operator creates inside the block; views of existing tensors are not new."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.existing:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("kind", ["nce", "infonce"])
def test_torch_path_allocates_nothing_of_size_b_times_k(kind, monkeypatch):
    b, k, n, d = 4, 3000, 500, 32
    monkeypatch.setattr(bank_kernels, "CHUNK_ELEMENTS", b * d * 20)  # chunks of 20 negatives
    bank, index, positives, query = make_case((b, k, n, d), torch.float32, seed=8)
    q = query.clone().requires_grad_()
    with LargestNewStorage(bank, index, q) as fused:
        bank_loss(q, (bank[positives] * q).sum(1), bank, index, kind, 0.07, 10 * n, 1.5, "torch").loss.backward()
    with LargestNewStorage(bank, index, q) as naive:  # the probe sees the (B, K, D) gather where there is one
        bank_loss(q, (bank[positives] * q).sum(1), bank, index, kind, 0.07, 10 * n, 1.5, "naive").loss.backward()
    assert naive.largest >= b * k * d * 4
    assert fused.largest <= b * 20 * d * 4 < b * k * 4, f"largest new storage {fused.largest} bytes"


def test_range_check_runs_unless_the_bank_drew_the_indices(monkeypatch):
    bank, index, positives, query = make_case((2, 10, 20, 8), torch.float32, seed=4)
    calls = []
    monkeypatch.setattr(bank_loss_module, "check_index_range", lambda *a: calls.append(a))
    pos = (bank[positives] * query).sum(1)
    bank_loss(query, pos, bank, index, "infonce", 0.1, kernel="torch")
    assert len(calls) == 1
    bank_loss(query, pos, bank, index, "infonce", 0.1, kernel="torch", check_index=False)
    assert len(calls) == 1


def test_criterion_skips_the_range_check_for_the_banks_own_draws(monkeypatch):
    from pirl_fast.model.loss import LossConfig, PIRLCriterion
    from pirl_fast.model.memory_bank import BankConfig, MemoryBank

    calls = []
    monkeypatch.setattr(bank_loss_module, "check_index_range", lambda *a: calls.append(a))
    bank = MemoryBank(30, 8, BankConfig(num_negatives=7, kernel="torch"))
    f, g = (F.normalize(torch.randn(4, 8), dim=1) for _ in range(2))
    PIRLCriterion(LossConfig(), 30)(f, g, torch.arange(4), bank)
    assert calls == []


def test_bad_arguments_raise():
    bank, index, positives, query = make_case((2, 10, 20, 8), torch.float32, seed=4)
    pos = (bank[positives] * query).sum(1)
    with pytest.raises(ValueError, match="nce.*infonce"):
        bank_loss(query, pos, bank, index, "softmax", 0.1)
    with pytest.raises(ValueError, match="num_data.*z"):
        bank_loss(query, pos, bank, index, "nce", 0.1, num_data=100)
    with pytest.raises(ValueError, match=r"pos must hold one score per query, shape \(2,\)"):
        bank_loss(query, pos[:1], bank, index, "infonce", 0.1)
    with pytest.raises(ValueError, match="> 0"):
        bank_loss(query, pos, bank, index, "infonce", 0.0)
    bad = index.clone()
    bad[1, 3] = 20
    with pytest.raises(IndexError, match=r"\[0, 20\)"):
        bank_loss(query, pos, bank, bad, "infonce", 0.1, kernel="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["nce", "infonce"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fused_loss_matches_formula(kind, dtype):
    """kernel='auto' on CUDA: the compiled Triton kernel (never the interpreter), same bounds as on CPU."""
    from triton.runtime.jit import JITFunction
    assert type(bank_kernels.jit(bank_loss_module._loss_fwd)) is JITFunction
    b, k, n, d = 7, 5000, 10007, 128
    bank, index, positives, query = make_case((b, k, n, d), dtype, seed=12)
    pos_rows = bank[positives].float()
    z = 1.7 * n
    out, grad = run("auto", query, pos_rows, bank, index, kind, 0.07, 10 * n, z, "cuda")
    ref_loss, ref_grad, scale, ref_pos, ref_neg = reference(query, pos_rows, bank, index, kind, 0.07, 10 * n, z)
    assert math.isclose(out.loss.item(), ref_loss.item(), rel_tol=REL)
    assert_close_rel(grad, ref_grad, scale, REL, f"cuda {kind} grad_query")
    assert math.isclose(out.neg_mean.item(), ref_neg.item(), rel_tol=REL, abs_tol=1e-6)
