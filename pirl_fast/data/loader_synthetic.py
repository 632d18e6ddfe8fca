"""The `synthetic` backend: random batches made on the device, for compute-only timing.

No files are read: the tensors are drawn on the device each batch (so no host work or copy
is timed), with the Batch contract's shapes, dtypes, strides and value ranges. `index` walks
over 0..synthetic_samples-1 exactly like a real epoch (ranks interleaved batch by batch), so the
memory bank sees a dataset of that size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pirl_fast.data.batch import OUTPUT_DTYPES, Batch, PatchOrder, derive_seed, epoch_length, make_batch
from pirl_fast.data.config import DataConfig

NUM_CLASSES = 1000  # labels drawn as if from ImageNet-1k


class SyntheticLoader:
    def __init__(self, cfg: DataConfig, per_rank: int, rank: int, world_size: int, device: torch.device):
        self.cfg, self.device = cfg, device
        self.batch_size, self.rank, self.world_size = per_rank, rank, world_size
        self.num_samples = cfg.synthetic_samples
        self._len, self.duplicates_per_epoch = epoch_length(cfg.synthetic_samples, per_rank * world_size)
        self.order = PatchOrder(cfg.grid, cfg.num_permutations, cfg.seed, rank, device, cfg.permutation_set)
        self.generator = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, rank))

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Batch]:
        B, S, P, cells = self.batch_size, self.cfg.image_size, self.cfg.patch_size, self.cfg.grid ** 2
        dtype = OUTPUT_DTYPES[self.cfg.output_dtype]  # as the real loaders deliver it
        global_batch = B * self.world_size
        for step in range(self._len):
            first = step * global_batch + self.rank * B  # this rank's slice of the step's global batch
            index = torch.arange(first, first + B, device=self.device) % self.num_samples  # (B,) wraps: duplicates
            images = torch.randn(B, S, S, 3, generator=self.generator, device=self.device, dtype=dtype)  # (B,S,S,3)
            patches = torch.randn(B, cells, P, P, 3, generator=self.generator, device=self.device,
                                  dtype=dtype)  # (B, 9, P, P, 3)
            label = torch.randint(NUM_CLASSES, (B,), generator=self.generator, device=self.device)
            yield make_batch(images, patches, index, label, self.order)

    def close(self) -> None:
        pass
