"""Collapse diagnostics: what to look at when a contrastive run goes wrong, logged with the losses.

Per step, on the device, never read by the host there (no synchronisation is added to the step):

    cos_f_g          mean_b <f_b, g_b>: does the image embedding agree with the jigsaw embedding of
                     the same image? It rises as PIRL learns the invariance; at 1.0 with
                     bank_cos also near 1 everything maps to one point (collapse).
    pos_jigsaw,      mean_b <g_b, m_b> and mean_{b,k} <g_b, m_k> (from PIRLCriterion, which computes
    neg_jigsaw       them beside the loss): the jigsaw term's positive and
                     negative scores (cosines). Learning shows as pos - neg growing. In the first
                     epoch the positives are the bank's random initial rows (pos near 0), so a
                     neg well above pos there means the embeddings share a common direction.
    pos_image,       the same for the image term, f against the bank.
    neg_image
    acc_jigsaw       method=jigsaw only: the fraction of permutations classified right (chance 1/P).

At log intervals only (the bank is the same on every rank):

    bank_cos         mean pairwise cosine between bank rows, over up to BANK_SAMPLE rows spread
                     evenly over the bank (fixed rows: no random draw, so resume stays exact).
                     Near 0 for the random initial bank (D=128: about +-0.09 per pair); a value
                     climbing towards 1 is collapse: every sample's memory points the same way.

`IntervalMeans` sums the per-step values on the device and, at a log interval, averages them over
the interval's steps and over ranks with one all-reduce and one host read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pirl_fast.runtime import dist, host_read

BANK_SAMPLE = 1024  # rows for bank_cos: 1024^2 dot products of 128-d rows, ~0.1 ms on a GPU, ~10 ms on a CPU


def cosine_f_g(f: Tensor, g: Tensor) -> Tensor:
    """mean_b <f_b, g_b> of unit rows (B, D), (B, D): a detached 0-dim tensor."""
    return (f.detach().float() * g.detach().float()).sum(1).mean()


@torch.no_grad()
def bank_cosine(bank: Tensor, rows: int = BANK_SAMPLE) -> Tensor:
    """Mean cosine between distinct rows of `bank` (N, D), over up to `rows` evenly spaced rows: 0-dim."""
    n = bank.shape[0]
    if n < 2:
        return torch.zeros((), device=bank.device)
    pick = torch.linspace(0, n - 1, min(rows, n), device=bank.device).round().long().unique()  # (S,)
    m = torch.nn.functional.normalize(bank.index_select(0, pick).float(), dim=1)  # (S, D)
    s = m.shape[0]
    total = m.sum(0)  # (D,): sum_ij <m_i, m_j> = |sum_i m_i|^2
    return (total.dot(total) - s) / (s * (s - 1))  # drop the s diagonal ones


class IntervalMeans:
    """Device-side sums of per-step scalars, averaged over the steps and the ranks when taken."""

    def __init__(self):
        self.sums: dict[str, Tensor] = {}
        self.steps = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.steps += 1

    def take(self, extra: dict[str, Tensor] | None = None) -> dict[str, float]:
        """{name: mean over the interval's steps and the ranks} plus `extra` (already per interval);
        every rank must call it at the same step (one all-reduce), then the sums restart."""
        names = sorted(self.sums)
        values = [self.sums[n] / max(1, self.steps) for n in names]
        extra = extra or {}
        names += list(extra)
        values += list(extra.values())
        self.sums, self.steps = {}, 0
        if not names:
            return {}
        means = host_read.read(dist.all_reduce_mean(torch.stack([v.float().reshape(()) for v in values])))  # one read
        return dict(zip(names, means))
