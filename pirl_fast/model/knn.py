"""Weighted k-nearest-neighbour classification of embeddings (the NPID protocol).

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination" (CVPR 2018),
Sec. 3.4, the kNN monitor every contrastive method since reports:

    s_i      = <f̂(x), f̂(x_i)>                   cosine similarity to training sample i (features
                                                   L2-normalised, so the dot product is the cosine)
    N_k(x)   = the k training samples with the largest s_i
    w_i      = exp(s_i / τ)                        τ = 0.07, the same temperature as the pre-training NCE
    score_c  = Σ_{i ∈ N_k(x), y_i = c} w_i         vote of each class
    predict  = argmax_c score_c                    top-5: the five largest scores

k = 200 and τ = 0.07 are NPID's values (their Table 3 found k = 200 best on ImageNet; τ is the
NCE temperature, so the weights have the same sharpness as the training objective).

Everything is batched: the (M, N) similarity matrix is built one chunk of queries at a time, so
memory is chunk·N floats, never M·N (ImageNet: 50k queries × 1.28M keys would be 256 GB).

Used by `python -m pirl_fast.eval knn` (pirl_fast/eval/knn.py: frozen features of the train split) and
by the trainer's kNN monitor (pirl_fast/train/knn_monitor.py: the memory bank's rows), so it sits in
the model stage beside the bank, below both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_K = 200  # NPID Table 3
DEFAULT_TEMPERATURE = 0.07  # the NCE temperature of pre-training


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
               num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
               chunk_size: int = 1024) -> torch.Tensor:
    """Class scores (M, C) for each query: the sum of exp(sim/τ) over its k nearest training samples
    of that class. Features are L2-normalised here, so callers may pass raw features."""
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError(f"knn_scores: features must be 2-D (num_samples, dim); got train "
                         f"{tuple(train_features.shape)} and query {tuple(query_features.shape)}")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"knn_scores: feature dims differ: train {train_features.shape[1]} vs query "
                         f"{query_features.shape[1]}; extract both with the same network")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"knn_scores: train_labels {tuple(train_labels.shape)} must be ({train_features.shape[0]},)")
    if train_features.shape[0] == 0:
        raise ValueError("knn_scores: no training features (is the train shard directory empty?)")
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn_scores: need k >= 1 and temperature > 0; got k={k}, temperature={temperature}")
    if int(train_labels.max()) >= num_classes or int(train_labels.min()) < 0:
        raise ValueError(f"knn_scores: train labels span [{int(train_labels.min())}, {int(train_labels.max())}] "
                         f"but num_classes={num_classes}")
    k = min(k, train_features.shape[0])
    keys = F.normalize(train_features.float(), dim=1)  # (N, D)
    labels = train_labels.long().to(keys.device)  # (N,)
    out = []
    for start in range(0, query_features.shape[0], chunk_size):
        q = F.normalize(query_features[start:start + chunk_size].float().to(keys.device), dim=1)  # (m, D)
        sim = q @ keys.T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        weights = (top_sim / temperature).exp()  # (m, k)
        scores = torch.zeros(q.shape[0], num_classes, device=keys.device)  # (m, C)
        scores.scatter_add_(1, labels[top_idx], weights)  # per-class sum of the neighbours' weights
        out.append(scores)
    return torch.cat(out, dim=0) if out else torch.zeros(0, num_classes)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Fraction of rows whose true label is among the top-k scores, for each k (k capped at C)."""
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"topk_accuracy: {scores.shape[0]} score rows but {labels.shape[0]} labels")
    if scores.shape[0] == 0:
        raise ValueError("topk_accuracy: no samples to score (is the val shard directory empty?)")
    labels = labels.long().to(scores.device)
    ranked = scores.argsort(dim=1, descending=True)  # (M, C)
    hits = ranked == labels[:, None]  # (M, C), one True per row
    return [hits[:, : min(k, scores.shape[1])].any(dim=1).float().mean().item() for k in ks]
