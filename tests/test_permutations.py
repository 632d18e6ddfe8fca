"""Patch orders: the fixed max-Hamming set and the uniform per-sample draw."""

import itertools

import pytest
import torch

from pirl_fast.data.permutations import all_permutations, hamming, max_hamming_permutations, random_permutations


def is_permutation(rows: torch.Tensor) -> bool:
    n = rows.shape[1]
    return bool((rows.sort(dim=1).values == torch.arange(n)).all())


def brute_min_hamming(rows: list[tuple[int, ...]]) -> int:
    """Smallest pairwise Hamming distance, by plain loops."""
    return min(sum(x != y for x, y in zip(a, b)) for a, b in itertools.combinations(rows, 2))


@pytest.mark.parametrize("P,num_cells", [(1, 9), (30, 9), (100, 9), (24, 4), (50, 5)])
def test_fixed_set_is_distinct_permutations(P, num_cells):
    perms = max_hamming_permutations(P, num_cells, seed=3)
    assert perms.shape == (P, num_cells) and perms.dtype == torch.int64
    assert is_permutation(perms)
    assert len({tuple(r) for r in perms.tolist()}) == P


def test_fixed_set_is_deterministic_and_seeded():
    a = max_hamming_permutations(40, 9, seed=0)
    assert torch.equal(a, max_hamming_permutations(40, 9, seed=0))
    assert not torch.equal(a, max_hamming_permutations(40, 9, seed=1))


def test_greedy_step_maximises_min_distance_brute_force():
    """Every permutation after the first is at the largest possible min distance from those before it."""
    num_cells, P = 5, 12
    perms = [tuple(r) for r in max_hamming_permutations(P, num_cells, seed=7).tolist()]
    candidates = list(itertools.permutations(range(num_cells)))
    for k in range(1, P):
        best = max(min(sum(x != y for x, y in zip(c, q)) for q in perms[:k]) for c in candidates)
        got = min(sum(x != y for x, y in zip(perms[k], q)) for q in perms[:k])
        assert got == best, f"step {k}: min distance {got}, brute force best {best}"


@pytest.mark.parametrize("P", [2, 10, 64])
def test_min_hamming_matches_brute_force(P):
    perms = max_hamming_permutations(P, 9, seed=0)
    d = hamming(perms, perms) + 100 * torch.eye(P, dtype=torch.int64)  # mask the diagonal
    assert int(d.min()) == brute_min_hamming([tuple(r) for r in perms.tolist()])
    # Nine mutually derangement-apart orders exist (rows of a Latin square), so a greedy start is at 9.
    if P <= 2:
        assert int(d.min()) == 9


def test_all_permutations_count():
    assert all_permutations(4).shape == (24, 4)
    with pytest.raises(ValueError, match="num_cells"):
        all_permutations(10)
    with pytest.raises(ValueError, match="P must be"):
        max_hamming_permutations(0)


def test_random_permutations_valid_deterministic_uniform():
    g = torch.Generator().manual_seed(0)
    perms = random_permutations(9000, 9, g)
    assert perms.shape == (9000, 9) and perms.dtype == torch.int64 and is_permutation(perms)
    again = random_permutations(9000, 9, torch.Generator().manual_seed(0))
    assert torch.equal(perms, again)
    # Each cell lands in each position ~1/9 of the time (1000 of 9000; 5 sigma is about 150).
    counts = torch.stack([(perms == c).sum(0) for c in range(9)])  # (cell, position)
    assert int(counts.min()) > 850 and int(counts.max()) < 1150, counts
    # Birthday count: 9000 uniform draws from 9! orders repeat about 9000^2 / (2 * 9!) = 112 times
    # (standard deviation ~11); a draw from a small subset would repeat far more.
    assert len({tuple(r) for r in perms.tolist()}) > 9000 - 112 - 60


def reference_selection(num_perms: int, num_patches: int, first: int, method: str) -> list[tuple[int, ...]]:
    """facebookresearch/vissl extra_scripts/generate_jigsaw_permutations.py, its loop as written there (numpy,
    np.delete of each chosen row, scipy's cdist 'hamming'), with the first permutation given instead of
    np.random.randint(total_perms)."""
    import numpy as np
    from scipy.spatial.distance import cdist

    all_perms = np.array(list(itertools.permutations(list(range(num_patches)))))
    j = first
    for idx in range(num_perms):
        if idx == 0:
            selected_perms = all_perms[j].reshape([1, -1])
        else:
            selected_perms = np.concatenate([selected_perms, all_perms[j].reshape([1, -1])], axis=0)
        all_perms = np.delete(all_perms, j, axis=0)
        D = cdist(selected_perms, all_perms, metric="hamming")
        if method == "max_avg":
            j = D.mean(axis=0).argmax()
        else:
            j = D.min(axis=0).argmax()
    return [tuple(r) for r in selected_perms.tolist()]


@pytest.mark.parametrize("rule", ["max_avg", "max_min"])
@pytest.mark.parametrize("num_cells,P,seed", [(5, 40, 0), (5, 100, 1), (6, 60, 2), (7, 50, 3)])
def test_the_reference_script_selects_the_same_set(rule, num_cells, P, seed):
    ours = [tuple(r) for r in max_hamming_permutations(P, num_cells, seed, rule).tolist()]
    first = [tuple(r) for r in all_permutations(num_cells).tolist()].index(ours[0])
    assert ours == reference_selection(P, num_cells, first, rule)


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="max_avg"):
        max_hamming_permutations(10, 4, 0, "max_sum")
