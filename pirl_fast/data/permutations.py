"""Patch orders for the jigsaw view: any of 9! permutations, or a fixed max-Hamming set.

PIRL presents the nine patches of an image in a random order and does not predict the order
(the jigsaw head only concatenates the nine patch features in the order given). The order is
drawn per sample either from all 9! = 362,880 permutations (`random_permutations`, the PIRL
default) or from a fixed set of P permutations chosen so that they are as far apart as
possible in Hamming distance (`max_hamming_permutations`), the selection of Noroozi & Favaro,
"Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles", ECCV 2016,
which PIRL's jigsaw baseline uses.

A permutation `perm` (num_cells,) means: position j shows the patch cut from cell perm[j]
(cells numbered row-major).
"""

from __future__ import annotations

import itertools
import math

import torch

# Above this many cells the full list of num_cells! permutations no longer fits in memory
# (9! = 362,880 rows is 26 MB as int64; 10! would be 290 MB).
MAX_EXHAUSTIVE_CELLS = 9


def all_permutations(num_cells: int) -> torch.Tensor:
    """Every permutation of range(num_cells), lexicographic order.  (num_cells!, num_cells) int64."""
    if not 1 <= num_cells <= MAX_EXHAUSTIVE_CELLS:
        raise ValueError(f"num_cells must be in 1..{MAX_EXHAUSTIVE_CELLS} to list all permutations, got {num_cells}")
    return torch.tensor(list(itertools.permutations(range(num_cells))), dtype=torch.int64)


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamming distances between every row of a (M, n) and every row of b (K, n).  (M, K) int64."""
    return (a[:, None, :] != b[None, :, :]).sum(-1)


def max_hamming_permutations(P: int, num_cells: int = 9, seed: int = 0) -> torch.Tensor:
    """A fixed set of P permutations with large pairwise Hamming distance.  (P, num_cells) int64.

    Greedy maximal-Hamming selection (Noroozi & Favaro 2016, Algorithm 1): start from one
    permutation drawn at random, then repeatedly add the candidate whose minimum distance to the
    permutations chosen so far is largest (ties broken by the lowest lexicographic index, so the
    result depends on `seed` only). Deterministic: the same (P, num_cells, seed) always gives the
    same set, on every rank and machine.
    """
    total = math.factorial(num_cells)
    if not 1 <= P <= total:
        raise ValueError(f"P must be in 1..{total} (= {num_cells}!), got {P}")
    candidates = all_permutations(num_cells)  # (n!, n)
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(total, (1,), generator=generator))
    chosen = [first]
    # min distance of every candidate to the chosen set, updated incrementally: O(P * n!) work.
    min_dist = hamming(candidates, candidates[first : first + 1]).squeeze(1)  # (n!,)
    for _ in range(P - 1):
        best = int(torch.argmax(min_dist))  # argmax returns the first maximum: the lowest index
        chosen.append(best)
        min_dist = torch.minimum(min_dist, hamming(candidates, candidates[best : best + 1]).squeeze(1))
    return candidates[chosen].clone()


def random_permutations(B: int, num_cells: int = 9, generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """B independent uniform permutations of range(num_cells).  (B, num_cells) int64 on `device`.

    argsort of i.i.d. uniform keys is a uniform permutation (ties have probability ~0 in fp32 at
    these sizes) and runs as one kernel on the GPU. `generator` must live on `device`.
    """
    keys = torch.rand(B, num_cells, generator=generator, device=device)  # (B, n)
    return torch.argsort(keys, dim=1)
