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
the end-of-run checkpoint. On CUDA, ResNet-50 at the paper's crop sizes (224 / 255 / 64 px); on
the CPU, the smoke experiment's ResNet-18 at 64 / 63 / 16 px (2-3 minutes on a laptop-class CPU).

The memory bank has --bank-rows rows whatever the number of images, so the figure pays the real
bank's memory traffic (a bank sized to 1,024 generated images, 0.5 MB, would sit in L2). The
negatives are drawn from all its rows; positives and updates touch the images' rows.
  bank_ms     the bank's work per step timed alone after the run, on the same bank: both loss
              terms (negatives gathered and scored, loss, backward) and the bank update, at the
              run's batch (CUDA synchronised around it; median of --bank-repeats)
  bank_share  bank_ms / the step time of that backend
  bank_update_share  the training loop's bank-update phase / wall time (the update alone)
Nothing here synchronises the training steps: trainer.sync_timing=false (compute and bank phases
are timed by CUDA events, pirl_fast/train/metrics.py).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pirl_fast.bench.record import Recorder
from pirl_fast.runtime.cpus import cpus_per_rank

BACKENDS = ("synthetic", "dali", "torch")
IMAGENET_ROWS = 1_281_167  # ImageNet-1k train images: the paper's bank
CPU_BANK_ROWS = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--shards", metavar="DIR", help="shard directory (default: generate sample shards of "
                   "ImageNet-like images, 400-500 px sides, in a temp dir)")
    p.add_argument("--images", type=int, default=1024 if cuda else 96,
                   help="images to generate without --shards (default: 1024 on CUDA, 96 on CPU)")
    p.add_argument("--steps", type=int, default=40 if cuda else 6, help="timed steps per backend (default 40 / 6)")
    p.add_argument("--warmup", type=int, default=10 if cuda else 2, help="untimed steps first (default 10 / 2)")
    p.add_argument("--batch", type=int, default=256 if cuda else 8, help="global batch (default 256 / 8)")
    p.add_argument("--arch", default="resnet50" if cuda else "resnet18", help="resnet50 | resnet18")
    p.add_argument("--workers", type=int, default=min(16, cpus_per_rank()),
                   help="DALI threads / DataLoader workers (default: the CPU cores this process may use, at most 16)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (adds minutes of compile)")
    p.add_argument("--bank-rows", type=int, default=IMAGENET_ROWS if cuda else CPU_BANK_ROWS,
                   help=f"memory-bank rows (default: {IMAGENET_ROWS:,}, ImageNet's size, on CUDA; {CPU_BANK_ROWS:,} on "
                        "the CPU); 0: one per image")
    p.add_argument("--bank-repeats", type=int, default=10 if cuda else 3,
                   help="timed repeats of the bank's work alone, for bank_ms (default 10 / 3)")
    p.add_argument("--data", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra data.* settings for every backend, e.g. output_dtype=float16 hw_decoder_load=0.8")


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
        "trainer.log_every=1000000", "trainer.sync_timing=false", "resume=none", f"run_dir={run_dir}",
        *[f"data.{item}" for item in args.data],
    ]
    from hydra import compose, initialize_config_module  # here: the module imports without Hydra (bench compute)

    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def bank_seconds(run, repeats: int) -> float:
    """Median seconds of one step's bank work alone: both loss terms forward and backward, and the
    update, at the run's per-rank batch, on the run's bank and criterion (after training)."""
    device, b, d = run.device, run.global_batch // run.world_size, run.bank.dim
    f = F.normalize(torch.randn(b, d, device=device), dim=1).requires_grad_()  # (B, D) like the heads' output
    g = F.normalize(torch.randn(b, d, device=device), dim=1).requires_grad_()
    index = torch.arange(b, device=device) % run.bank.num_samples  # (B,) rows the loader would give
    times = []
    for k in range(repeats + 1):  # the first: warm-up (Triton compile, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run.criterion(f, g, index, run.bank).total.backward()
        run.bank.update(index, f.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args, backend: str, shards: str, num_samples: int, run_dir: Path, base: float | None) -> dict:
    """One backend's row; vs_synthetic against `base`, synthetic's samples/s when measured before it."""
    from pirl_fast.train.loop import run_training

    run, s = run_training(step_config(args, backend, shards, num_samples, run_dir), bank_rows=args.bank_rows)
    busy = s["wall_s"] - s["time_s"]["checkpoint"]  # the end-of-run checkpoint is not training
    step_s = busy / s["steps_timed"] if s["steps_timed"] else float("nan")
    bank_s = bank_seconds(run, args.bank_repeats) if run.cfg.method == "pirl" else float("nan")
    del run
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    row = {
        "backend": backend, "arch": args.arch, "global_batch": args.batch, "device": s["device"],
        "precision": s["precision"], "steps_timed": s["steps_timed"], "bank_rows": args.bank_rows or num_samples,
        "samples_per_s": s["samples_timed"] / busy if busy > 0 else 0.0,
        "data_wait_share": s["time_s"]["data"] / busy if busy > 0 else 0.0,
        "compute_share": s["time_s"]["compute"] / busy if busy > 0 else 0.0,
        "bank_update_share": s["time_s"]["bank"] / busy if busy > 0 else 0.0,
        "bank_ms": bank_s * 1e3, "bank_share": bank_s / step_s,
    }
    row["vs_synthetic"] = row["samples_per_s"] / base if base else (1.0 if backend == "synthetic" else float("nan"))
    return row


def run(args, rec: Recorder | None = None) -> list[dict]:
    """One row per backend, each guarded (rec.guarded): a backend that fails is a row with its error."""
    rec = rec or Recorder("step")
    from pirl_fast.shard.format import load_manifest
    from pirl_fast.shard.splits import resolve_shards

    if args.bank_rows < 0 or args.bank_repeats < 1:
        raise SystemExit(f"--bank-rows ({args.bank_rows}) must be >= 0 and --bank-repeats ({args.bank_repeats}) >= 1")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends.sort(key=lambda b: b != "synthetic")  # synthetic first: the others' vs_synthetic needs it
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
        if 0 < args.bank_rows < num_samples:
            raise SystemExit(f"--bank-rows {args.bank_rows} is below the {num_samples} images: the bank needs a row "
                             "per image at least (0: exactly one per image)")
        base = None
        for backend in backends:
            print(f"-- {backend}: {args.warmup} + {args.steps} steps of {args.arch}, global batch {args.batch}",
                  flush=True)
            row = rec.guarded({"backend": backend, "compile": args.compile},
                              lambda backend=backend, base=base: measure(args, backend, shards or "???", num_samples,
                                                                         tmp / f"run_{backend}", base))
            if backend == "synthetic" and "error" not in row:
                base = row["samples_per_s"]
    return rec.rows


if __name__ == "__main__":  # python -m pirl_fast.bench.step also works
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    from pirl_fast.bench.output import format_table

    print(format_table(run(parser.parse_args())))
