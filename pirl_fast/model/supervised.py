"""The supervised upper bound (`method=supervised`): the same trunk trained with the labels.

A self-supervised representation is judged between two plain baselines: raw pixels below it, and
the same network trained with labels above it (DESIGN.md). This is the upper one, trained by the
same trainer as PIRL and Jigsaw, so the comparison changes one thing only, the objective: the same
trunk and initial weights (the trunk is built first, from the same seed, as in PIRLModel), the same
shards, image view and augmentation, batch, LR schedule and epochs.

    logits = classifier(trunk(v_I))    (B, C)   res5 average-pooled -> Linear
    loss   = cross-entropy(logits, Batch.label)

The patch view is not used (the loader still cuts it: one code path for every method). Evaluation
reads the trunk only, as it does for PIRL and Jigsaw.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pirl_fast.model.loss import LossTerms
from pirl_fast.model.network import ModelConfig, TrunkModel


class SupervisedModel(TrunkModel):
    """ResNet trunk + one Linear classifier; forward(images) -> logits (B, num_classes), float32."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        if num_classes < 2:
            raise ValueError(f"method=supervised needs the number of classes: set model.num_classes to C >= 2 (the "
                             f"shard manifest's classes); got {num_classes}")
        super().__init__(cfg)
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.trunk_dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images)).float()  # (B, C); float32 for the loss under autocast


class SupervisedObjective:
    """method=supervised in the trainer's step (as PIRLObjective and JigsawObjective): cross-entropy on
    Batch.label, reported as the `image` term (total = image, jigsaw = 0); no bank."""

    def __init__(self, criterion: nn.CrossEntropyLoss):
        self.criterion = criterion

    def inputs(self, batch) -> tuple[Tensor]:
        return (batch.images,)

    def __call__(self, logits: Tensor, batch) -> LossTerms:
        labels = batch.label.to(device=logits.device, dtype=torch.long)  # (B,)
        if not logits.is_cuda and bool((labels < 0).any()):  # on CUDA a bad label trips cross_entropy's own assert
            raise ValueError("method=supervised: some samples have no label (-1): the shards were written without "
                             "classes (or are multi-label); shard an ImageFolder or pass --labels to the sharder")
        ce = self.criterion(logits, labels)
        terms = LossTerms(total=ce, jigsaw=torch.zeros_like(ce), image=ce)
        terms.scores["acc_train"] = (logits.detach().argmax(1) == labels).float().mean()
        return terms

    def update(self, logits: Tensor, batch) -> None:
        pass  # the bank is kept (one checkpoint format) but unused

    def interval_diagnostics(self) -> dict[str, Tensor]:
        return {}
