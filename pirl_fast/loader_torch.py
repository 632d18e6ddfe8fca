"""The `torch` backend: an indexed tar reader + torchvision transforms v2 in DataLoader workers.

The fallback where DALI is missing and the baseline the DALI loader is measured against: the
same shards, the same augmentations (torchvision's own ColorJitter / RandomGrayscale /
RandomHorizontalFlip / RandomResizedCrop), the same epoch contract. Samples are read by random
access through the shards' DALI index files (member offsets), the role the `wids` indexed
reader plays in newer webdataset releases (webdataset 1.0.2 does not ship it).

Epoch: a permutation of all N samples drawn from (seed, epoch), padded by wrapping around to
global_batch * ceil(N / global_batch), cut into world_size contiguous parts: every rank gets the
same number of full batches and every sample appears at least once.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from pirl_fast.data import Batch, DataConfig, PatchOrder, derive_seed, epoch_length, make_batch
from pirl_fast.manifest import Manifest, ShardError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
ASPECT_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, as in the DALI pipeline
MEMBERS = ("jpg", "idx", "lbl")
MAX_OPEN_SHARDS = 64  # per worker: ImageNet has ~1,300 shards and the default fd limit is 1,024


class IndexedShards(Dataset):
    """Sample p (shard order) -> (jpeg bytes, global index, label), read with pread via the index files."""

    def __init__(self, manifest: Manifest):
        self.paths = manifest.tar_paths()
        rows = []  # (tar id, jpg offset, jpg size, idx offset, lbl offset) per sample
        for tar_id, (index_path, shard) in enumerate(zip(manifest.index_paths(), manifest.shards)):
            for line in open(index_path).read().splitlines()[1:]:
                fields = line.split()
                members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
                missing = [m for m in MEMBERS if m not in members]
                if missing:
                    raise ShardError(f"index file {index_path} has a sample without {missing} "
                                     f"(members {sorted(members)}): re-run `python -m pirl_fast.shard`")
                rows.append((tar_id, *members["jpg"], members["idx"][0], members["lbl"][0]))
        self.rows = np.array(rows, dtype=np.int64)  # (N, 5)
        self._files: dict[int, int] = {}  # tar id -> fd, opened lazily in each worker process
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, position: int) -> tuple[torch.Tensor, int, int]:
        if self._pid != os.getpid():  # a forked worker must not share the parent's file offsets
            self._files, self._pid = {}, os.getpid()
        tar_id, jpg_offset, jpg_size, idx_offset, lbl_offset = (int(v) for v in self.rows[position])
        fd = self._files.get(tar_id)
        if fd is None:
            if len(self._files) >= MAX_OPEN_SHARDS:  # random access touches every shard: recycle
                for old in self._files.values():
                    os.close(old)
                self._files = {}
            fd = self._files[tar_id] = os.open(self.paths[tar_id], os.O_RDONLY)
        jpeg = torch.frombuffer(bytearray(os.pread(fd, jpg_size, jpg_offset)), dtype=torch.uint8)
        index = int.from_bytes(os.pread(fd, 8, idx_offset), "little", signed=True)
        label = int.from_bytes(os.pread(fd, 8, lbl_offset), "little", signed=True)
        return jpeg, index, label


class PIRLTransform:
    """jpeg bytes -> (image view (S,S,3), patches (9,P,P,3) in cell order), float32 normalised, HWC."""

    def __init__(self, cfg: DataConfig):
        colour = ([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue),
                   v2.RandomGrayscale(cfg.gray_p)] if cfg.color_aug else [])
        self.image_view = v2.Compose([
            v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.image_scale), ratio=ASPECT_RATIO, antialias=True),
            *colour, v2.RandomHorizontalFlip(cfg.flip_p)])
        self.patch_crop = v2.RandomResizedCrop(cfg.patch_crop_size, scale=tuple(cfg.patch_scale),
                                               ratio=ASPECT_RATIO, antialias=True)
        self.patch_view = v2.Compose([*colour, v2.RandomHorizontalFlip(cfg.flip_p)])  # one draw per patch
        self.grid, self.cell, self.patch = cfg.grid, cfg.patch_crop_size // cfg.grid, cfg.patch_size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) uint8 -> (..., H, W, 3) float32 contiguous (HWC: channels_last in the batch)."""
        return ((x.float() - self.mean) / self.std).movedim(-3, -1).contiguous()

    def __call__(self, jpeg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_jpeg(jpeg, mode=ImageReadMode.RGB)  # (3, H, W) uint8
        view = self.normalise(self.image_view(image))  # (S, S, 3)
        g, c, p = self.grid, self.cell, self.patch
        crop = self.patch_crop(image)  # (3, C, C)
        cells = crop.reshape(3, g, c, g, c).permute(1, 3, 0, 2, 4).reshape(g * g, 3, c, c)  # (9, 3, c, c) row-major
        offsets = torch.randint(0, c - p + 1, (g * g, 2)).tolist()  # (9, 2): own offset per cell
        patches = torch.stack([self.patch_view(cell[:, oy:oy + p, ox:ox + p])
                               for cell, (oy, ox) in zip(cells, offsets)])  # (9, 3, P, P)
        return view, self.normalise(patches)  # (S, S, 3), (9, P, P, 3)


class PIRLDataset(Dataset):
    def __init__(self, shards: IndexedShards, transform: PIRLTransform):
        self.shards, self.transform = shards, transform

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, position: int):
        jpeg, index, label = self.shards.read(position)
        try:
            view, patches = self.transform(jpeg)
        except RuntimeError as e:
            tar_id = int(self.shards.rows[position, 0])
            raise ShardError(f"sample {index} in {self.shards.paths[tar_id]} cannot be decoded ({e}): "
                             f"re-run `python -m pirl_fast.shard` on its source") from e
        return view, patches, index, label


class EpochBatchSampler(Sampler):
    """This rank's batches of one epoch; each iter() is the next epoch, reshuffled."""

    def __init__(self, num_samples: int, per_rank: int, rank: int, world_size: int, seed: int):
        self.num_samples, self.per_rank, self.rank, self.world_size = num_samples, per_rank, rank, world_size
        self.batches, _ = epoch_length(num_samples, per_rank * world_size)
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))  # same on every rank
        self.epoch += 1
        order = torch.randperm(self.num_samples, generator=generator)
        total = self.batches * self.per_rank * self.world_size  # global_batch * ceil(N / global_batch)
        order = torch.cat([order, order[: total - self.num_samples]])  # pad by wrapping: duplicates
        mine = order[self.rank * self.batches * self.per_rank:][: self.batches * self.per_rank]
        yield from mine.view(self.batches, self.per_rank).tolist()


def collate(samples):
    views, patches, index, label = zip(*samples)
    return (torch.stack(views), torch.stack(patches),  # (B, S, S, 3), (B, 9, P, P, 3)
            torch.tensor(index, dtype=torch.int64), torch.tensor(label, dtype=torch.int64))


class TorchLoader:
    def __init__(self, cfg: DataConfig, manifest: Manifest, per_rank: int, rank: int, world_size: int,
                 device: torch.device):
        self.device = device
        self.batch_size = per_rank
        self.num_samples = manifest.num_samples
        _, self.duplicates_per_epoch = epoch_length(manifest.num_samples, per_rank * world_size)
        self.order = PatchOrder(cfg, rank, device)
        self.sampler = EpochBatchSampler(manifest.num_samples, per_rank, rank, world_size, cfg.seed)
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, rank))  # worker augmentation seeds
        self.loader = DataLoader(
            PIRLDataset(IndexedShards(manifest), PIRLTransform(cfg)), batch_sampler=self.sampler,
            num_workers=cfg.workers, collate_fn=collate, pin_memory=device.type == "cuda", generator=generator,
            persistent_workers=cfg.workers > 0, prefetch_factor=cfg.prefetch if cfg.workers > 0 else None)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        for views, patches, index, label in self.loader:
            to = dict(device=self.device, non_blocking=True)
            yield make_batch(views.to(**to), patches.to(**to), index.to(**to), label.to(**to), self.order)

    def close(self) -> None:
        self.loader = None  # persistent workers exit when the DataLoader's iterator is collected
