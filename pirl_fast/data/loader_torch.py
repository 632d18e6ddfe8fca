"""The `torch` backend: the shards streamed by the `webdataset` library, augmented by torchvision
transforms v2 (pirl_fast/data/torch_transforms.py) in DataLoader workers.

The fallback where DALI is missing and the baseline the DALI loader is measured against: the usual
way to load WebDataset shards (tar streaming, a shuffle buffer, workers), the same augmentations,
the same epoch contract as every backend (pirl_fast/data/batch.py).

Epoch e (the split, the same idea as DALI's reader, which also shards contiguously by sample):
  1. Stream order. The shards are put in an order drawn from derive_seed(seed, e), the same on
     every rank; concatenated, their samples form the epoch's stream, positions 0..N-1.
  2. Slots. The epoch has T = global_batch * ceil(N / global_batch) deliveries; delivery t is the
     sample at stream position t mod N, so t >= N are the duplicates (T - N < one global batch,
     the first samples of the stream again). Rank r owns the contiguous slots
     [r*L, (r+1)*L), L = len * per_rank: the same count on every rank, as DDP needs. Within the
     rank, the DataLoader takes batch b from worker b mod W; worker w owns as many whole
     batches, again as one contiguous run of slots.
  3. Reading. Each worker streams, with `webdataset.WebDataset`, only the shards its slots
     overlap, skipping (reading, not decoding) the samples before its first position and
     stopping after its last. I/O per epoch: the dataset once, plus at most one shard head per
     (rank, worker) (for ImageNet's 1,000-sample shards and 8 ranks x 8 workers, ~2.5% on
     average) and the < one global batch of padding. A worker checks that each shard delivers
     the samples the manifest promises, with the indices it promises (an error naming the shard
     otherwise: a tar damaged after the start-up check ends early or fails mid-epoch).
  4. Shuffle. Raw samples (bytes) pass a seeded shuffle buffer (webdataset's) of
     ceil(data.shuffle_buffer / W) samples per worker, so a rank holds data.shuffle_buffer
     samples in all, as DALI's reader does; then decoding and augmentation.
A batch therefore mixes samples of the few consecutive shards in one worker's buffer; shards are
shuffled globally when written (pirl_fast/shard/cli.py), so classes are mixed within them anyway.

Determinism: the shard order, the split and the shuffle are a pure function of (seed, epoch,
world size, W). With data.workers=0 the augmentations draw from the main process's global torch
RNG (which the trainer saves and restores); with workers > 0 each worker reseeds its torch RNG at
the start of each epoch from (seed, epoch, rank, worker), so the batches of an epoch are a pure
function of those too. `set_epoch(e)` makes the next `iter()` epoch e; each `iter()` after it is
the next epoch (an abandoned epoch counts as one), so a resumed run that calls set_epoch sees the
order of the original run.

Corrupt samples (pirl_fast/shard/corrupt.py): a worker checks each sample's crc member (when the shards
have one) and its decoding; data.on_corrupt=error raises ShardError naming the shard and key,
skip hands a placeholder marked corrupt that `_batches` replaces (batch.replace_corrupt).
Stop signals: workers ignore SIGINT / SIGTERM / SIGUSR1 (pirl_fast/runtime/signals.py); the trainer acts
on them and `close()` then shuts the workers down.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pirl_fast.data.batch import (
    OUTPUT_DTYPES,
    Batch,
    PatchOrder,
    derive_seed,
    epoch_length,
    make_batch,
    replace_corrupt,
)
from pirl_fast.data.config import DataConfig
from pirl_fast.data.torch_transforms import PIRLTransform
from pirl_fast.runtime.signals import blocked, shield_worker
from pirl_fast.shard.corrupt import FIX as CORRUPT_FIX
from pirl_fast.shard.corrupt import SKIP_HINT, decoder_message
from pirl_fast.shard.format import Manifest, ShardError, checksum_problem, decode_int64

FIX = "re-run `python -m pirl_fast.shard --verify` on the shard directory, then re-shard or restore the file"


@dataclass(frozen=True)
class Visit:
    """One streaming read of a shard: its samples start..stop-1 (positions inside the shard)."""

    shard: int  # position in manifest.shards
    start: int
    stop: int


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard order, identical on every rank and worker."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(num_shards, generator=generator).tolist()


def worker_slots(rank: int, worker: int, workers: int, batches: int, per_rank: int) -> tuple[int, int]:
    """[first, end) of the epoch's deliveries that (rank, worker) yields: its whole batches
    (batch b of the rank comes from worker b mod workers), as one contiguous run of slots."""
    counts = [len(range(w, batches, workers)) for w in range(workers)]  # batches per worker
    first = rank * batches * per_rank + per_rank * sum(counts[:worker])
    return first, first + per_rank * counts[worker]


def plan_visits(order: list[int], sizes: list[int], first: int, end: int) -> list[Visit]:
    """The shard reads that deliver stream positions t mod N for t in [first, end), in that order."""
    num_samples = sum(sizes)
    starts = list(itertools.accumulate((sizes[s] for s in order), initial=0))[:-1]  # stream offset per shard
    visits, t = [], first
    while t < end:
        position = t % num_samples
        j = bisect.bisect_right(starts, position) - 1  # the (non-empty) shard holding this position
        start = position - starts[j]
        take = min(sizes[order[j]] - start, end - t)
        visits.append(Visit(order[j], start, start + take))
        t += take
    return visits


class ShardStream(IterableDataset):
    """One rank's samples of the current epoch as (image view, patches, index, label), per worker.

    `epoch` lives in shared memory: the loader writes it before each iter(), and persistent
    workers read it when their next epoch begins."""

    def __init__(self, cfg: DataConfig, manifest: Manifest, per_rank: int, rank: int, world_size: int):
        self.urls = manifest.tar_paths()
        self.sizes = [shard.samples for shard in manifest.shards]
        self.first_index = list(itertools.accumulate(self.sizes, initial=0))  # shard k: indices from here
        self.batches, _ = epoch_length(manifest.num_samples, per_rank * world_size)
        self.per_rank, self.rank, self.seed = per_rank, rank, cfg.seed
        self.workers = max(1, cfg.workers)  # workers=0: one stream, in the main process
        self.buffer = math.ceil(cfg.shuffle_buffer / self.workers)  # per worker: a rank holds shuffle_buffer
        self.transform = PIRLTransform(cfg)
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.checksums, self.skip = manifest.has_checksums, cfg.on_corrupt == "skip"
        cells, size = cfg.grid * cfg.grid, cfg.patch_size
        dtype = OUTPUT_DTYPES[cfg.output_dtype]
        self.placeholder = (torch.zeros(cfg.image_size, cfg.image_size, 3, dtype=dtype),
                            torch.zeros(cells, size, size, 3, dtype=dtype))

    def plan(self, epoch: int, worker: int) -> list[Visit]:
        first, end = worker_slots(self.rank, worker, self.workers, self.batches, self.per_rank)
        return plan_visits(shard_order(len(self.urls), self.seed, epoch), self.sizes, first, end)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch = int(self.epoch)
        epoch_seed = derive_seed(self.seed, epoch)
        slot = self.rank * self.workers + worker  # distinct per (rank, worker)
        if info is not None:  # a worker's own process: augmentations become a function of (seed, epoch, slot)
            torch.manual_seed(derive_seed(epoch_seed, 2 * slot + 1))
        pipeline = wds.DataPipeline(
            functools.partial(self.read, self.plan(epoch, worker)),  # (key, url, jpeg bytes, index, label)
            wds.shuffle(self.buffer, initial=self.buffer, seed=derive_seed(epoch_seed, 2 * slot)),
            wds.map(self.augment),  # decode after the buffer: it holds bytes, and RNG use follows delivery
        )
        return iter(pipeline)

    def read(self, visits: list[Visit]):
        """Stream the planned shard reads through webdataset, checking count and indices; yields
        (key, url, jpeg bytes, index, label, crc member bytes or None)."""
        for visit in visits:
            url = self.urls[visit.shard]
            position = visit.start
            try:
                # One shard per WebDataset: we split by rank and worker ourselves (nodesplitter and
                # workersplitter off), the shard order is ours (shardshuffle off); seed=0 only keeps
                # webdataset from drawing one from Python's global RNG.
                samples = wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                         empty_check=False, seed=0)
                for sample in itertools.islice(samples, visit.start, visit.stop):
                    index, label = decode_int64(sample["idx"]), decode_int64(sample["lbl"])
                    expected = self.first_index[visit.shard] + position
                    if index != expected:
                        raise ShardError(f"shard {url}: sample {position} ({sample['__key__']}) has index {index}, "
                                         f"the manifest implies {expected} (a shard of another run?): {FIX}")
                    yield sample["__key__"], url, sample["jpg"], index, label, sample.get("crc")
                    position += 1
            except ShardError:
                raise
            except Exception as e:  # tarfile / webdataset errors, a missing member
                raise ShardError(f"shard {url} cannot be read at sample {position} "
                                 f"({type(e).__name__}: {e}): {FIX}") from e
            if position != visit.stop:
                raise ShardError(f"shard {url} ended after {position} samples, the manifest says "
                                 f"{self.sizes[visit.shard]} (damaged after the start-up check?): {FIX}")

    def augment(self, sample) -> tuple[torch.Tensor, torch.Tensor, int, int, str | None]:
        """(view (S, S, 3), patches (9, P, P, 3), index, label, None), or for a corrupt sample under
        data.on_corrupt=skip (placeholder zeros, zeros, index, label, "where: why")."""
        key, url, jpeg, index, label, crc = sample
        problem = None
        if self.checksums:
            problem = "its crc member is missing" if crc is None else checksum_problem(jpeg, crc)
        if problem is None:
            try:
                view, patches = self.transform(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))
                return view, patches, index, label, None
            except RuntimeError as e:
                problem = f"does not decode ({decoder_message(e)})"
        where = f"sample {index} ({key}) in {url}"
        if not self.skip:
            raise ShardError(f"{where}: {problem}: {CORRUPT_FIX}{SKIP_HINT}")
        return *self.placeholder, index, label, f"{where}: {problem}"


def collate(samples):
    views, patches, index, label, corrupt = zip(*samples)
    return (torch.stack(views), torch.stack(patches),  # (B, S, S, 3), (B, 9, P, P, 3)
            torch.tensor(index, dtype=torch.int64), torch.tensor(label, dtype=torch.int64),
            [(b, where) for b, where in enumerate(corrupt) if where])  # corrupt samples' positions


class TorchLoader:
    def __init__(self, cfg: DataConfig, manifest: Manifest, per_rank: int, rank: int, world_size: int,
                 device: torch.device):
        self.device = device
        self.batch_size = per_rank
        self.num_samples = manifest.num_samples
        self._len, self.duplicates_per_epoch = epoch_length(manifest.num_samples, per_rank * world_size)
        self.order = PatchOrder(cfg.grid, cfg.num_permutations, cfg.seed, rank, device, cfg.permutation_set)
        self.epoch = 0  # the epoch the next iter() delivers
        self.stream = ShardStream(cfg, manifest, per_rank, rank, world_size)
        self.closing = torch.zeros((), dtype=torch.bool).share_memory_()  # set by close(): workers may die now
        # Also at interpreter exit, before multiprocessing terminates and joins the (daemonic) workers: a
        # loader never closed (a notebook, an exception) must not leave exit waiting on a shielded worker.
        weakref.finalize(self, self.closing.fill_, True)
        # Worker base seeds come from this generator, not the global RNG (which the trainer restores);
        # each worker reseeds per epoch anyway (ShardStream.__iter__).
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, rank))
        self.loader = DataLoader(
            self.stream, batch_size=per_rank, num_workers=cfg.workers, collate_fn=collate,
            pin_memory=device.type == "cuda", generator=generator, persistent_workers=cfg.workers > 0,
            prefetch_factor=cfg.prefetch if cfg.workers > 0 else None,
            worker_init_fn=functools.partial(shield_worker, self.closing) if cfg.workers > 0 else None)

    def set_epoch(self, epoch: int) -> None:
        """The next iter() delivers epoch `epoch` (for resuming); later ones count on from it."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Batch]:
        self.stream.epoch.fill_(self.epoch)  # before iter(): (persistent) workers read it as they start
        self.epoch += 1
        with blocked():  # workers start here the first time: no stop signal before they shield themselves
            source = iter(self.loader)
        return self._batches(source)

    def _batches(self, source) -> Iterator[Batch]:
        to = dict(device=self.device, non_blocking=True)
        count = 0
        for views, patches, index, label, corrupt in source:
            count += 1
            if corrupt:  # data.on_corrupt=skip (with error, the worker raised)
                bad, where = [b for b, _ in corrupt], [w for _, w in corrupt]
                views, patches, index, label = replace_corrupt(bad, where, views, patches, index, label)
            yield make_batch(views.to(**to), patches.to(**to), index.to(**to), label.to(**to), self.order,
                             corrupt=len(corrupt))
        if count != self._len:
            raise RuntimeError(f"the torch loader delivered {count} batches in an epoch, not {self._len}: a loader bug")

    def close(self) -> None:
        self.closing.fill_(True)  # from now on a SIGTERM (torch's terminate() of a stuck worker) ends a worker
        self.loader = None  # persistent workers exit when the DataLoader's iterator is collected
