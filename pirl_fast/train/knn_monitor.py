"""Learning you can watch: the weighted-kNN top-1 of the validation split against the memory bank, while training.

The memory bank already holds one embedding per training image, m_i = f(v_I) of sample i (the image
head's L2-normalised output for its augmented views, averaged by the bank's momentum), and the shards
hold every sample's label. Every trainer.knn_every epochs and at the end of training, the monitor
embeds the validation images the same way, f = normalize(image_head(trunk(x))) (`embed_image`), in
eval mode (BN running statistics) on the evaluation view (resize to image_size * 256/224, centre crop:
`eval knn`'s, pirl_fast/data/labelled_shards.py), and classifies each by the weighted kNN of Wu et
al. 2018 over the bank's rows (pirl_fast/model/knn.py: k = 200, tau = 0.07, the NPID values). Only
that validation forward is extra: the training images are not embedded again. `knn_top1` goes to
metrics.jsonl, TensorBoard and the progress line in the log record of that step.

Unlike `python -m pirl_fast.eval knn` (frozen trunk features of every training image, res5), this
scores the bank: embeddings from the weights of the last epoch, of augmented views, so the figures
differ; it tracks learning, `eval knn` measures the result.

The validation split is the one `eval knn` finds: the val, validation or test split beside the
training shards (data.shards=shards/in1k trains on shards/in1k/train and watches shards/in1k/val).
The training labels are read once at start (a scan of the shard tar headers, no image decoded). With
no labels (synthetic data, multi-label shards, one class), no validation split, or method=jigsaw (whose
bank stays unused) the monitor is off, said in one line.

Under torchrun each rank embeds a contiguous part of the validation split and scores it against its
own copy of the bank (identical on every rank), then one all-reduce sums the correct counts. Nothing
the training reads is touched: the model's mode is restored, BN statistics are not updated (eval
mode; the bare module, not DDP's wrapper, so no buffer broadcast), the images come through a loader
seeded from its own generator, and the torch / CUDA RNG states are restored afterwards, so a run's
weights are the same bit for bit with the monitor on or off.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from pirl_fast.data.config import resolve_workers
from pirl_fast.data.labelled_shards import ShardImageDataset, eval_transform
from pirl_fast.model.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_scores
from pirl_fast.runtime import dist
from pirl_fast.runtime.signals import blocked, shield_worker
from pirl_fast.shard.format import ShardError
from pirl_fast.shard.splits import ShardPath, eval_split_beside

SIMILARITY_BYTES = 256 * 2**20  # one chunk of the (queries, bank rows) similarity matrix: ImageNet 52 x 1.28M


@dataclass
class KNNMonitor:
    every: int  # trainer.knn_every: epochs between evaluations
    train_labels: Tensor  # (N,) int64 on the device: the label of bank row i
    num_classes: int
    val: Subset  # this rank's contiguous part of the validation split: (image, label, index)
    val_dir: str
    num_val: int  # the whole validation split, over all ranks
    batch_size: int
    workers: int
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    last_top1: float | None = None  # the last score, for the run's summary

    def due(self, epoch_done: bool, epoch: int, finished: bool) -> bool:
        """After a step: at the end of every `every`-th epoch, and at the end of training (`finished`: the
        last step ran). The loop does not ask after a stop signal: a preempted job should not wait for it."""
        return finished or (epoch_done and epoch % self.every == 0)

    @torch.no_grad()
    def score(self, module: nn.Module, bank: Tensor, device: torch.device, autocast: torch.dtype | None,
) -> dict[str, float]:
        """{"knn_top1", "knn_time_s"} over the whole validation split; every rank must call it."""
        start = time.perf_counter()
        was_training = module.training
        module.eval()  # BN running statistics, and none updated
        try:
            with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
                queries, labels = self._embed(module, device, autocast)  # (M_r, D), (M_r,)
        finally:
            module.train(was_training)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        if len(queries):
            rows = bank[: len(self.train_labels)]  # bench step's --bank-rows pads the bank beyond the samples
            scores = knn_scores(rows, self.train_labels, queries, self.num_classes, self.k, self.temperature,
                                chunk_size=max(1, min(1024, SIMILARITY_BYTES // (4 * len(rows)))))  # (M_r, C)
            correct = (scores.argmax(dim=1) == labels).sum().double()
        counts = torch.stack([correct, torch.tensor(float(len(queries)), dtype=torch.float64, device=device)])
        correct, total = (dist.all_reduce_mean(counts) * dist.info().world_size).tolist()  # the one all-reduce
        self.last_top1 = correct / total
        return {"knn_top1": self.last_top1, "knn_time_s": time.perf_counter() - start}

    def _embed(self, module: nn.Module, device: torch.device, autocast: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """f(x) of this rank's validation images, L2-normalised float32 (M_r, D), and their labels (M_r,)."""
        closing = torch.zeros((), dtype=torch.bool).share_memory_()  # workers ignore SIGTERM while they read
        loader = DataLoader(self.val, batch_size=self.batch_size, num_workers=self.workers,
                            pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(0),  # not the global RNG the training draws from
                            worker_init_fn=functools.partial(shield_worker, closing) if self.workers > 0 else None)
        feats, labels = [], []
        try:
            with blocked():  # no stop signal reaches a worker before it shields itself
                batches = iter(loader)
            for images, y, _ in batches:
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    feats.append(module.embed_image(images.to(device, non_blocking=True)))  # (b, D), fp32
                labels.append(y.to(device, non_blocking=True))
        finally:
            closing.fill_(True)
        if not feats:
            return torch.zeros(0, 1, device=device), torch.zeros(0, dtype=torch.long, device=device)
        return torch.cat(feats), torch.cat(labels).long()


def build(cfg, shards: ShardPath | None, num_samples: int, rank: int, world_size: int, device: torch.device
          ) -> tuple[KNNMonitor | None, str | None]:
    """The monitor for this run, or None; and the one line to say about it (None: say nothing).

    `cfg` is the run's Config; `shards` the training split (None with synthetic data)."""
    every = cfg.trainer.knn_every
    if every == 0:
        return None, None
    off = "kNN monitor off (trainer.knn_every=0 silences this line): "
    if cfg.method != "pirl":
        return None, off + f"method={cfg.method} does not use the memory bank it scores against"
    if shards is None:
        return None, off + f"data.backend={cfg.data.backend} has no labels and no validation split"
    val_split = eval_split_beside(shards)
    if val_split is None:
        return None, off + (f"no val, validation or test split beside the training shards {shards.dir} (shard a "
                            "dataset root such as SRC/{train,val} and pass data.shards=ROOT to watch kNN top-1)")
    train = ShardImageDataset(shards.dir, transform=None)  # a scan of the tar headers: labels and indices
    indices = torch.tensor([e.index for e in train.entries])
    if len(train) != num_samples or not torch.equal(indices, torch.arange(num_samples)):
        raise ShardError(f"{shards.dir}: the samples' indices are not 0..{num_samples - 1} (the memory bank's "
                         "rows): re-shard it (`python -m pirl_fast.shard SRC DST --overwrite`)")
    if train.multi_label or len(train.classes) < 2:
        why = "multi-label samples (no single label)" if train.multi_label else f"{len(train.classes)} class"
        return None, off + f"the training shards {shards.dir} hold {why}: kNN top-1 needs one label of 2+ classes"
    val = ShardImageDataset(val_split.dir, eval_transform(cfg.data.image_size))
    if val.classes != train.classes:
        return None, off + (f"the {val_split.split} shards {val_split.dir} have other classes than the training "
                            f"shards ({val.classes[:3]}... vs {train.classes[:3]}...): shard both splits from one "
                            "dataset root")
    if val.multi_label or len(val) == 0:
        return None, off + f"the {val_split.split} shards {val_split.dir} hold no single-label samples"
    part = range(rank * len(val) // world_size, (rank + 1) * len(val) // world_size)  # contiguous, all of it
    monitor = KNNMonitor(every=every, train_labels=train.labels.to(device), num_classes=len(train.classes),
                         val=Subset(val, part), val_dir=str(val_split.dir), num_val=len(val),
                         batch_size=cfg.data.batch_size // world_size, workers=resolve_workers(cfg.data.workers))
    return monitor, (f"kNN monitor: every {every} epoch(s) and at the end, the {len(val)} images of "
                     f"{val_split.dir} against the bank's {num_samples} rows (k={monitor.k}, "
                     f"tau={monitor.temperature}): knn_top1 in metrics.jsonl"
                     + ("; this is the test split: watch it, but choose settings on a val split"
                        if val_split.split == "test" else ""))
