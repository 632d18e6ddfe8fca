"""bank_scores (torch chunked, Triton, naive) and bank_update against float64 formulas.

Triton runs on `triton_device` (tests/conftest.py): interpreted on CPU tensors without CUDA,
compiled on CUDA tensors with it.

Error bounds (stated, checked): scores and grad_query agree with a float64 evaluation of the same
stored bank values to max|err| <= 1e-5 * max|ref| (fp32 accumulation over D <= 128 and K <= 300
terms); the bank update agrees with the float64 formula to 2e-6 absolute for float32 storage and
one bfloat16 rounding step (2**-8 relative) for bfloat16 storage.
"""

import zlib

import pytest
import torch

from pirl_fast.model import bank_kernels
from pirl_fast.model.bank_kernels import bank_scores, bank_update

DTYPES = [torch.float32, torch.bfloat16]
# (B, K, N, D): none is a multiple of BLOCK_K=64 or of a power-of-two BLOCK_D, except the real D=128
SIZES = [(3, 70, 50, 20), (5, 300, 97, 128), (1, 1, 2, 3)]
REL = 1e-5


def unit_bank(n, d, dtype, gen):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to(dtype)


def reference(query, bank, index, grad):
    """float64 from the formula: s[b,k] = sum_d q[b,d] m[idx[b,k],d]; dq[b] = sum_k grad[b,k] m[idx[b,k]]."""
    q, m, g = query.double(), bank.double(), grad.double()
    s = torch.zeros(index.shape, dtype=torch.float64)
    dq = torch.zeros(query.shape, dtype=torch.float64)
    for b in range(index.shape[0]):
        rows = m[index[b]]  # (K, D)
        s[b] = rows @ q[b]
        dq[b] = g[b] @ rows
    return s, dq


def assert_close_rel(got, ref, rel, what):
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale + 1e-12, f"{what}: max abs error {err:.3g} > {rel} * {scale:.3g}"


@pytest.mark.parametrize("kernel", ["naive", "torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_scores_and_grad_match_formula(kernel, dtype, size, monkeypatch, triton_device):
    b, k, n, d = size
    # fresh per case, reproducible
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kernel, dtype, size)).encode()))
    if kernel == "torch":  # force several K-chunks, the last one partial
        monkeypatch.setattr(bank_kernels, "CHUNK_ELEMENTS", b * d * 7)
    bank = unit_bank(n, d, dtype, gen)
    index = torch.randint(n, (b, k), generator=gen)
    query = torch.randn(b, d, generator=gen, requires_grad=True)
    grad = torch.randn(b, k, generator=gen)
    device = triton_device if kernel == "triton" else torch.device("cpu")
    q = query.detach().clone().to(device).requires_grad_()
    scores = bank_scores(q, bank.to(device), index.to(device), kernel)
    (dq,) = torch.autograd.grad(scores, q, grad.to(device))
    scores, dq = scores.cpu(), dq.cpu()
    ref_s, ref_dq = reference(query.detach(), bank, index, grad)
    assert scores.dtype == torch.float32 and scores.shape == (b, k)
    assert dq.dtype == query.dtype
    assert_close_rel(scores, ref_s, REL, f"{kernel} scores")
    assert_close_rel(dq, ref_dq, REL, f"{kernel} grad_query")


@pytest.mark.parametrize("target_programs", [1, 6, 1024])
def test_triton_backward_split_k(target_programs, monkeypatch, triton_device):
    """The split-K backward with one split, a few uneven splits, and one 64-block per split."""
    monkeypatch.setattr(bank_kernels, "sm_count", lambda device: target_programs)
    monkeypatch.setattr(bank_kernels, "PROGRAMS_PER_SM", 1)
    gen = torch.Generator().manual_seed(target_programs)
    bank = unit_bank(40, 24, torch.float32, gen)
    index = torch.randint(40, (3, 333), generator=gen)
    query = torch.randn(3, 24, generator=gen)
    grad = torch.randn(3, 333, generator=gen)
    q = query.to(triton_device).requires_grad_()
    scores = bank_scores(q, bank.to(triton_device), index.to(triton_device), "triton")
    (dq,) = torch.autograd.grad(scores, q, grad.to(triton_device))
    assert_close_rel(dq.cpu(), reference(query, bank, index, grad)[1], REL, "split-K grad_query")


@pytest.mark.parametrize("b, k, sms", [(256, 32000, 132), (256, 32000, 78), (1, 100, 132), (4096, 32000, 132),
                                        (3, 1, 2)])
def test_split_k_fills_the_device_with_whole_blocks(b, k, sms, monkeypatch):
    """H200 (132 SMs), a small GPU, a short K, a batch larger than the target, K = 1."""
    monkeypatch.setattr(bank_kernels, "sm_count", lambda device: sms)
    splits, per_split = bank_kernels.split_k(b, k, torch.device("cpu"))
    blocks = -(-k // bank_kernels.BLOCK_K)
    assert per_split % bank_kernels.BLOCK_K == 0
    assert (splits - 1) * per_split < k <= splits * per_split  # every split holds at least one index
    assert b * splits >= min(sms * bank_kernels.PROGRAMS_PER_SM, b * blocks)  # enough programs, if K allows
    assert b * (splits - 1) < max(sms * bank_kernels.PROGRAMS_PER_SM, b)  # and not more splits than needed


def test_one_triton_mode_per_process_with_clear_errors():
    """The session's mode (tests/conftest.py) reaches the kernels; the other device is refused, saying why."""
    import os

    from triton.runtime.interpreter import InterpretedFunction
    assert bank_kernels.interpreted() == (os.environ["TRITON_INTERPRET"] == "1") == (not torch.cuda.is_available())
    kernel = bank_kernels.jit(bank_kernels._scores_fwd)
    assert isinstance(kernel, InterpretedFunction) == bank_kernels.interpreted()
    if bank_kernels.interpreted():
        with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
            bank_kernels.resolve_kernel("triton", torch.device("cuda"))
        assert bank_kernels.resolve_kernel("triton", torch.device("cpu")) == "triton"
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 before triton is first imported"):
            bank_kernels.resolve_kernel("triton", torch.device("cpu"))
    assert bank_kernels.resolve_kernel("auto", torch.device("cpu")) == "torch"


def test_no_gradient_to_bank_and_autocast_ignored():
    gen = torch.Generator().manual_seed(1)
    bank = unit_bank(30, 16, torch.float32, gen).requires_grad_()
    index = torch.randint(30, (2, 9), generator=gen)
    query = torch.randn(2, 16, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = bank_scores(query, bank, index, "torch")
    assert scores.dtype == torch.float32  # fp32 accumulation even under autocast
    scores.sum().backward()
    assert bank.grad is None and query.grad is not None


@pytest.mark.parametrize("kernel", ["torch", "triton", "naive"])
def test_bad_index_raises(kernel, request):
    if kernel == "triton":  # CPU tensors: on CUDA the check is a device-side assert, fatal to the process
        request.getfixturevalue("needs_interpreter")
    bank = torch.randn(10, 4)
    query = torch.randn(2, 4)
    for bad in (10, -1):
        index = torch.zeros(2, 3, dtype=torch.int64)
        index[1, 2] = bad
        with pytest.raises(IndexError, match=r"\[0, 10\)"):
            bank_scores(query, bank, index, kernel)


def test_bad_arguments_raise():
    bank, query = torch.randn(10, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="auto.*triton.*torch.*naive"):
        bank_scores(query, bank, torch.zeros(2, 3, dtype=torch.int64), "cuda")
    with pytest.raises(ValueError, match="K >= 1"):
        bank_scores(query, bank, torch.zeros(2, 0, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape mismatch"):
        bank_scores(torch.randn(2, 5), bank, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="int64"):
        bank_scores(query, bank, torch.zeros(2, 3, dtype=torch.int32))


def update_formula(bank, index, embedding, mu):
    """float64, one distinct row at a time: m_i <- normalize(mu*m_i + (1-mu)*mean_j f_j)."""
    out = bank.double().clone()
    for i in sorted(set(index.tolist())):
        f = torch.stack([embedding[j].double() for j in range(len(index)) if index[j] == i]).mean(0)
        v = mu * bank[i].double() + (1 - mu) * f
        out[i] = v / v.norm()
    return out


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_matches_formula_with_duplicates(kernel, dtype, triton_device):
    gen = torch.Generator().manual_seed(7)
    n, d, mu = 23, 40, 0.3
    bank = unit_bank(n, d, dtype, gen)
    index = torch.tensor([5, 0, 5, 22, 9, 5, 0, 13])  # 5 three times, 0 twice, not sorted
    emb = torch.nn.functional.normalize(torch.randn(len(index), d, generator=gen), dim=1)
    expected = update_formula(bank, index, emb, mu)
    device = triton_device if kernel == "triton" else torch.device("cpu")

    def update(bank, index, emb):  # on the kernel's device, back to the CPU
        out = bank.clone().to(device)
        bank_update(out, index.to(device), emb.to(device), mu, kernel)
        return out.cpu()

    got = update(bank, index, emb)
    assert got.dtype == dtype
    touched = torch.zeros(n, dtype=torch.bool)
    touched[index] = True
    assert torch.equal(got[~touched], bank[~touched]), "rows not in the batch must not change"
    tol = 2e-6 if dtype == torch.float32 else 2**-8
    err = (got.double() - expected).abs().max().item()
    assert err <= tol, f"{kernel} update off by {err:.3g} > {tol}"
    assert torch.allclose(got.double().norm(dim=1), torch.ones(n, dtype=torch.float64), atol=tol * 4)
    assert torch.equal(update(bank, index, emb), got), "the same batch must give the same bits"
    perm = torch.randperm(len(index), generator=gen)
    shuffled = update(bank, index[perm], emb[perm])
    assert (shuffled.double() - expected).abs().max().item() <= tol  # the rule does not depend on order


def test_update_kernels_agree_and_momentum_edges(triton_device):
    gen = torch.Generator().manual_seed(3)
    bank = unit_bank(12, 8, torch.float32, gen)
    index = torch.tensor([1, 4, 1, 11])
    emb = torch.randn(4, 8, generator=gen)
    a, b = bank.clone(), bank.clone().to(triton_device)
    bank_update(a, index, emb, 0.5, "torch")
    bank_update(b, index.to(triton_device), emb.to(triton_device), 0.5, "triton")
    assert (a - b.cpu()).abs().max().item() <= 1e-6
    keep = bank.clone().to(triton_device)
    bank_update(keep, index.to(triton_device), emb.to(triton_device), 1.0, "triton")  # mu = 1: rows stay (unit)
    assert torch.allclose(keep.cpu(), bank, atol=1e-6)
    replace = bank.clone()
    bank_update(replace, index, emb, 0.0, "torch")  # mu = 0: rows become the normalised mean embedding
    assert torch.allclose(replace[4], torch.nn.functional.normalize(emb[1], dim=0), atol=1e-6)
    with pytest.raises(IndexError):
        bank_update(bank.clone(), torch.tensor([12]), emb[:1], 0.5, "torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_auto_kernels_match_formula(dtype):
    """kernel='auto' on CUDA is the compiled Triton kernel (never the interpreter): same bounds as on CPU."""
    from triton.runtime.jit import JITFunction
    assert type(bank_kernels.jit(bank_kernels._scores_fwd)) is JITFunction
    gen = torch.Generator().manual_seed(11)
    b, k, n, d = 7, 5000, 10007, 128
    bank = unit_bank(n, d, dtype, gen)
    index = torch.randint(n, (b, k), generator=gen)
    query = torch.randn(b, d, generator=gen)
    grad = torch.randn(b, k, generator=gen)
    q = query.cuda().requires_grad_()
    scores = bank_scores(q, bank.cuda(), index.cuda(), "auto")
    (dq,) = torch.autograd.grad(scores, q, grad.cuda())
    ref_s, ref_dq = reference(query, bank, index, grad)
    assert_close_rel(scores.cpu(), ref_s, REL, "cuda scores")
    assert_close_rel(dq.cpu(), ref_dq, REL, "cuda grad_query")
    upd_index = torch.tensor([5, 0, 5, 10006])
    emb = torch.randn(4, d, generator=gen)
    got = bank.cuda()
    bank_update(got, upd_index.cuda(), emb.cuda(), 0.5, "auto")
    tol = 2e-6 if dtype == torch.float32 else 2**-8
    assert (got.cpu().double() - update_formula(bank, upd_index, emb, 0.5)).abs().max().item() <= tol
