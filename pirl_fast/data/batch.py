"""The batch contract every loader backend delivers (`Batch`, `PIRLLoader`), and the pieces they share.

An epoch, for every backend: each rank yields ceil(N / global_batch) batches of
batch_size // world_size samples; over all ranks every sample comes at least once and the
global_batch * ceil(N / global_batch) - N < global_batch extra deliveries are duplicates of
real samples (`duplicates_per_epoch`). Iterating again starts the next epoch, reshuffled.

Corrupt data found while training (a JPEG that does not decode, or whose bytes do not match the
crc member written with it, shards/README.md): with data.on_corrupt=error (the default) the
loader raises ShardError naming the shard and the sample key; with data.on_corrupt=skip the
sample's place in its batch is taken by a copy of another sample of the same batch
(`replace_corrupt`), and Batch.corrupt counts it (metrics.jsonl: corrupt_skipped). So the
contract above holds for every sample that is not corrupt: the number and size of batches, and
so every rank's step count, do not change; a corrupt sample never reaches the model or its
memory-bank row (which keeps its initial value), and its copy's index is one more duplicate.

Patch order: every backend delivers patches in cell order; `PatchOrder` draws a permutation per
sample (any of 9!, or one of a fixed max-Hamming set) and applies it as one gather on the device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from pirl_fast.data.permutations import max_hamming_permutations, random_permutations
from pirl_fast.shard.format import ShardError

OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # data.output_dtype -> the views' dtype


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) float32 (float16 with data.output_dtype=float16), channels_last, normalised
    patches: torch.Tensor  # (B*9, 3, P, P) like images, channels_last; sample b at [9b:9b+9], presented order
    index: torch.Tensor  # (B,) int64 global sample index (memory-bank row)
    label: torch.Tensor  # (B,) int64
    perm: torch.Tensor  # (B, 9) int64: patches[9b+j] was cut from grid cell perm[b, j] (row-major)
    perm_id: torch.Tensor  # (B,) int64: row of perm in the fixed set, -1 when num_permutations == 0
    corrupt: int = 0  # samples of this batch replaced by copies of others: their data was corrupt (on_corrupt=skip)


class PIRLLoader(Protocol):
    num_samples: int  # dataset size N
    batch_size: int  # per rank
    duplicates_per_epoch: int  # padding deliveries per epoch over all ranks, < one global batch

    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


def derive_seed(seed: int, k: int) -> int:
    """A distinct seed per (seed, k) for k a rank or an epoch, in DALI's valid range [0, 2**31).
    1_000_003 is a prime larger than any rank or epoch count, so pairs do not collide."""
    return (seed * 1_000_003 + k) % (2**31 - 1)


def epoch_length(num_samples: int, global_batch: int) -> tuple[int, int]:
    """(batches per rank per epoch, duplicate deliveries per epoch over all ranks)."""
    batches = math.ceil(num_samples / global_batch)
    return batches, batches * global_batch - num_samples


class PatchOrder:
    """Draws a presentation order per sample and applies it to cell-ordered patches, on `device`.

    grid, num_permutations, seed, rule: data.grid, data.num_permutations, data.seed, data.permutation_set."""

    def __init__(self, grid: int, num_permutations: int, seed: int, rank: int, device: torch.device,
                 rule: str = "max_min"):
        self.num_cells = grid * grid
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(derive_seed(seed, rank))
        self.fixed = (max_hamming_permutations(num_permutations, self.num_cells, seed, rule).to(device)
                      if num_permutations > 0 else None)  # (P, 9)

    def draw(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(perm (B, 9) int64, perm_id (B,) int64) on the device."""
        if self.fixed is None:
            perm = random_permutations(B, self.num_cells, self.generator, self.device)
            return perm, torch.full((B,), -1, dtype=torch.int64, device=self.device)
        perm_id = torch.randint(len(self.fixed), (B,), generator=self.generator, device=self.device)
        return self.fixed[perm_id], perm_id

    def apply(self, patches: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """(B, 9, P, P, 3) cell order -> (B*9, 3, P, P) channels_last view, presented order.

        One gather (a new tensor: the result never aliases a reader's buffer)."""
        B = patches.shape[0]
        rows = torch.arange(B, device=patches.device)[:, None]  # (B, 1)
        ordered = patches[rows, perm]  # (B, 9, P, P, 3), contiguous
        return ordered.flatten(0, 1).permute(0, 3, 1, 2)  # (B*9, 3, P, P), channels_last strides


def make_batch(images_nhwc: torch.Tensor, patches_cells: torch.Tensor, index: torch.Tensor, label: torch.Tensor,
               order: PatchOrder, corrupt: int = 0) -> Batch:
    """Assemble a Batch from backend outputs already on the device.

    images_nhwc (B, S, S, 3) contiguous; patches_cells (B, 9, P, P, 3) in cell order; index, label (B,)."""
    perm, perm_id = order.draw(images_nhwc.shape[0])
    return Batch(images=images_nhwc.permute(0, 3, 1, 2),  # (B, 3, S, S), channels_last strides
                 patches=order.apply(patches_cells, perm), index=index.reshape(-1), label=label.reshape(-1),
                 perm=perm, perm_id=perm_id, corrupt=corrupt)


def replace_corrupt(bad: list[int], where: list[str], *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """data.on_corrupt=skip: batch rows `bad` of every tensor in `rows` (dim 0 = the batch) become
    copies of the batch's good rows, taken in turn; new tensors, the inputs are left alone.

    `where` describes the bad samples (shard and key): one warning each, and the error raised when no
    row is good."""
    for w in where:  # stacklevel 3: past the loader's generator, to the code that asked for the batch
        warnings.warn(f"skipping a corrupt sample (data.on_corrupt=skip): {w}", RuntimeWarning, stacklevel=3)
    batch = rows[0].shape[0]
    skipped = set(bad)
    good = [b for b in range(batch) if b not in skipped]
    if not good:
        raise ShardError(f"every sample of a batch is corrupt ({'; '.join(where)}): the shards are damaged beyond "
                         "skipping a few samples; check them with `python -m pirl_fast.shard --verify DIR`")
    source = list(range(batch))
    for k, b in enumerate(bad):
        source[b] = good[k % len(good)]
    return tuple(t.index_select(0, torch.tensor(source, device=t.device)) for t in rows)
