"""Every labelled sample of a shard folder once, in sample-index order, in the deterministic evaluation view.

The evaluation loader reads the shard tars directly (Python's `tarfile`, random access by byte
offset), not through DALI or the pre-training loader: evaluation wants every sample exactly once,
in a fixed order, with its label, and the standard deterministic view:

    resize the shorter side to image_size * 256/224, centre-crop image_size, ImageNet mean/std

(the 256 -> 224 centre crop of every ImageNet evaluation). The sample members (KEY.jpg, KEY.lbl
and, in multi-label shards, KEY.mlb, read into `ShardImageDataset.targets`): pirl_fast/shard/format.py.
Used by evaluation (pirl_fast/eval) and by the trainer's kNN monitor (pirl_fast/train/knn_monitor.py),
so it sits in the data stage below both.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from dali_pipelines import IMAGENET_MEAN, IMAGENET_STD  # no DALI import
from pirl_fast.runtime.progress import progress
from pirl_fast.shard.format import ShardError, decode_int64, iter_samples, load_manifest

RESIZE_RATIO = 256 / 224  # ImageNet evaluation: resize to 256, centre-crop 224


def eval_transform(image_size: int) -> Callable[[Image.Image], Tensor]:
    """The deterministic evaluation view: (3, image_size, image_size), normalised."""
    return T.Compose([
        T.Resize(round(image_size * RESIZE_RATIO)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])



@dataclass(frozen=True)
class _Entry:
    shard: int  # position in manifest.tar_paths()
    offset: int  # byte offset of the JPEG data in the tar
    size: int  # JPEG size in bytes
    label: int
    index: int  # global sample index (the memory-bank row in pre-training)
    multi_hot: bytes | None = None  # KEY.mlb of multi-label shards: C int8 in {1, 0, -1}
    key: str = ""  # the sample key (member name without extension)


class ShardImageDataset(Dataset):
    """Every sample of a shard directory once: dataset[i] -> (transform(PIL RGB image), label, index).

    The constructor scans the tar headers once (no image is decoded) and keeps (offset, size) of
    each JPEG; __getitem__ seeks and decodes one image. Samples are in global-index order.
    """

    def __init__(self, shard_dir: str | os.PathLike, transform: Callable[[Image.Image], object], limit: int = 0):
        self.manifest = load_manifest(shard_dir)
        self.classes = self.manifest.classes
        self.transform = transform
        self.paths = self.manifest.tar_paths()
        entries: list[_Entry] = []
        for shard, path in enumerate(progress(self.paths, desc=f"scan {Path(shard_dir).name}", unit="shard",
                                              leave=False, enabled=len(self.paths) >= 8)):
            entries.extend(self._scan(shard, path, self.manifest.shards[shard].samples))
        entries.sort(key=lambda e: e.index)
        if limit > 0:
            entries = entries[:limit]
        self.entries = entries
        self._files: dict[int, object] = {}
        self._pid = -1

    def _scan(self, shard: int, path: str, expected: int) -> list[_Entry]:
        out = []
        with open(path, "rb") as f:
            for key, data, where in iter_samples(f, skip=("jpg",)):
                missing = [ext for ext in ("jpg", "lbl", "idx") if ext not in where]
                if missing:
                    raise ShardError(f"{path}: sample {key!r} lacks {missing} (has {sorted(where)}); the shard "
                                     "was not written by `python -m pirl_fast.shard`, or is damaged: re-shard it")
                try:
                    label, index = decode_int64(data["lbl"]), decode_int64(data["idx"])
                except ValueError as e:
                    raise ShardError(f"{path}: sample {key!r} has a bad lbl or idx member ({e}): re-shard it") from e
                mlb = data.get("mlb")
                if mlb is not None and len(mlb) != len(self.classes):
                    raise ShardError(f"{path}: {key}.mlb has {len(mlb)} bytes but the manifest lists "
                                     f"{len(self.classes)} classes (one int8 per class): re-shard it")
                out.append(_Entry(shard, *where["jpg"], label, index, mlb, key))
        if len(out) != expected:
            raise ShardError(f"{path} holds {len(out)} samples but manifest.json says {expected}: re-shard it "
                             "(`python -m pirl_fast.shard SRC DST --overwrite`)")
        return out

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        e = self.entries[i]
        if self._pid != os.getpid():  # a DataLoader worker: open its own file handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(e.shard)
        if f is None:
            f = self._files[e.shard] = open(self.paths[e.shard], "rb")
        f.seek(e.offset)
        with Image.open(io.BytesIO(f.read(e.size))) as img:
            image = img.convert("RGB")
        return self.transform(image), e.label, e.index

    def with_transform(self, transform: Callable[[Image.Image], object]) -> ShardImageDataset:
        """The same samples under another view, without scanning the shards again."""
        other = copy.copy(self)
        other.transform = transform
        return other

    @property
    def labels(self) -> Tensor:
        return torch.tensor([e.label for e in self.entries], dtype=torch.long)

    @property
    def multi_label(self) -> bool:
        """True for shards whose samples carry KEY.mlb (several classes per image)."""
        return bool(self.entries) and self.entries[0].multi_hot is not None

    @property
    def targets(self) -> np.ndarray:
        """(N, C) int8 per class: 1 present, 0 absent, -1 difficult (multi-label), or the one-hot
        labels of single-label shards; rows in dataset order."""
        if self.multi_label:
            if any(e.multi_hot is None for e in self.entries):
                raise ShardError(f"{self.manifest.root}: some samples have KEY.mlb and some do not: re-shard it")
            return np.stack([np.frombuffer(e.multi_hot, np.int8) for e in self.entries])
        out = np.zeros((len(self.entries), len(self.classes)), np.int8)
        out[np.arange(len(self.entries)), [e.label for e in self.entries]] = 1
        return out
