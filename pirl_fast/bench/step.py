"""Training-step throughput: samples/s of the full PIRL step with synthetic data vs each real loader.

The same model, batch and crop sizes run the whole training step (forward of the trunk on the
images and the patches, NCE against the memory bank, backward, SGD, bank update) through
`pirl_fast.train`, once per backend:

    synthetic  batches made on the device: compute only, the ceiling
    dali       the DALI pipeline (on the GPU with CUDA, CPU-only otherwise)
    torch      the DataLoader + torchvision baseline

vs_synthetic = backend samples/s / synthetic samples/s: near 1.0 means data loading keeps up
with the GPU; well below 1.0 (with a high data_wait_share) means the loader limits training.
Figures leave out the first --warmup steps (cuDNN autotuning, torch.compile, prefetch fill) and
the end-of-run checkpoint. Defaults: on CUDA, ResNet-50 at the paper's crop sizes (224 / 255 /
64 px), batch 256; on the CPU, the smoke experiment's ResNet-18 at 64 / 63 / 16 px, batch 8,
a few steps (2-3 minutes on a laptop-class CPU).

Without --shards, sample shards of ImageNet-like images (400-500 px sides) are generated in a
temporary directory first (pirl_fast.sample_data + pirl_fast.shard).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

BACKENDS = ("synthetic", "dali", "torch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--shards", metavar="DIR", help="shard directory (default: generate sample shards in a temp dir)")
    p.add_argument("--images", type=int, default=1024 if cuda else 96,
                   help="images to generate without --shards (default: 1024 on CUDA, 96 on CPU)")
    p.add_argument("--steps", type=int, default=40 if cuda else 6, help="timed steps per backend (default 40 / 6)")
    p.add_argument("--warmup", type=int, default=10 if cuda else 2, help="untimed steps first (default 10 / 2)")
    p.add_argument("--batch", type=int, default=256 if cuda else 8, help="global batch (default 256 / 8)")
    p.add_argument("--arch", default="resnet50" if cuda else "resnet18", help="resnet50 | resnet18")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="DALI threads / DataLoader workers (default: the CPU cores, at most 16)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (adds minutes of compile)")


def step_config(args, backend: str, shards: str, num_samples: int, run_dir: Path):
    """The training config for one backend: the same model, batch and sizes for all of them."""
    steps = args.warmup + args.steps
    batches_per_epoch = math.ceil(num_samples / args.batch)
    overrides = [
        "experiment=pirl_in1k_r50" if torch.cuda.is_available() else "experiment=smoke",
        f"model.arch={args.arch}", f"data.backend={backend}", f"data.shards={shards}",
        f"data.batch_size={args.batch}", f"data.workers={args.workers}", f"data.synthetic_samples={num_samples}",
        f"trainer.max_steps={steps}", f"trainer.epochs={steps // batches_per_epoch + 1}",
        f"trainer.timing_warmup_steps={args.warmup}", f"trainer.compile={str(args.compile).lower()}",
        "trainer.ckpt_every=0", "trainer.ckpt_epoch_end=false", "trainer.progress=false",
        "trainer.log_every=1000000", "resume=none", f"run_dir={run_dir}",
    ]
    with initialize_config_module("pirl_fast.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def measure(args, backend: str, shards: str, num_samples: int, run_dir: Path) -> dict:
    from pirl_fast.train import train

    s = train(step_config(args, backend, shards, num_samples, run_dir))
    busy = s["wall_s"] - s["time_s"]["checkpoint"]  # the end-of-run checkpoint is not training
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "backend": backend, "arch": args.arch, "global_batch": args.batch, "device": s["device"],
        "precision": s["precision"], "steps_timed": s["steps_timed"],
        "samples_per_s": s["samples_timed"] / busy if busy > 0 else 0.0,
        "data_wait_share": s["time_s"]["data"] / busy if busy > 0 else 0.0,
        "compute_share": s["time_s"]["compute"] / busy if busy > 0 else 0.0,
        "bank_share": s["time_s"]["bank"] / busy if busy > 0 else 0.0,
    }


def run(args) -> list[dict]:
    from pirl_fast.manifest import load_manifest
    from pirl_fast.splits import resolve_shards

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; choose from {', '.join(BACKENDS)}")
    with tempfile.TemporaryDirectory(prefix="pirl_bench_step_") as tmp:
        tmp = Path(tmp)
        shards = args.shards
        if shards is None and set(backends) - {"synthetic"}:
            from pirl_fast.bench.loader import make_bench_shards

            print(f"generating {args.images} sample images and sharding them in {tmp} ...", flush=True)
            shards = make_bench_shards(tmp / "data", args.images)
        num_samples = load_manifest(resolve_shards(shards).dir).num_samples if shards else args.images
        rows = []
        for backend in backends:
            print(f"-- {backend}: {args.warmup} + {args.steps} steps of {args.arch}, global batch {args.batch}",
                  flush=True)
            rows.append(measure(args, backend, shards or "???", num_samples, tmp / f"run_{backend}"))
    base = next((r["samples_per_s"] for r in rows if r["backend"] == "synthetic"), None)
    for row in rows:
        row["vs_synthetic"] = row["samples_per_s"] / base if base else float("nan")
    return rows


if __name__ == "__main__":  # python -m pirl_fast.bench.step also works
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    from pirl_fast.bench.report import format_table

    print(format_table(run(parser.parse_args())))
