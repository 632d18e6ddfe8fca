"""`python -m pirl_fast.eval knn`'s result: top-1 / top-5 of the weighted kNN classifier (Wu et al. 2018,
the rule and its defaults k = 200, tau = 0.07: pirl_fast/model/knn.py), training split -> validation split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pirl_fast.model.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_scores, topk_accuracy


@dataclass(frozen=True)
class KNNResult:
    top1: float  # fraction in [0, 1]
    top5: float  # fraction in [0, 1]; with fewer than 5 classes, top-min(5, C)
    k: int  # the k actually used: min(k, number of training samples)
    temperature: float
    num_train: int
    num_val: int
    num_classes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def knn_evaluate(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, k: int = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE) -> KNNResult:
    """Top-1 / top-5 of the weighted kNN classifier, training set -> validation set."""
    scores = knn_scores(train_features, train_labels, val_features, num_classes, k, temperature)
    top1, top5 = topk_accuracy(scores, val_labels, (1, 5))
    return KNNResult(top1=top1, top5=top5, k=min(k, train_features.shape[0]), temperature=temperature,
                     num_train=train_features.shape[0], num_val=val_features.shape[0], num_classes=num_classes)
