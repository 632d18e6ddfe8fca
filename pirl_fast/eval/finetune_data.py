"""Labelled subsets and loaders for semi-supervised fine-tuning (`python -m pirl_fast.eval finetune`).

The subset (1% or 10% of the labels, as the reference's semi-supervised benchmark):
    --fraction F   per class round(F * n_class) samples (at least 1), drawn with --seed: class-balanced
    --subset FILE  the reference's own lists: a text file with one image path per line (SimCLR's
                   1percent.txt / 10percent.txt: "n01440764_10026.JPEG") or a .npy array of paths
                   (vissl's imagenet1k-per01 filelists, absolute paths). A path's last two parts are
                   the ImageFolder-relative path the sharder saw ("n01440764/n01440764_10026.JPEG");
                   a bare ImageNet file name gets its class folder from the part before "_". The
                   sample is found by its shard key (pirl_fast.shard.format.sample_key).

Loaders (the same images either way; DALI is the fast path, as in pre-training):
    dali    dali_pipelines/classify.py reading only the chosen samples through subset index files
            (DALI v1.2 index files listing those samples at their offsets in the original tars;
            written under OUT/subset_index/, nothing else is copied); GPU decode + crop on CUDA
    torch   the evaluation reader (features.ShardImageDataset) + torchvision transforms in
            DataLoader workers; the fallback without DALI
Training epochs drop the last partial batch (the reference's DROP_LAST: True); evaluation sees
every validation sample exactly once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from pirl_fast.eval.features import ShardImageDataset, eval_transform, train_transform
from pirl_fast.shard.format import index_text, parse_index, sample_key

try:
    from nvidia.dali.backend import TensorGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray

    from dali_pipelines.classify import READER_NAME, classify_pipeline
except ImportError as e:  # DALI missing: --backend torch still works
    _DALI_ERROR: ImportError | None = e
else:
    _DALI_ERROR = None

BACKENDS = ("auto", "dali", "torch")


def dali_available() -> bool:
    return _DALI_ERROR is None


# ---- the subset ----------------------------------------------------------------------------------

def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions (sorted) of a class-balanced subset: round(fraction * n_c) per class, at least 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction {fraction} must be in (0, 1], e.g. 0.01 or 0.1")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        chosen.append(rng.choice(pool, size=max(1, round(fraction * pool.size)), replace=False))
    return np.sort(np.concatenate(chosen))


def relative_path(entry: str) -> str:
    """The ImageFolder-relative path of a subset-list entry (module docstring)."""
    parts = [p for p in str(entry).strip().replace("\\", "/").split("/") if p]
    if len(parts) >= 2:
        return f"{parts[-2]}/{parts[-1]}"
    if "_" not in parts[0]:
        raise ValueError(f"subset entry {entry!r}: give CLASS/FILE paths, or ImageNet names like n01440764_10026.JPEG")
    return f"{parts[0].split('_', 1)[0]}/{parts[0]}"


def subset_from_file(path: str | os.PathLike, data: ShardImageDataset) -> np.ndarray:
    """Positions in `data` of the images a subset list names; refuses names not in the shards."""
    path = Path(path)
    if path.suffix == ".npy":
        entries = [str(x) for x in np.load(path, allow_pickle=False)]
    else:
        entries = [line for line in path.read_text().splitlines() if line.strip()]
    if not entries:
        raise ValueError(f"subset list {path} is empty")
    position = {e.key: i for i, e in enumerate(data.entries)}
    found, missing = [], []
    for entry in entries:
        key = sample_key(relative_path(entry))
        (found.append(position[key]) if key in position else missing.append(entry))
    skipped = {os.path.basename(s.get("path", "")) for s in data.manifest.skipped}
    missing = [m for m in missing if os.path.basename(m) not in skipped]  # the sharder listed these as unusable
    if missing:
        raise ValueError(f"{len(missing)} of {len(entries)} images of {path} are not in {data.manifest.root} "
                         f"(e.g. {missing[:3]}): shard the split the list was made for (ImageNet train)")
    return np.sort(np.unique(found))


# ---- loaders -------------------------------------------------------------------------------------

def _to_torch(tensor_list, device: torch.device) -> Tensor:
    """A DALI output batch as a torch tensor on `device` (a copy on the GPU, ordered on torch's stream)."""
    dense = tensor_list.as_tensor()
    if not isinstance(dense, TensorGPU):
        return torch.from_dlpack(dense).to(device)
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    return out


class DaliClassifyLoader:
    """(images (B, 3, S, S) channels-last float32 on `device`, labels (B,) int64) batches from DALI.

    train: an endless shuffled stream cut into len(self) = N // B batches per epoch; eval: every
    sample once (the padded tail of the last batch is dropped).
    """

    def __init__(self, data: ShardImageDataset, positions: np.ndarray, index_dir: Path, size: int, batch: int,
                 train: bool, workers: int, device: torch.device, seed: int):
        if _DALI_ERROR is not None:
            raise ImportError(f"--backend dali needs NVIDIA DALI (pip install nvidia-dali-cuda130); use --backend "
                              f"torch ({_DALI_ERROR})") from _DALI_ERROR
        tars, indices = write_subset_index(data, positions, index_dir)
        self.num, self.batch, self.train, self.device = len(positions), batch, train, device
        gpu = device.type == "cuda"
        device_id = (device.index or 0) if gpu else (torch.cuda.current_device() if torch.cuda.is_available() else None)
        self.pipe = classify_pipeline(tars, indices, size, train, min(4096, self.num), seed, gpu, batch_size=batch,
                                      num_threads=max(1, workers), device_id=device_id, seed=seed,
                                      exec_dynamic=True)
        self.pipe.build()
        read = self.pipe.reader_meta(READER_NAME)["epoch_size"]
        if read != self.num:
            raise RuntimeError(f"DALI reads {read} samples through {index_dir} but the subset has {self.num}")

    def __len__(self) -> int:
        return self.num // self.batch if self.train else math.ceil(self.num / self.batch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        left = self.num
        for _ in range(len(self)):
            images, labels = self.pipe.run()
            x = _to_torch(images, self.device).permute(0, 3, 1, 2)  # NHWC storage = channels-last NCHW view
            y = _to_torch(labels, self.device).reshape(-1).long()
            if not self.train:
                x, y, left = x[:left], y[:left], left - x.shape[0]
            yield x, y


def write_subset_index(data: ShardImageDataset, positions: np.ndarray, index_dir: Path) -> tuple[list, list]:
    """Index files listing only the chosen samples of each tar (tars without any are left out; a tar whose
    samples are all chosen keeps its own index file)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    wanted: dict[int, set[int]] = {}
    for p in positions:
        e = data.entries[int(p)]
        wanted.setdefault(e.shard, set()).add(e.offset)  # the JPEG's data offset identifies the sample
    tars, indices = [], []
    for shard, offsets in sorted(wanted.items()):
        source = data.manifest.index_paths()[shard]
        every = parse_index(Path(source).read_text())
        lines = [e for e in every if e.offset_of("jpg") in offsets]
        if len(lines) != len(offsets):
            raise RuntimeError(f"{source} lists {len(lines)} of the {len(offsets)} chosen samples: re-shard it")
        tars.append(data.paths[shard])
        if len(lines) == len(every):  # the whole shard: its own index file serves
            indices.append(source)
            continue
        target = index_dir / Path(source).name
        target.write_text(index_text(lines))
        indices.append(str(target))
    return tars, indices


def _torch_batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    for images, labels, *_ in loader:
        yield images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last), labels.to(device)


class TorchClassifyLoader:
    """The same batches from DataLoader workers (the evaluation reader + torchvision transforms)."""

    def __init__(self, data: ShardImageDataset, positions: np.ndarray, size: int, batch: int, train: bool,
                 workers: int, device: torch.device, seed: int):
        data.transform = train_transform(size) if train else eval_transform(size)
        self.loader = DataLoader(Subset(data, positions.tolist()), batch_size=batch, shuffle=train, drop_last=train,
                                 num_workers=workers, generator=torch.Generator().manual_seed(seed),
                                 pin_memory=device.type == "cuda", persistent_workers=False)
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return _torch_batches(self.loader, self.device)


def build_loader(backend: str, data: ShardImageDataset, positions: np.ndarray, index_dir: Path, size: int,
                 batch: int, train: bool, workers: int, device: torch.device, seed: int):
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "dali" or (backend == "auto" and dali_available()):
        return DaliClassifyLoader(data, positions, index_dir, size, batch, train, workers, device, seed)
    return TorchClassifyLoader(data, positions, size, batch, train, workers, device, seed)
