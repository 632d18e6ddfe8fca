"""Loader throughput: PIRL samples/s of the dali backend against the torch baseline, same shards.

Each PIRL sample is one JPEG decoded into two views: a 224 px image crop and nine 64 px patches,
all augmented independently, delivered as a `Batch` (patch order applied). Both CPU backends get
the same number of CPU threads (DALI threads = DataLoader workers) and are timed in alternation,
round after round, each after a warm-up that drains what was prefetched while the other ran; the
figure is the median over rounds. With CUDA present the dali backend is also timed on the GPU,
once per --hw-decoder-loads value (data.hw_decoder_load: the share of JPEGs for the hardware
decoder of A100/H100/H200; DataConfig in data/config.py): the sweep that picks it for a machine. On a
CPU-only machine there is nothing to sweep (the CPU graph decodes with libjpeg-turbo): it says so.

Both backends run the same augmentation, DataConfig's defaults (the paper's recipe with the
reference's photometric ops) unless --data changes it, e.g.
    --data photometric_p=0                                  without the photometric ops
    --data photometric_p=0 blur_p=0.5 jitter_p=0.8 brightness=0.8 contrast=0.8 saturation=0.8
                                                            the improved recipe (experiment=pirl_mlp_in1k_r50)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pirl_fast.bench.record import Recorder
from pirl_fast.data.config import DataConfig
from pirl_fast.data.loaders import build_loader
from pirl_fast.runtime.cpus import cpus_per_rank
from pirl_fast.runtime.progress import progress

IMAGE_SIDES = (400, 501)  # px, ImageNet-like: its median image is about 400 x 500
JPEG_QUALITY = 90  # typical of ImageNet's files
BENCH_CLASSES = 10
HW_DECODER_LOADS = (0.0, 0.5, 0.65, 0.8, 1.0)  # 0: nvJPEG's CUDA decoder only; 1: all to the hardware decoder
SWEEP_NEEDS_GPU = ("hw_decoder_load sweep: needs a GPU (the hardware JPEG decoder of A100/H100/H200); "
                   "the CPU graph decodes with libjpeg-turbo, so there is nothing to sweep here")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", metavar="DIR", help="shard directory to read (default: generate one "
                   "in a temp dir: --images ImageNet-like baseline JPEGs, 400-500 px sides)")
    p.add_argument("--images", type=int, default=1000, help="images to generate without --shards (default 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="per-process batch (default 64)")
    p.add_argument("--workers", type=int, default=cpus_per_rank(),
                   help="DALI threads = DataLoader workers (default: the CPU cores this process may use)")
    p.add_argument("--batches", type=int, default=10, help="timed batches per backend per round (default 10)")
    p.add_argument("--warmup", type=int, default=4, help="untimed batches before each timed run (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported (default 3)")
    p.add_argument("--plot", metavar="PATH.png", help="also draw a bar chart of samples/s per backend")
    p.add_argument("--hw-decoder-loads", type=float, nargs="+", default=list(HW_DECODER_LOADS), metavar="X",
                   help="on a GPU: data.hw_decoder_load values to time the dali GPU graph with "
                        f"(default {' '.join(map(str, HW_DECODER_LOADS))}; DALI's default is 0.65)")
    p.add_argument("--data", nargs="+", default=[], metavar="KEY=VALUE",
                   help="data.* settings for both backends, typed and checked like the trainer's "
                        "(e.g. photometric_p=0 or blur_p=0.5); default: DataConfig's defaults")


def make_bench_shards(root: Path, images: int, seed: int = 0) -> str:
    """An ImageFolder of `images` synthetic photos with 400-500 px sides, sharded into root/shards."""
    from PIL import Image

    from pirl_fast.shard.cli import Options, run_shard
    from pirl_fast.shard.sample_data import class_names, make_image

    rng = np.random.default_rng(seed)
    names = class_names(BENCH_CLASSES)
    for i in range(images):
        label = i % BENCH_CLASSES
        folder = root / "src" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(*IMAGE_SIDES, size=2))
        make_image(label, rng).resize((w, h), Image.BILINEAR).save(folder / f"{i:06d}.jpg", quality=JPEG_QUALITY)
    run_shard(Options(src=str(root / "src"), dst=str(root / "shards"), samples_per_shard=max(1, images // 8),
                      workers=min(8, cpus_per_rank())))
    return str(root / "shards")


def endless(loader):
    """Batches across epoch boundaries, forever."""
    for _ in itertools.count():
        yield from loader


def timed(stream, warmup: int, batches: int, device: torch.device) -> float:
    """Seconds for `batches` batches after `warmup` untimed ones (CUDA synchronised at both ends)."""
    for _ in range(warmup):
        next(stream)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del batch
    return time.perf_counter() - start


def data_settings(items: list[str]) -> dict:
    """KEY=VALUE strings -> DataConfig fields, typed by the schema (a misspelt key or bad value fails).
    OmegaConf (Hydra's) only when there are settings to type: the defaults need none."""
    if not items:
        return {}
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.from_dotlist(items))
    except OmegaConfBaseException as e:
        raise SystemExit(f"--data {' '.join(items)}: {e}; keys are DataConfig's (pirl_fast/data/loaders.py)") from e
    values = OmegaConf.to_container(merged)
    return {key: values[key] for key in OmegaConf.from_dotlist(items)}


def contenders(args) -> list[tuple[str, torch.device, dict]]:
    """(backend, device, extra data settings): both CPU backends, and on CUDA the dali GPU graph once
    per hw_decoder_load of the sweep."""
    found = [("dali", torch.device("cpu"), {}), ("torch", torch.device("cpu"), {})]
    if torch.cuda.is_available():
        bad = [x for x in args.hw_decoder_loads if not 0 <= x <= 1]
        if bad:
            raise SystemExit(f"--hw-decoder-loads {bad}: each must be in [0, 1] (a share of the JPEGs)")
        found += [("dali", torch.device("cuda"), {"hw_decoder_load": x}) for x in args.hw_decoder_loads]
    return found


def measure(shards: str, args, rec: Recorder | None = None) -> list[dict]:
    """Build each contender, then time them in alternating rounds. Everything is guarded (rec.guarded):
    a loader that fails to build or to deliver is a row with its error and leaves the rounds; every
    round's figure is written the moment it is measured (row "round": r), the medians at the end
    (row "round": "median")."""
    rec = rec or Recorder("loader")
    runs = contenders(args)
    settings = data_settings(args.data)
    data = " ".join(args.data) or "defaults"
    streams, seconds = {}, {}
    for k, (backend, device, extra) in enumerate(runs):
        def build(backend=backend, device=device, extra=extra, k=k):
            cfg = DataConfig(shards=shards, backend=backend, batch_size=args.batch_size, workers=args.workers,
                             **{**settings, **extra})
            streams[k] = endless(build_loader(cfg, device=device))
            return {}

        described = describe(backend, device, extra, args, data)
        if "error" in rec.guarded({**described, "round": "build"}, build):
            continue
        seconds[k] = []
    for r in progress(range(args.rounds), desc="loader rounds", unit="round"):  # alternate: noise hurts all alike
        for k in list(seconds):
            backend, device, extra = runs[k]

            def one_round(k=k, device=device):
                s = timed(streams[k], args.warmup, args.batches, device)
                seconds[k].append(s)
                return {"samples_per_s": args.batch_size * args.batches / s}

            if "error" in rec.guarded({**describe(backend, device, extra, args, data), "round": r}, one_round):
                del seconds[k], streams[k]  # a loader that failed once is not timed again
    rates = {k: args.batch_size * args.batches / statistics.median(times) for k, times in seconds.items() if times}
    torch_rate = next((rates[k] for k in rates if runs[k][0] == "torch"), None)
    rows = []
    for k, rate in rates.items():
        row = {**describe(*runs[k], args, data), "round": "median", "samples_per_s": rate,
               "vs_torch": rate / torch_rate if torch_rate else float("nan")}
        rows.append(rec.add(row))
    return rows


def describe(backend: str, device: torch.device, extra: dict, args, data: str) -> dict:
    return {"backend": backend, "device": device.type, "threads": args.workers, "batch": args.batch_size, **extra,
            "data": data}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['backend']} ({r['device']}" + (f", hw {r['hw_decoder_load']:g})" if "hw_decoder_load" in r else ")")
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 3.5))
    colours = {"dali cpu": "tab:green", "torch cpu": "tab:gray", "dali cuda": "tab:blue"}
    bars = ax.bar(labels, [r["samples_per_s"] for r in rows],
                  color=[colours[f"{r['backend']} {r['device']}"] for r in rows])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("PIRL samples / s")
    ax.set_title(f"loader throughput, {rows[0]['threads']} CPU threads")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args, rec: Recorder | None = None) -> list[dict]:
    """The median rows (rec holds every round's row too, and the errors)."""
    if not torch.cuda.is_available():
        print(SWEEP_NEEDS_GPU, flush=True)
    with tempfile.TemporaryDirectory(prefix="pirl_bench_loader_") as tmp:
        shards = args.shards or make_bench_shards(Path(tmp), args.images)
        rows = measure(shards, args, rec)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return rows
