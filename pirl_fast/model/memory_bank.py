"""The PIRL memory bank: one running-average embedding m_i per dataset sample.

    bank            buffer (N, D), unit rows, float32 or bfloat16; moves with .to(), saved in
                    checkpoints, initialised from `seed` so every rank starts identical
    sample_negatives(B) -> (B, K) int64, uniform with replacement over [0, N); every call is a
                    fresh draw. The positive is not excluded: the paper draws the negatives from
                    the data other than I, the reference implementation draws uniformly over all N
                    rows (vissl/losses/nce_loss.py, NCEAverage.do_negative_sampling: an
                    AliasMethod over N equal weights), and we follow the reference (for ImageNet,
                    K = 32,000 of N = 1.28M: about 2.5% of the samples get I among their K).
    scores(q, index)    -> (B, K) <q_b, m_index[b,k]> via the fused kernel (never (B, K, D))
    loss(q, pos, index, kind, ...) -> one loss term in one pass over the negatives (pirl_fast.model.bank_loss)
    rows(index)         -> (B, D) float32 copy of m_index (the positives)
    update(index, f)    -> gathers (index, f) from all ranks, then per distinct index i:
                           m_i <- normalize(mu * m_i + (1 - mu) * mean of the f given for i)

First update of a row (`first_update`): "blend" (the reference's) applies the formula above to the
random initial row too, so a sample's positive keeps mu of its random start after one epoch,
mu^2 after two, ...; "replace" sets m_i <- normalize(mean of the f given for i) the first time
row i is written, so from the second epoch on every positive is a real embedding of its image.
A `seen` buffer (one bool per row, in checkpoints) records which rows were written; the
replacement zeroes those rows' old value inside the update, without a host read.

Duplicates: an index given more than once in the gathered batch (the same sample on two
ranks, or a padded last batch) is updated once, with the mean of its embeddings, summed in
gathered order (rank, then batch position). Nothing depends on which of several writes lands
last, so every rank computes the same bits from the same gathered batch and the copies never
drift apart.

Negatives come from a generator reseeded per draw from (seed, rank, draw count): different
ranks draw different negatives, nothing is synchronised, and the draw count travels in
state_dict (extra state), so a resumed run draws exactly the negatives it would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pirl_fast.model.bank_kernels import KERNELS, bank_scores, bank_update, check_index
from pirl_fast.model.bank_loss import BankLoss, bank_loss
from pirl_fast.runtime import dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FIRST_UPDATES = ("blend", "replace")
_MASK64 = (1 << 64) - 1


@dataclass
class BankConfig:
    momentum: float = 0.5  # mu, the weight of the old row: m <- normalize(mu*m + (1-mu)*f); the paper's 0.5
    num_negatives: int = 32000  # K per sample and per loss term, drawn uniformly with replacement (the paper's 32,000)
    # storage: float32 | bfloat16 (halves bank memory and gather traffic, ImageNet: 655 MB -> 328 MB, at some
    # precision cost)
    dtype: str = "float32"
    # auto (the fused Triton kernel on CUDA, the PyTorch reference on CPU) | triton | torch | naive (bank_kernels)
    kernel: str = "auto"
    seed: int = 0  # initial rows and the negative stream (offset by rank, saved in checkpoints)
    # blend (the reference): a row's first update keeps mu of its random start, mu^2 after two epochs, ...;
    # replace: the first embedding replaces it, so every positive is a real embedding from the second epoch
    # on (what short runs on small data need; BENCHMARKS.md)
    first_update: str = "blend"


def _mix(*values: int) -> int:
    """A 64-bit seed from integers (splitmix64 finaliser): nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1  # torch seeds are signed-safe below 2**63


class MemoryBank(nn.Module):
    def __init__(self, num_samples: int, dim: int, cfg: BankConfig):
        super().__init__()
        if cfg.dtype not in DTYPES:
            raise ValueError(f"bank.dtype={cfg.dtype!r} is unknown; choose one of {sorted(DTYPES)}")
        if cfg.kernel not in KERNELS:
            raise ValueError(f"bank.kernel={cfg.kernel!r} is unknown; choose one of {KERNELS}")
        if not 0.0 <= cfg.momentum <= 1.0:
            raise ValueError(f"bank.momentum={cfg.momentum} must lie in [0, 1] (the paper uses 0.5)")
        if cfg.first_update not in FIRST_UPDATES:
            raise ValueError(f"bank.first_update={cfg.first_update!r} is unknown; choose one of {FIRST_UPDATES}")
        if cfg.first_update == "replace" and cfg.momentum >= 1.0:
            raise ValueError("bank.first_update=replace needs bank.momentum < 1 (with momentum 1 the bank never "
                             "takes the embeddings in)")
        if cfg.num_negatives < 1:
            raise ValueError(f"bank.num_negatives={cfg.num_negatives} must be >= 1 (the paper uses 32000)")
        if num_samples < 1 or dim < 1:
            raise ValueError(f"the bank needs num_samples >= 1 and dim >= 1, got {num_samples} and {dim}")
        self.cfg = cfg
        self.num_samples = num_samples
        self.dim = dim
        gen = torch.Generator().manual_seed(cfg.seed)  # CPU generator: identical rows on every rank
        init = F.normalize(torch.randn(num_samples, dim, generator=gen), dim=1)  # (N, D)
        self.register_buffer("bank", init.to(DTYPES[cfg.dtype]))
        self.register_buffer("seen", torch.zeros(num_samples, dtype=torch.bool))  # rows written at least once
        self._draws = 0  # negative draws so far (extra state)
        self._gen: torch.Generator | None = None

    # ------------------------------------------------------------------ negatives
    def sample_negatives(self, batch_size: int) -> Tensor:
        """(B, K) int64 on the bank's device, uniform over [0, N) with replacement; a fresh draw per call."""
        device = self.bank.device
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
        self._gen.manual_seed(_mix(self.cfg.seed, dist.info().rank, self._draws))  # host-side; no sync
        self._draws += 1
        return torch.randint(self.num_samples, (batch_size, self.cfg.num_negatives), generator=self._gen,
                             device=device)  # (B, K)

    def get_extra_state(self) -> dict:
        return {"draws": self._draws, "seed": self.cfg.seed}

    def set_extra_state(self, state: dict) -> None:
        if state.get("seed", self.cfg.seed) != self.cfg.seed:
            raise ValueError(f"checkpoint bank seed {state['seed']} differs from bank.seed={self.cfg.seed}; "
                             "set bank.seed to the checkpoint's to resume its negative stream")
        self._draws = int(state["draws"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "bank"
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.bank.shape):
            raise ValueError(f"checkpoint bank has shape {tuple(state_dict[key].shape)} but this bank is "
                             f"{tuple(self.bank.shape)}: the dataset size (num_samples) must match the checkpoint's")
        if prefix + "seen" not in state_dict and key in state_dict:  # a checkpoint from before `seen` existed:
            state_dict[prefix + "seen"] = torch.ones_like(self.seen)  # count its rows as written (never zeroed)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ reads
    def scores(self, query: Tensor, index: Tensor) -> Tensor:
        """<query[b], m_index[b,k]>: query (B, D), index (B, K) -> (B, K) float32, grad to query only."""
        return bank_scores(query, self.bank, index, self.cfg.kernel)

    def loss(self, query: Tensor, pos: Tensor, index: Tensor, kind: str, temperature: float, num_data: int,
             z: Tensor, check_index: bool = True) -> BankLoss:
        """One loss term of query (B, D) with positive scores pos (B,) against the rows index (B, K).

        The fused one-pass kernel of pirl_fast.model.bank_loss (bank.kernel chooses); BankLoss also carries
        the mean positive and negative scores. check_index=False skips the range check, for indices
        from sample_negatives (in range by construction).
        """
        return bank_loss(query, pos, self.bank, index, kind, temperature, num_data, z, self.cfg.kernel, check_index)

    def rows(self, index: Tensor) -> Tensor:
        """m_index: index (B,) -> (B, D) float32, a detached copy."""
        check_index(index, self.num_samples)
        return self.bank.index_select(0, index).float()  # (B, D)

    # ------------------------------------------------------------------ write
    @torch.no_grad()
    def update(self, index: Tensor, embedding: Tensor) -> None:
        """Gather (index (B,), embedding (B, D)) from all ranks, then blend and normalise those rows.

        Every rank must pass the same B (all_gather needs equal shapes). See the module docstring
        for the duplicate rule.
        """
        if index.dim() != 1 or embedding.shape != (index.shape[0], self.dim):
            raise ValueError(f"update expects index (B,) and embedding (B, {self.dim}); got "
                             f"{tuple(index.shape)} and {tuple(embedding.shape)}")
        index = dist.all_gather_cat(index.to(self.bank.device))  # (W*B,) in rank order
        embedding = dist.all_gather_cat(embedding.detach().float().to(self.bank.device))  # (W*B, D)
        if self.cfg.first_update == "replace":  # rows never written lose their random start: 0 * old row
            keep = self.seen.index_select(0, index).unsqueeze(1)  # (W*B, 1)
            self.bank.index_copy_(0, index, self.bank.index_select(0, index) * keep)  # duplicates write equal rows
        bank_update(self.bank, index, embedding, self.cfg.momentum, self.cfg.kernel)
        self.seen.index_fill_(0, index, True)

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, dim={self.dim}, dtype={self.cfg.dtype}, "
                f"momentum={self.cfg.momentum}, num_negatives={self.cfg.num_negatives}, kernel={self.cfg.kernel}, "
                f"first_update={self.cfg.first_update}")
