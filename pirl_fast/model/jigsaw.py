"""The Jigsaw pretext baseline (`method=jigsaw`): predict which permutation shuffled the patches.

Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles"
(ECCV 2016), in the ResNet form PIRL compares against (Goyal et al. 2019; PIRL Table 1: Jigsaw
45.7% vs PIRL 63.6% ImageNet linear top-1). Same trunk and same patch pipeline as PIRL, so the
two differ only in the objective: PIRL makes g(v_It) invariant to the shuffle, Jigsaw makes the
representation *covariant* with it, because it must tell the shuffles apart.

    e_j    = relu(patch_head(trunk(patch_j)))      (B*9, D)   per patch, shared weights
    e      = concat_9(e_j) in the presented order  (B, 9*D)   the order *is* the signal here
    logits = classifier(e)                         (B, P)     which of the P permutations

Target: `Batch.perm_id`, the position of the sample's permutation in the fixed max-Hamming set of
P = data.num_permutations permutations (`pirl_fast.data.permutations.max_hamming_permutations`; the
loader draws from that set when P > 0). The trainer's step runs it through `JigsawObjective`.

Two heads (`model.jigsaw_head`):

    reference  the reference's ImageNet Jigsaw (facebookresearch/vissl
               configs/config/pretrain/jigsaw/jigsaw_8gpu_resnet.yaml, HEAD.PARAMS):
               per patch Linear 2048 -> 1000, BatchNorm1d, ReLU ("mlp" dims [2048, 1000],
               use_bn, use_relu, skip_last_layer_relu_bn False); concatenation of the 9
               ("siamese_concat_view", num_towers 9): 9000; Linear 9000 -> P ("mlp" [9000, 2000]
               for its 2,000 permutations). `experiment=jigsaw_in1k_r50` trains it.
    light      (default) per patch Linear trunk_dim -> model.embed_dim, ReLU; concat; Linear -> P.
               The smallest head that can solve the task, for CPU-sized runs and ResNet-18:
               PIRL's patch-path width plus a 9D x P classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pirl_fast.model.loss import LossTerms
from pirl_fast.model.network import ModelConfig, TrunkModel

JIGSAW_HEADS = ("light", "reference")
REFERENCE_PATCH_WIDTH = 1000  # jigsaw_8gpu_resnet.yaml: ["mlp", {"dims": [2048, 1000], ...}] per patch


class JigsawModel(TrunkModel):
    """ResNet trunk + per-patch head + permutation classifier; forward(patches) -> logits (B, P)."""

    def __init__(self, cfg: ModelConfig, num_permutations: int):
        if cfg.jigsaw_head not in JIGSAW_HEADS:
            raise ValueError(f"model.jigsaw_head={cfg.jigsaw_head!r} is unknown; choose one of "
                             f"{', '.join(JIGSAW_HEADS)}")
        if num_permutations < 2:
            raise ValueError(
                f"method=jigsaw needs a fixed permutation set to classify: set data.num_permutations to P >= 2 "
                f"(the paper's Jigsaw uses P = 1000; got {num_permutations}; 0 means 'any of 9!', which has no "
                "class ids)"
            )
        super().__init__(cfg)
        self.num_permutations = num_permutations
        if cfg.jigsaw_head == "reference":  # Linear -> BN -> ReLU per patch, as the reference's "mlp" with use_bn
            self.patch_width = REFERENCE_PATCH_WIDTH
            self.patch_head = nn.Sequential(nn.Linear(self.trunk_dim, REFERENCE_PATCH_WIDTH),
                                            nn.BatchNorm1d(REFERENCE_PATCH_WIDTH), nn.ReLU(inplace=True))
        else:
            self.patch_width = cfg.embed_dim
            self.patch_head = nn.Linear(self.trunk_dim, cfg.embed_dim)  # the ReLU is applied in forward
        self.classifier = nn.Linear(cfg.num_patches * self.patch_width, num_permutations)

    def forward(self, patches: Tensor) -> Tensor:
        """patches (B*P, 3, h, w), sample b's patches contiguous in presented order -> logits (B, num_perms)."""
        n, p = patches.shape[0], self.cfg.num_patches
        if n % p != 0:
            raise ValueError(f"got {n} patches, not a multiple of num_patches={p}: patches must be "
                             f"(B*{p}, 3, h, w) with each sample's {p} patches contiguous")
        e = self.patch_head(self.features(patches))  # (B*9, D)
        if self.cfg.jigsaw_head == "light":
            e = F.relu(e)
        e = e.reshape(n // p, p * self.patch_width)  # (B, 9*D), in the presented (shuffled) order
        return self.classifier(e).float()  # (B, P); float32 for the loss even under bf16 autocast


class JigsawLoss(nn.Module):
    """Cross-entropy over the P permutation classes; forward(logits (B,P), perm_id (B,)) -> scalar."""

    def forward(self, logits: Tensor, perm_id: Tensor) -> Tensor:
        if logits.dim() != 2 or perm_id.shape != (logits.shape[0],):
            raise ValueError(f"JigsawLoss: expected logits (B, P) and perm_id (B,); got {tuple(logits.shape)} "
                             f"and {tuple(perm_id.shape)}")
        perm_id = perm_id.to(device=logits.device, dtype=torch.long)
        if perm_id.is_cuda:  # a device-side assert: no host sync in the training step
            torch._assert_async(((perm_id >= 0) & (perm_id < logits.shape[1])).all(),
                                "JigsawLoss: perm_id outside [0, P): method=jigsaw needs data.num_permutations=P > 0 "
                                "and the model's P classes")
            return F.cross_entropy(logits, perm_id)
        if bool((perm_id < 0).any()):
            raise ValueError(
                "JigsawLoss: batch.perm_id has -1 entries: the loader drew permutations from all 9! instead "
                "of a fixed set; method=jigsaw needs data.num_permutations=P > 0 (e.g. 1000 as in the paper)"
            )
        if bool((perm_id >= logits.shape[1]).any()):
            raise ValueError(f"JigsawLoss: perm_id up to {int(perm_id.max())} but the model has {logits.shape[1]} "
                             "classes: model and loader disagree on data.num_permutations")
        return F.cross_entropy(logits, perm_id)

    def terms(self, logits: Tensor, perm_id: Tensor) -> LossTerms:
        """The loss in the trainer's LossTerms shape (total = jigsaw = the cross-entropy, image = 0), so
        the step's logging and finite check stay as they are for PIRL."""
        ce = self(logits, perm_id)
        return LossTerms(total=ce, jigsaw=ce, image=torch.zeros_like(ce))


class JigsawObjective:
    """method=jigsaw in the trainer's step (as PIRLObjective, pirl_fast/model/loss.py): the model maps the
    patches to logits (B, P), the loss classifies the permutation; no bank."""

    def __init__(self, criterion: JigsawLoss):
        self.criterion = criterion

    def inputs(self, batch) -> tuple[Tensor]:
        return (batch.patches,)

    def __call__(self, logits: Tensor, batch) -> LossTerms:
        terms = self.criterion.terms(logits, batch.perm_id)  # total = jigsaw = cross-entropy, image = 0
        terms.scores["acc_jigsaw"] = (logits.detach().argmax(1) == batch.perm_id).float().mean()
        return terms

    def update(self, logits: Tensor, batch) -> None:
        pass  # the bank is kept (one checkpoint format) but unused

    def interval_diagnostics(self) -> dict[str, Tensor]:
        return {}


@torch.no_grad()
def jigsaw_accuracy(logits: Tensor, perm_id: Tensor) -> float:
    """Fraction of samples whose permutation is predicted exactly (chance: 1/P)."""
    return (logits.argmax(dim=1) == perm_id.to(logits.device)).float().mean().item()
