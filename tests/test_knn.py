"""Weighted kNN (pirl_fast.eval.knn): against a slow loop written from the NPID formula, and on clusters
whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from pirl_fast.eval.knn import knn_evaluate, knn_scores, topk_accuracy


def slow_knn_scores(train, train_labels, queries, num_classes, k, temperature):
    """The formula, one query and one neighbour at a time, in float64 Python arithmetic."""
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    keys = [unit(row) for row in train.double().tolist()]
    out = []
    for q in queries.double().tolist():
        q = unit(q)
        sims = [sum(a * b for a, b in zip(q, key)) for key in keys]
        order = sorted(range(len(keys)), key=lambda i: -sims[i])[: min(k, len(keys))]
        scores = [0.0] * num_classes
        for i in order:
            scores[int(train_labels[i])] += math.exp(sims[i] / temperature)
        out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (7, 0.07), (20, 0.5), (1000, 0.1)])
def test_knn_scores_match_slow_loop(k, temperature):
    g = torch.Generator().manual_seed(k)
    train = torch.randn(60, 16, generator=g)
    labels = torch.randint(0, 5, (60,), generator=g)
    queries = torch.randn(13, 16, generator=g)
    fast = knn_scores(train, labels, queries, num_classes=5, k=k, temperature=temperature, chunk_size=4)
    slow = slow_knn_scores(train, labels, queries, 5, k, temperature)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-4, atol=1e-6)


def test_chunking_does_not_change_scores():
    g = torch.Generator().manual_seed(1)
    train, queries = torch.randn(50, 8, generator=g), torch.randn(33, 8, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    a = knn_scores(train, labels, queries, 4, k=10, chunk_size=1)
    b = knn_scores(train, labels, queries, 4, k=10, chunk_size=1000)
    torch.testing.assert_close(a, b)


def clusters(num_classes, per_class, dim, spread, generator):
    centres = torch.randn(num_classes, dim, generator=generator) * 10
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return points, labels


def test_well_separated_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    train, train_labels = clusters(6, 30, 32, spread=0.1, generator=g)
    # The same centres: re-seed so the val points come from the same clusters.
    g = torch.Generator().manual_seed(0)
    val, val_labels = clusters(6, 30, 32, spread=0.1, generator=g)
    val = val + 0.05 * torch.randn(val.shape)
    result = knn_evaluate(train, train_labels, val, val_labels, num_classes=6, k=20)
    assert result.top1 == 1.0 and result.top5 == 1.0
    assert (result.k, result.num_train, result.num_val, result.num_classes) == (20, 180, 180, 6)


def test_shuffled_labels_give_chance_level():
    g = torch.Generator().manual_seed(0)
    train, train_labels = clusters(10, 40, 32, spread=0.1, generator=g)
    val = train + 0.01 * torch.randn(train.shape, generator=g)
    # Labels that carry no information about the features: the classifier cannot beat chance by much.
    random_labels = torch.randint(0, 10, train_labels.shape, generator=g)
    result = knn_evaluate(train, random_labels, val, torch.randint(0, 10, train_labels.shape, generator=g), 10, k=20)
    assert result.top1 < 0.3  # chance is 0.1; 400 samples make > 0.3 a 7-sigma event


def test_k_weighting_lets_near_neighbours_outvote_far_majority():
    # One query; 1 close neighbour of class 0, 3 far neighbours of class 1. With a small temperature
    # exp(sim/τ) makes the close one dominate; an unweighted vote would pick class 1.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [-0.1, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.2]])
    scores = knn_scores(train, labels, query, 2, k=4, temperature=0.07)
    assert scores.argmax().item() == 0
    scores_flat = knn_scores(train, labels, query, 2, k=4, temperature=100.0)  # ~uniform weights
    assert scores_flat.argmax().item() == 1


def test_topk_accuracy_known_answer():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.7, 0.2]])
    labels = torch.tensor([0, 1, 0])
    top1, top2, top5 = topk_accuracy(scores, labels, (1, 2, 5))
    assert top1 == pytest.approx(1 / 3)  # only row 0
    assert top2 == pytest.approx(2 / 3)  # row 1's label is second
    assert top5 == 1.0  # capped at 3 classes


def test_bad_inputs_raise_clear_errors():
    train, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="feature dims differ"):
        knn_scores(train, labels, torch.randn(2, 5), 2)
    with pytest.raises(ValueError, match="num_classes"):
        knn_scores(train, labels, torch.randn(2, 3), num_classes=1)
    with pytest.raises(ValueError, match="no training features"):
        knn_scores(torch.randn(0, 3), torch.zeros(0, dtype=torch.long), torch.randn(2, 3), 2)
