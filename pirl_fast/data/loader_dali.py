"""The `dali` backend: dali_pipelines/pirl.py driven batch by batch, outputs handed to torch.

On a CUDA device the pipeline decodes with nvJPEG and augments on the GPU; on the CPU it runs
the same graph's CPU version (`device_id=None` where there is no CUDA at all). The reader pads
each rank's part of the dataset (pad_last_batch) to exactly ceil(N / global_batch) batches per
epoch on every rank, so this loader runs that many batches per epoch and never reads across an
epoch boundary (reader_meta("Reader") confirms N at start).

Hand-over without a sync or a copy. On CUDA the pipeline runs ordered with torch's current
stream: `pipe.run(stream)` returns outputs bound to that stream instead of waiting on the host
for them, and `torch.from_dlpack` gives torch the same buffers (DALI makes the stream wait for
its work if needed). Every output, index and label included, is on the GPU (copied there inside
the pipeline); Batch.images is a view of DALI's buffer, Batch.patches a new tensor (the
patch-order gather). A batch stays valid for as long as torch holds it (exec_dynamic, below;
tests/test_loaders.py: batches outlive the next iterations).

Corrupt samples (pirl_fast/shard/corrupt.py): the pipeline's gate checks the crc members on the host
before decoding and records which samples it handed on; `_run` acts on what it found (an error
naming the sample, or data.on_corrupt=skip) and, when the decoder itself fails, names the sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from pirl_fast.data.batch import Batch, PatchOrder, derive_seed, epoch_length, make_batch, replace_corrupt
from pirl_fast.data.config import DataConfig
from pirl_fast.runtime import host_read
from pirl_fast.shard.corrupt import FIX as CORRUPT_FIX
from pirl_fast.shard.corrupt import SKIP_HINT, DaliGate, find_undecodable
from pirl_fast.shard.format import Manifest, ShardError

try:
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
        self.gpu = gpu
        self.batch_size = per_rank
        self.num_samples = manifest.num_samples
        self._len, self.duplicates_per_epoch = epoch_length(manifest.num_samples, per_rank * world_size)
        self.order = PatchOrder(cfg.grid, cfg.num_permutations, cfg.seed, rank, device, cfg.permutation_set)
        self.skip = cfg.on_corrupt == "skip"
        if not manifest.has_checksums and rank == 0:
            warnings.warn(f"the shards in {manifest.root} carry no per-sample checksums (crc members, "
                          "shards/README.md): a JPEG damaged after sharding can train silently on DALI, whose "
                          "decoder only warns about some damage (libjpeg) or does not notice it (nvJPEG); re-shard "
                          "to add them, or check the shards with `python -m pirl_fast.shard --verify DIR`",
                          RuntimeWarning, stacklevel=2)
        # Batches the gate may have passed on beyond the one being delivered: the prefetch queue and
        # the executor's own stages (a margin of 3).
        self.gate = DaliGate(manifest.has_checksums, keep=cfg.prefetch + 3)
        self.pipe = pirl_pipeline(
            manifest.tar_paths(), manifest.index_paths(), cfg, rank, world_size, gpu, self.gate,
            batch_size=per_rank, num_threads=cfg.workers, device_id=device_id,
            seed=derive_seed(cfg.seed, rank),  # augmentations differ per rank; shard order is seeded by cfg.seed
            prefetch_queue_depth=cfg.prefetch,
            # The dynamic executor (DALI 2.x default, pinned here) never reuses an output buffer that
            # a DLPack consumer still references (the legacy one overwrites it on the next run), and
            # it alone can return outputs bound to a CUDA stream. DALI's own PyTorch iterator skips
            # its copy on the same grounds (nvidia/dali/plugin/pytorch/__init__.py, `copy = not is_exec_dynamic`).
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
                self._run()
            self._position = 0
        for _ in range(self._len):
            outputs = self._run()
            self._position += 1
            if self._position == self._len:
                self._position = 0
            images, patches, index, label = (self._to_torch(out) for out in outputs)
            bad, where = self._corrupt_in(index)
            if bad:  # data.on_corrupt=skip: the gate fed the decoder a placeholder for these
                images, patches, index, label = replace_corrupt(bad, where, images, patches, index, label)
            yield make_batch(images, patches, index, label, self.order, corrupt=len(bad))

    def _run(self):
        """pipe.run(), with a decoder failure turned into an error that names the sample. On CUDA the
        outputs are bound to torch's current stream: no host wait for the GPU part of the graph."""
        try:
            if self.gpu:
                return self.pipe.run(torch.cuda.current_stream(self.device))
            return self.pipe.run()
        except RuntimeError as e:
            candidates = [where for batch in self.gate.in_flight for where in batch]
            found = find_undecodable(candidates)
            if not found:
                raise
            checksums = ("" if self.gate.checksums else "; shards written with per-sample checksums (crc members) "
                         "let such damage be caught before the decoder")
            raise ShardError(f"DALI's decoder failed ({dali_reason(e)}) on a corrupt sample:\n  " + "\n  ".join(found)
                             + f"\n{CORRUPT_FIX}. DALI cannot continue past a sample its decoder rejects, so "
                             f"data.on_corrupt=skip cannot skip this one (data.backend=torch can){checksums}") from e

    def _corrupt_in(self, index: torch.Tensor) -> tuple[list[int], list[str]]:
        """Batch positions and descriptions of the samples the gate found corrupt (checksums);
        raises ShardError naming them unless data.on_corrupt=skip."""
        if not self.gate.corrupt:  # the usual case: nothing found, no per-sample work
            return [], []
        indices = host_read.read(index.reshape(-1))  # only once the gate found something: a rare host read
        bad = [(b, self.gate.corrupt[i]) for b, i in enumerate(indices) if i in self.gate.corrupt]
        if bad and not self.skip:
            raise ShardError("corrupt sample(s) in the shards:\n  " + "\n  ".join(w for _, w in bad)
                             + f"\n{CORRUPT_FIX}{SKIP_HINT}")
        return [b for b, _ in bad], [w for _, w in bad]

    @staticmethod
    def _to_torch(tensor_list) -> torch.Tensor:
        """One DALI output batch as a torch tensor, on the host or the GPU: a zero-copy DLPack view
        that keeps DALI's buffer alive for as long as torch holds it (see the module docstring)."""
        return torch.from_dlpack(tensor_list.as_tensor())  # (B, ...) uniform shape

    def close(self) -> None:
        self.pipe = None  # DALI frees its threads and buffers when the pipeline is collected


def dali_reason(error: Exception) -> str:
    """The operator's own message from a DALI pipeline error (the line after "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    after = [k + 1 for k, line in enumerate(lines) if line.endswith("encountered:") and k + 1 < len(lines)]
    return lines[after[0]] if after else (lines[0] if lines else type(error).__name__)
