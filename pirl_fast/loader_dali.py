"""The `dali` backend: dali_pipelines/pirl.py driven batch by batch, outputs handed to torch.

On a CUDA device the pipeline decodes with nvJPEG and augments on the GPU; on the CPU it runs
the same graph's CPU version (`device_id=None` where there is no CUDA at all). The reader pads each rank's part of the dataset (pad_last_batch) to exactly
ceil(N / global_batch) batches per epoch on every rank, so this loader runs that many batches
per epoch and never reads across an epoch boundary (reader_meta("Reader") confirms N at start).
"""

from __future__ import annotations

from typing import Iterator

import torch

from pirl_fast.data import Batch, DataConfig, PatchOrder, derive_seed, epoch_length, make_batch
from pirl_fast.manifest import Manifest, ShardError

try:
    from nvidia.dali import types as dali_types
    from nvidia.dali.backend import TensorGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray

    # DALI dtype -> torch dtype of the GPU outputs (images, patches: float32).
    TORCH_DTYPES = {dali_types.FLOAT: torch.float32, dali_types.INT64: torch.int64}

    from dali_pipelines.pirl import READER_NAME, pirl_pipeline
except ImportError as e:  # the package stays importable; asking for this backend says what to do
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None


def dali_import_error() -> ImportError | None:
    """Why DALI (or its pipeline) does not import here, or None when it does."""
    return _IMPORT_ERROR


class DaliLoader:
    def __init__(self, cfg: DataConfig, manifest: Manifest, per_rank: int, rank: int, world_size: int,
                 device: torch.device):
        if _IMPORT_ERROR is not None:
            raise ImportError(f"data.backend=dali needs NVIDIA DALI (pip install nvidia-dali-cuda130); "
                              f"use data.backend=torch without it ({_IMPORT_ERROR})") from _IMPORT_ERROR
        gpu = device.type == "cuda"
        if gpu and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # DALI refuses to mix CPU-only pipelines (device_id=None) with GPU ones in a process, so the
        # CPU graph gets a device id too wherever CUDA exists; it then runs CPU operators only.
        device_id = (device.index if gpu else torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.device = device
        self.batch_size = per_rank
        self.num_samples = manifest.num_samples
        self._len, self.duplicates_per_epoch = epoch_length(manifest.num_samples, per_rank * world_size)
        self.order = PatchOrder(cfg, rank, device)
        self.pipe = pirl_pipeline(
            manifest.tar_paths(), manifest.index_paths(), cfg, rank, world_size, gpu,
            batch_size=per_rank, num_threads=cfg.workers, device_id=device_id,
            seed=derive_seed(cfg.seed, rank),  # augmentations differ per rank; shard order is seeded by cfg.seed
            prefetch_queue_depth=cfg.prefetch,
            # The dynamic executor (DALI 2.x default, pinned here) never reuses an output buffer that
            # a DLPack consumer still references; the legacy one overwrites it on the next run.
            exec_dynamic=True,
        )
        self.pipe.build()
        meta = self.pipe.reader_meta(READER_NAME)
        if meta["epoch_size"] != manifest.num_samples:
            raise ShardError(f"DALI reads {meta['epoch_size']} samples from {manifest.root} but its manifest says "
                             f"{manifest.num_samples}: re-run `python -m pirl_fast.shard` on it")
        self._position = 0  # batches of the current epoch already taken from the pipeline

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Batch]:
        if self._position:  # the previous epoch was abandoned: drain it so epochs stay aligned
            for _ in range(self._len - self._position):
                self.pipe.run()
            self._position = 0
        for _ in range(self._len):
            outputs = self.pipe.run()
            self._position += 1
            if self._position == self._len:
                self._position = 0
            images, patches, index, label = (self._to_torch(out) for out in outputs)
            yield make_batch(images, patches, index.to(self.device), label.to(self.device), self.order)

    def _to_torch(self, tensor_list) -> torch.Tensor:
        """One DALI output batch as a torch tensor: on the host a zero-copy DLPack view, which keeps
        DALI's buffer alive for as long as torch holds it (exec_dynamic: DALI allocates new output
        buffers instead of recycling referenced ones); on the GPU a copy into a new tensor, ordered
        on torch's current stream as DALI's own iterator does."""
        dense = tensor_list.as_tensor()  # (B, ...) uniform shape
        if not isinstance(dense, TensorGPU):  # CPU graph, or index/label of the GPU graph
            return torch.from_dlpack(dense)
        out = torch.empty(dense.shape(), dtype=TORCH_DTYPES[dense.dtype], device=self.device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def close(self) -> None:
        self.pipe = None  # DALI frees its threads and buffers when the pipeline is collected
