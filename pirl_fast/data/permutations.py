"""Patch orders for the jigsaw view: any of 9! permutations, or a fixed max-Hamming set.

PIRL presents the nine patches of an image in a random order and does not predict the order
(the jigsaw head only concatenates the nine patch features in the order given). The order is
drawn per sample either from all 9! = 362,880 permutations (`random_permutations`, the PIRL
default) or from a fixed set of P permutations chosen so that they are as far apart as
possible in Hamming distance (`max_hamming_permutations`), the greedy selection of Noroozi &
Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles", ECCV 2016
(Algorithm 1), which PIRL's jigsaw baseline uses. Two rules (data.permutation_set):

  max_avg  each new permutation has the largest *average* Hamming distance to those chosen: the
           reference's (vissl extra_scripts/generate_jigsaw_permutations.py, --method max_avg, its
           default, which wrote hamming_perms_2000_patches_9_max_avg.npy, the file
           configs/config/pretrain/jigsaw/jigsaw_8gpu_resnet.yaml loads)
  max_min  the largest *minimum* distance to those chosen (the script's --method max_min)

Both start from one permutation drawn uniformly and break ties at the lowest lexicographic index,
as the script's argmax over the remaining candidates does. The reference's file itself is a
download from one unseeded run: the rule is the same, the set is not (nor need it be: the first
draw is random there too).

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
PERMUTATION_SETS = ("max_min", "max_avg")  # data.permutation_set


def all_permutations(num_cells: int) -> torch.Tensor:
    """Every permutation of range(num_cells), lexicographic order.  (num_cells!, num_cells) int64."""
    if not 1 <= num_cells <= MAX_EXHAUSTIVE_CELLS:
        raise ValueError(f"num_cells must be in 1..{MAX_EXHAUSTIVE_CELLS} to list all permutations, got {num_cells}")
    return torch.tensor(list(itertools.permutations(range(num_cells))), dtype=torch.int64)


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamming distances between every row of a (M, n) and every row of b (K, n).  (M, K) int64."""
    return (a[:, None, :] != b[None, :, :]).sum(-1)


def max_hamming_permutations(P: int, num_cells: int = 9, seed: int = 0, rule: str = "max_min") -> torch.Tensor:
    """A fixed set of P permutations with large pairwise Hamming distance.  (P, num_cells) int64.

    Greedy selection (module docstring): start from one permutation drawn at random, then
    repeatedly add the candidate whose minimum (rule="max_min") or total, i.e. average
    (rule="max_avg"), distance to the permutations chosen so far is largest; ties go to the lowest
    lexicographic index, so the result depends on `seed` only. Deterministic: the same
    (P, num_cells, seed, rule) always gives the same set, on every rank and machine.
    """
    if rule not in PERMUTATION_SETS:
        raise ValueError(f"data.permutation_set={rule!r} is unknown; choose one of {PERMUTATION_SETS}")
    total = math.factorial(num_cells)
    if not 1 <= P <= total:
        raise ValueError(f"P must be in 1..{total} (= {num_cells}!), got {P}")
    candidates = all_permutations(num_cells)  # (n!, n)
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(total, (1,), generator=generator))
    chosen = [first]
    # score of every candidate against the chosen set, updated incrementally: O(P * n!) work, in the
    # reference's float64 arithmetic (its cdist 'hamming' is count / n, its mean a sum in selection order
    # divided by the count), so that equal averages break the same way; chosen rows are taken out with -1.
    def distance(k: int) -> torch.Tensor:  # (n!,) float64
        return hamming(candidates, candidates[k : k + 1]).squeeze(1).double() / num_cells

    total = distance(first)  # max_min: the minimum so far; max_avg: the sum so far
    for _ in range(P - 1):
        score = total if rule == "max_min" else total / len(chosen)
        score[chosen] = -1.0
        best = int(torch.argmax(score))  # argmax returns the first maximum: the lowest index
        chosen.append(best)
        total = torch.minimum(total, distance(best)) if rule == "max_min" else total + distance(best)
    return candidates[chosen].clone()


def random_permutations(B: int, num_cells: int = 9, generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """B independent uniform permutations of range(num_cells).  (B, num_cells) int64 on `device`.

    argsort of i.i.d. uniform keys is a uniform permutation (ties have probability ~0 in fp32 at
    these sizes) and runs as one kernel on the GPU. `generator` must live on `device`.
    """
    keys = torch.rand(B, num_cells, generator=generator, device=device)  # (B, n)
    return torch.argsort(keys, dim=1)
