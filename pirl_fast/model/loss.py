"""PIRL's contrastive losses against the memory bank.

    total = lam * L(m_I, g(v_It)) + (1 - lam) * L(m_I, f(v_I))           (jigsaw, image terms)

L is selectable:
  nce      the paper's loss (its equations 3-4, a binary NCE), as the reference implementation
           computes it (NPID-style): P = exp(s/tau) / Z, noise constant c = K/|D| (uniform noise
           over the |D| samples, K draws);
           loss = -mean_b[ log(P0/(P0+c)) + sum_k log(c/(Pk+c)) ]
  infonce  the softmax form: cross-entropy over [pos, neg_1..neg_K] / tau with the positive as the
           class (InfoNCE). Not in the paper; the reference uses it in its improved MLP-head recipe
           (vissl configs/config/pretrain/pirl/models/resnet50_mlphead.yaml: loss_type
           "cross_entropy", temperature 0.1).

Scores s are cosine similarities (unit rows). Everything is computed in float32, through
softplus / log-sum-exp so that exp(s/tau) (up to e^14 at tau=0.07) never overflows.

Z: the normaliser is estimated once, on the first batch, as mean(exp(s/tau)) * |D| over that
batch's positive and negative scores, averaged over ranks, then frozen. `loss.z` says from what:

  shared    (default; the reference's) one Z, estimated on the first batch of the jigsaw (patch) term and
            used for both terms: vissl/losses/nce_loss.py keeps Z in one NCEAverage buffer
            (params[2]), computed in forward when it is still < 0; the patch output is the first
            the loss sees (MULTI_INPUT_HEAD_MAPPING lists "patches" first), so it sets Z and the
            image term finds it set.
  per_term  one Z per term, each from its own first batch: the two terms score different
            embeddings (g and f) whose score distributions differ, so each term's P = exp(s/tau)/Z
            is normalised with its own scores' mean. README "Z" gives the measured effect.

Both are buffers (`z_jigsaw`, `z_image`; with shared they hold the same value), NaN until
estimated, and saved in state_dict so a resumed run keeps them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pirl_fast.model.diagnostics import bank_cosine, cosine_f_g
from pirl_fast.runtime import dist

KINDS = ("nce", "infonce")
Z_MODES = ("per_term", "shared")


def _check(pos: Tensor, neg: Tensor, temperature: float) -> None:
    if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(f"expected pos (B,) and neg (B, K); got {tuple(pos.shape)} and {tuple(neg.shape)}")
    if neg.shape[1] < 1:
        raise ValueError("need at least one negative per sample (K >= 1)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (the paper uses 0.07)")


def nce_loss(pos: Tensor, neg: Tensor, temperature: float, num_data: int, z: Tensor | float) -> Tensor:
    """NPID-style NCE: pos (B,), neg (B, K) cosine scores -> scalar, float32."""
    _check(pos, neg, temperature)
    k = neg.shape[1]
    log_c = math.log(k / num_data)  # log of the noise constant K/|D|
    log_z = torch.log(torch.as_tensor(z, dtype=torch.float32, device=pos.device))
    log_p0 = pos.float() / temperature - log_z  # (B,)   log P0
    log_pk = neg.float() / temperature - log_z  # (B, K) log Pk
    # -log(P0/(P0+c)) = log(1 + c/P0) = softplus(log c - log P0);  -log(c/(Pk+c)) = softplus(log Pk - log c)
    per_sample = F.softplus(log_c - log_p0) + F.softplus(log_pk - log_c).sum(1)  # (B,)
    return per_sample.mean()


@torch.no_grad()
def estimate_z(pos: Tensor, neg: Tensor, temperature: float, num_data: int) -> Tensor:
    """Z = mean(exp(s/tau)) * |D| over all of pos (B,) and neg (B, K), averaged over ranks: scalar float32."""
    _check(pos, neg, temperature)
    s = torch.cat([pos.float().reshape(-1), neg.float().reshape(-1)]) / temperature  # (B + B*K,)
    log_mean = torch.logsumexp(s, 0) - math.log(s.numel())  # log mean(exp(s/tau)), overflow-free
    return dist.all_reduce_mean(torch.exp(log_mean) * num_data)


def info_nce_loss(pos: Tensor, neg: Tensor, temperature: float) -> Tensor:
    """Softmax cross-entropy over [pos, neg_1..neg_K] / tau with the positive at 0: scalar, float32."""
    _check(pos, neg, temperature)
    logits = torch.cat([pos.float().unsqueeze(1), neg.float()], dim=1) / temperature  # (B, 1+K)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


@dataclass
class LossConfig:
    # nce (the paper's, as the reference computes it: conf/loss/nce.yaml) | infonce (the reference's MLP-head
    # recipe, and the better choice on tiny datasets: conf/loss/infonce.yaml, README "Loss on tiny data")
    kind: str = "nce"
    temperature: float = 0.07  # tau, the paper's (NPID's too); smaller sharpens the softmax over negatives
    lam: float = 0.5  # lam*L(m, g) + (1-lam)*L(m, f); the paper found 0.5 best and the result sensitive to it
    # nce only: shared (the reference's: one Z from the jigsaw term's first batch, used for both) | per_term (one Z
    # per term, each from its own first batch). shared learned more in the one comparison made (README "loss.z")
    z: str = "shared"


@dataclass
class LossTerms:
    total: Tensor  # lam * jigsaw + (1 - lam) * image, what backward() runs on
    jigsaw: Tensor  # L(m_I, g)
    image: Tensor  # L(m_I, f)
    # Diagnostics, detached 0-dim tensors left on the device (pirl_fast/model/diagnostics.py): PIRL's
    # pos_<term> / neg_<term> (mean positive and negative cosine score of each term) and cos_f_g;
    # Jigsaw's acc_jigsaw.
    scores: dict[str, Tensor] = field(default_factory=dict)


class PIRLCriterion(nn.Module):
    """forward(f, g, index, bank) -> LossTerms; holds the frozen NCE normalisers as buffers."""

    def __init__(self, cfg: LossConfig, num_data: int):
        super().__init__()
        if cfg.kind not in KINDS:
            raise ValueError(f"loss.kind={cfg.kind!r} is unknown; choose one of {KINDS}")
        if cfg.z not in Z_MODES:
            raise ValueError(f"loss.z={cfg.z!r} is unknown; choose one of {Z_MODES}")
        if not 0.0 <= cfg.lam <= 1.0:
            raise ValueError(f"loss.lam={cfg.lam} must lie in [0, 1] (the paper uses 0.5)")
        if not cfg.temperature > 0:
            raise ValueError(f"loss.temperature={cfg.temperature} must be > 0 (the paper uses 0.07)")
        if num_data < 1:
            raise ValueError(f"num_data={num_data} must be the dataset size (>= 1)")
        self.cfg = cfg
        self.num_data = num_data
        self.register_buffer("z_jigsaw", torch.tensor(float("nan")))  # NaN = not estimated yet
        self.register_buffer("z_image", torch.tensor(float("nan")))
        self._z_ready: bool | None = False  # None = unknown (after a load): read the buffers once

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._z_ready = None

    def _term(self, q: Tensor, pos: Tensor, bank, z: Tensor, name: str, scores: dict[str, Tensor]) -> Tensor:
        """One term against K fresh negatives (pirl_fast.model.bank_loss); its mean positive and negative scores go
        into `scores` as pos_<name>, neg_<name> (detached, on the device: the collapse diagnostics)."""
        index_neg = bank.sample_negatives(q.shape[0])  # (B, K), a fresh draw per term
        if self.cfg.kind == "nce" and not self._z_ready:  # first batch: Z needs the scores once
            if name == "image" and self.cfg.z == "shared":  # the jigsaw term, first, has just set it
                z.copy_(self.z_jigsaw)
            else:
                with torch.no_grad():
                    neg = bank.scores(q, index_neg)  # (B, K)
                z.copy_(estimate_z(pos.detach(), neg, self.cfg.temperature, self.num_data))
        # One pass over the negatives: the loss and its query gradient together. The indices were
        # drawn by the bank, in range by construction: no range check.
        term = bank.loss(q, pos, index_neg, self.cfg.kind, self.cfg.temperature, self.num_data, z,
                         check_index=False)
        scores[f"pos_{name}"], scores[f"neg_{name}"] = term.pos_mean, term.neg_mean
        return term.loss

    def forward(self, f: Tensor, g: Tensor, index: Tensor, bank) -> LossTerms:
        """f, g (B, D) unit embeddings of the image and the patches; index (B,) the samples' bank rows."""
        if self._z_ready is None:  # once after a checkpoint load: one host read, never per step
            self._z_ready = bool(torch.isfinite(self.z_jigsaw) & torch.isfinite(self.z_image))
        m = bank.rows(index)  # (B, D) float32, detached: the positives m_I
        f, g = f.float(), g.float()
        scores: dict[str, Tensor] = {}
        jigsaw = self._term(g, (m * g).sum(1), bank, self.z_jigsaw, "jigsaw", scores)  # first draw
        image = self._term(f, (m * f).sum(1), bank, self.z_image, "image", scores)  # second draw
        self._z_ready = True
        lam = self.cfg.lam
        return LossTerms(total=lam * jigsaw + (1.0 - lam) * image, jigsaw=jigsaw, image=image, scores=scores)


class PIRLObjective:
    """method=pirl in the trainer's step (as JigsawObjective, pirl_fast/model/jigsaw.py): the model maps (images,
    patches) to f, g (B, D), scored against the bank's old rows; after the optimiser step the rows become f."""

    def __init__(self, criterion: PIRLCriterion, bank):
        self.criterion, self.bank = criterion, bank

    def inputs(self, batch) -> tuple[Tensor, Tensor]:
        return batch.images, batch.patches

    def __call__(self, outputs: tuple[Tensor, Tensor], batch) -> LossTerms:
        f, g = outputs  # (B, D), (B, D) float32, unit rows
        terms = self.criterion(f, g, batch.index, self.bank)  # fp32, against the bank's old rows
        terms.scores["cos_f_g"] = cosine_f_g(f, g)
        return terms

    def update(self, outputs: tuple[Tensor, Tensor], batch) -> None:
        self.bank.update(batch.index, outputs[0].detach())  # after the loss: the positives were the old rows

    def interval_diagnostics(self) -> dict[str, Tensor]:
        return {"bank_cos": bank_cosine(self.bank.bank)}
