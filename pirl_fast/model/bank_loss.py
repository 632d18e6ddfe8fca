"""The fused bank loss term: one pass over the K negatives gives the loss and its query gradient.

    bank_loss(query, pos, bank, index, kind, temperature, num_data, z) -> BankLoss(loss, pos_mean, neg_mean)

query (B, D) embeddings; pos (B,) their positive scores <m_I, q>, differentiable (the caller
builds them from the detached positive rows, so their gradient reaches the query through
autograd); bank (N, D); index (B, K) the negatives' rows. With logits l = s / tau, l0 = pos / tau:

  nce      loss_b = softplus(log Z + log c - l0) + sum_k softplus(l_k - log Z - log c),  c = K/|D|
           grad_q loss_b, negatives' part = (1/tau) sum_k sigmoid(l_k - log Z - log c) m_k
  infonce  loss_b = logsumexp(l0, l_1..l_K) - l0
           grad_q loss_b, negatives' part = (1/tau) sum_k p_k m_k,  p = softmax(l0, l_1..l_K)

(the formulas of pirl_fast.model.loss; loss = mean over b). Both gradients are a weighted sum of the
gathered rows. For NCE a row's weight depends on its own score only (Z is frozen); for infonce
an online log-sum-exp (a running max, a running sum and a running weighted row sum, rescaled
when the max grows, as flash attention with one query) gives the loss and sum_k p_k m_k. So one
pass over the K rows yields the loss, the gradient and the negatives' score sum; the backward
only scales the saved (B, D) and (B,) gradients by the incoming scalar. One gather of B*K*D
per term (bank_scores followed by the loss gathers twice: forward and backward), and nothing
of size B*K*D, nor B*K, is allocated.

kernel (bank.kernel):
  triton  one Triton program per (sample, split of K), split-K sized from the SM count; each
          writes partial statistics (B, S, 3) and a partial row sum (B, S, D), combined in torch.
  torch   the same one-pass algorithm in PyTorch over K-chunks (S = 1): the CPU path.
  naive   bank_scores(kernel='naive') then nce_loss / info_nce_loss with plain autograd: the
          reference the tests and the benchmark compare against.
  auto    triton on CUDA tensors, torch on CPU tensors.

Z must be known (a float, or the criterion's buffer: read on the device, no host sync); the
criterion estimates it from bank_scores on the first batch. Indices are range-checked unless
check_index=False, for indices the bank drew itself (in range by construction).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pirl_fast.model.bank_kernels import (
    BLOCK_K,
    check_shapes,
    chunk_size,
    configs,
    gather_rows,
    naive_scores,
    resolve_kernel,
    split_k,
    tl,
    triton,
    tuned,
)
from pirl_fast.model.bank_kernels import check_index as check_index_range
from pirl_fast.model.loss import KINDS, info_nce_loss, nce_loss

LOSS_WARPS = 8  # warps per program of the fused kernel (see _triton_partials): the untuned choice
# autotuned on CUDA (bank_kernels.tuned): 64 rows x 8 warps (~101 registers a thread in fp32 NCE: 2 programs
# per SM), or half the tile (fewer registers, more programs resident to hide the gather's latency)
LOSS_CONFIGS = configs((BLOCK_K, LOSS_WARPS), (BLOCK_K // 2, LOSS_WARPS), (BLOCK_K // 2, 4))


class BankLoss(NamedTuple):
    loss: Tensor  # scalar float32: mean over the batch, differentiable w.r.t. query and pos
    pos_mean: Tensor  # scalar float32, detached: the mean positive score (a cosine)
    neg_mean: Tensor  # scalar float32, detached: the mean negative score over all B*K


def bank_loss(query: Tensor, pos: Tensor, bank: Tensor, index: Tensor, kind: str, temperature: float,
              num_data: int | None = None, z: Tensor | float | None = None, kernel: str = "auto",
              check_index: bool = True) -> BankLoss:
    """One loss term against the negatives bank[index]; see the module docstring. Scalars stay on the device."""
    check_shapes(query, bank, index)
    if pos.shape != (query.shape[0],):
        raise ValueError(f"pos must hold one score per query, shape ({query.shape[0]},); got {tuple(pos.shape)}")
    if kind not in KINDS:
        raise ValueError(f"loss kind={kind!r} is unknown; choose one of {KINDS}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (the paper uses 0.07)")
    if kind == "nce" and (z is None or num_data is None or num_data < 1):
        raise ValueError("kind='nce' needs num_data (the dataset size, >= 1) and z (the frozen normaliser; "
                         "estimate it with pirl_fast.model.loss.estimate_z on the first batch)")
    if check_index:
        check_index_range(index, bank.shape[0])
    kernel = resolve_kernel(kernel, query.device)
    bank = bank.detach()  # gradients flow to the query (and pos) only
    pos_mean = pos.detach().float().mean()
    with torch.autocast(device_type=query.device.type, enabled=False):  # fp32 accumulation, whatever the context
        if kernel == "naive":
            neg = naive_scores(query, bank, index)  # (B, K), materialises (B, K, D)
            if kind == "nce":
                loss = nce_loss(pos, neg, temperature, num_data, z)
            else:
                loss = info_nce_loss(pos, neg, temperature)
            return BankLoss(loss, pos_mean, neg.detach().mean())
        nce = kind == "nce"
        if nce:  # log Z + log c, a 0-d tensor on the device: no host read of the Z buffer
            shift = torch.log(torch.as_tensor(z, dtype=torch.float32, device=query.device)) \
                + math.log(index.shape[1] / num_data)
        else:
            shift = torch.zeros((), device=query.device)
        loss, neg_mean = _FusedTerm.apply(query, pos, bank, index, shift, nce, 1.0 / temperature, kernel)
    return BankLoss(loss, pos_mean, neg_mean)


class _FusedTerm(torch.autograd.Function):
    """Forward: partial statistics over K (Triton or torch), combined; saves the gradients. Backward: scales them."""

    @staticmethod
    def forward(ctx, query, pos, bank, index, shift, nce: bool, inv_tau: float, kernel: str):
        q = query.detach().float() * inv_tau  # (B, D) q / tau: the logits are <q / tau, m>
        l0 = pos.detach().float() * inv_tau  # (B,) the positives' logits
        partials = _triton_partials if kernel == "triton" else _torch_partials
        stats, rows = partials(q, l0, bank, index.contiguous(), shift, nce)  # (B, S, 3), (B, S, D)
        loss, grad_q, grad_pos = _combine(stats, rows, l0, shift, nce, inv_tau)
        neg_mean = stats[..., 2].sum() / (inv_tau * index.numel())  # sum of logits -> mean score
        ctx.save_for_backward(grad_q, grad_pos)
        ctx.dtypes = (query.dtype, pos.dtype)
        ctx.mark_non_differentiable(neg_mean)
        return loss, neg_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_neg_mean):
        grad_q, grad_pos = ctx.saved_tensors  # gradients of the mean loss, (B, D) and (B,)
        return ((grad_loss * grad_q).to(ctx.dtypes[0]), (grad_loss * grad_pos).to(ctx.dtypes[1]),
                None, None, None, None, None, None)


def _combine(stats: Tensor, rows: Tensor, l0: Tensor, shift: Tensor, nce: bool, inv_tau: float):
    """Splits -> the mean loss (scalar) and its gradients w.r.t. q (B, D) and pos (B,).

    stats[b, s] = (nce: sum of softplus(l_k - shift) | infonce: sum of exp(l_k - max_s), max_s, sum of l_k)
    rows[b, s]  = (nce: sum_k sigmoid(l_k - shift) m_k | infonce: sum_k exp(l_k - max_s) m_k)
    """
    b = l0.shape[0]
    scale = inv_tau / b  # d l / d s = 1/tau, and the mean over the batch
    if nce:
        per_sample = F.softplus(shift - l0) + stats[..., 0].sum(1)  # (B,)
        grad_q = rows.sum(1) * scale  # (B, D)
        grad_pos = -torch.sigmoid(shift - l0) * scale  # (B,)
    else:
        top = torch.maximum(stats[..., 1].amax(1), l0)  # (B,) the largest logit, positive included
        weight = torch.exp(stats[..., 1] - top.unsqueeze(1))  # (B, S) each split's max relative to it
        p0 = torch.exp(l0 - top)  # (B,)
        denom = p0 + (weight * stats[..., 0]).sum(1)  # (B,) sum of exp(l - top) over positive and negatives
        per_sample = top + torch.log(denom) - l0  # logsumexp - l0
        grad_q = (weight.unsqueeze(2) * rows).sum(1) * (scale / denom).unsqueeze(1)  # (B, D) sum_k p_k m_k
        grad_pos = (p0 / denom - 1.0) * scale  # (B,) (p_0 - 1)
    return per_sample.mean(), grad_q, grad_pos


def _torch_partials(q: Tensor, l0: Tensor, bank: Tensor, index: Tensor, shift: Tensor, nce: bool):
    """One pass over K-chunks in PyTorch: (B, 1, 3) statistics and (B, 1, D) rows, as _combine reads them."""
    b, k = index.shape
    d = bank.shape[1]
    step = chunk_size(b, d)
    buf = torch.empty(b * min(step, k) * d, device=q.device)  # one chunk of rows, reused
    qt = q.unsqueeze(1)  # (B, 1, D)
    acc = torch.zeros(b, 1, d, device=q.device)  # (B, 1, D) weighted row sum
    total = torch.zeros(b, device=q.device)  # (B,) nce: sum of softplus; infonce: sum of exp(l - run_max)
    run_max = l0.clone()  # (B,) infonce: the running max, starting at the positive's logit (finite)
    logit_sum = torch.zeros(b, device=q.device)  # (B,)
    for k0 in range(0, k, step):
        rows = gather_rows(bank, index[:, k0:k0 + step], buf)  # (B, c, D) float32
        logits = torch.bmm(qt, rows.transpose(1, 2)).squeeze(1)  # (B, c); this bmm form is ~8x faster on CPU
        logit_sum += logits.sum(1)
        if nce:
            x = logits.sub_(shift)  # (B, c) log Pk - log c
            total += F.softplus(x).sum(1)
            acc.baddbmm_(torch.sigmoid(x).unsqueeze(1), rows)
        else:
            new_max = torch.maximum(run_max, logits.amax(1))  # (B,)
            alpha = torch.exp(run_max - new_max)  # (B,) rescales what was summed under the old max
            p = torch.exp(logits - new_max.unsqueeze(1))  # (B, c)
            total = total * alpha + p.sum(1)
            acc.mul_(alpha.view(b, 1, 1)).baddbmm_(p.unsqueeze(1), rows)
            run_max = new_max
    if nce:
        run_max = torch.zeros_like(run_max)  # unused by _combine for nce
    return torch.stack([total, run_max, logit_sum], 1).unsqueeze(1), acc  # (B, 1, 3), (B, 1, D)


def _triton_partials(q: Tensor, l0: Tensor, bank: Tensor, index: Tensor, shift: Tensor, nce: bool):
    """The Triton kernel over a (B, splits) grid: (B, S, 3) statistics and (B, S, D) rows."""
    b, k = index.shape
    d = bank.shape[1]
    splits, k_per_split = split_k(b, k, q.device)
    stats = torch.empty(b, splits, 3, device=q.device)  # (B, S, 3)
    rows = torch.empty(b, splits, d, device=q.device)  # (B, S, D)
    # 8 warps: the (64, 128) fp32 accumulator and row tile take ~100 registers a thread (4 warps: 128-185,
    # with spills for bf16 on sm_90); tests/test_kernel_compile.py checks the compiled register use
    kernel, meta = tuned(_loss_fwd, LOSS_CONFIGS, key=["K", "K_PER_SPLIT", "NCE"])
    kernel[(b, splits)](q.contiguous(), l0.contiguous(), shift, bank.contiguous(), index, stats, rows, k, k_per_split,
                        D=d, NCE=nce, BLOCK_D=triton.next_power_of_2(d), **meta)
    return stats, rows


if triton is not None:

    def _loss_fwd(q_ptr, l0_ptr, shift_ptr, bank_ptr, idx_ptr, stats_ptr, rows_ptr, K, K_PER_SPLIT,
                  D: tl.constexpr, NCE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (b, split): the rows index[b, split*K_PER_SPLIT : +K_PER_SPLIT] in BLOCK_K steps.

        Everything is accumulated per lane of the (BLOCK_K, BLOCK_D) tile and reduced over K once
        at the end, so the loop has no cross-warp reduction; only the score's dot product reduces
        (over D) per step. infonce keeps a running max per lane (two exps per row instead of one
        cross-warp max per step). Masked rows load as zeros and add nothing to the row sums.
        """
        b = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)  # (BD,)
        mask_d = offs_d < D
        q = tl.load(q_ptr + b * D + offs_d, mask=mask_d, other=0.0)  # (BD,) q / tau
        l0 = tl.load(l0_ptr + b)
        shift = tl.load(shift_ptr)  # nce: log Z + log c
        acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)  # weighted row sums
        total = tl.zeros([BLOCK_K], dtype=tl.float32)  # nce: softplus sums; infonce: exp(l - run_max) sums
        run_max = tl.zeros([BLOCK_K], dtype=tl.float32) + l0  # infonce: starts at the positive's logit
        logit_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            offs_k = split * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)  # (BK,)
            mask_k = offs_k < K
            rows = tl.load(idx_ptr + b * K + offs_k, mask=mask_k, other=0)  # (BK,) int64
            m = tl.load(bank_ptr + rows[:, None] * D + offs_d[None, :],
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # (BK, BD)
            logits = tl.sum(m * q[None, :], axis=1)  # (BK,) s / tau
            logit_sum += tl.where(mask_k, logits, 0.0)
            if NCE:
                x = logits - shift  # log Pk - log c
                e = tl.exp(-tl.abs(x))  # (0, 1]
                # softplus(x) = max(x, 0) + log1p(e); log1p(e) = 2 atanh(t), t = e / (2 + e) <= 1/3, as a
                # series to t^15 (relative error < 2e-9): exact where an approximate log(1 + e) is not
                t = e / (2.0 + e)
                t2 = t * t
                series = 1.0 + t2 * (1 / 3 + t2 * (1 / 5 + t2 * (1 / 7 + t2 * (1 / 9 + t2 * (
                    1 / 11 + t2 * (1 / 13 + t2 * (1 / 15)))))))
                total += tl.where(mask_k, tl.maximum(x, 0.0) + 2.0 * t * series, 0.0)
                w = tl.where(x >= 0, 1.0, e) / (1.0 + e)  # sigmoid(x), overflow-free
                acc += w[:, None] * m
            else:
                logits = tl.where(mask_k, logits, float("-inf"))
                new_max = tl.maximum(run_max, logits)
                alpha = tl.exp(run_max - new_max)
                p = tl.exp(logits - new_max)  # 0 on masked lanes
                total = total * alpha + p
                acc = acc * alpha[:, None] + p[:, None] * m
                run_max = new_max
        out = b * tl.num_programs(1) + split
        if NCE:
            tl.store(stats_ptr + out * 3, tl.sum(total, axis=0))
            tl.store(stats_ptr + out * 3 + 1, 0.0)
            row = tl.sum(acc, axis=0)  # (BD,)
        else:
            top = tl.max(run_max, axis=0)
            lane = tl.exp(run_max - top)  # (BK,) each lane's sums, rescaled to the split's max
            tl.store(stats_ptr + out * 3, tl.sum(total * lane, axis=0))
            tl.store(stats_ptr + out * 3 + 1, top)
            row = tl.sum(acc * lane[:, None], axis=0)  # (BD,)
        tl.store(stats_ptr + out * 3 + 2, tl.sum(logit_sum, axis=0))
        tl.store(rows_ptr + out * D + offs_d, row, mask=mask_d)
