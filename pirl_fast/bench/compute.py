"""The PIRL training step on synthetic data, without Hydra: samples/s of the compute alone.

The compute ceiling of one device, from the model's own modules (no pirl_fast.train, so no Hydra,
OmegaConf, WebDataset or DALI: it runs on a bare GPU image). Per step, as the trainer's train_step:
the trunk on B images and on 9B patches under autocast, f and g, the NCE loss of both terms
against the memory bank (fused kernel), backward, SGD, the bank update, and one host read of the
loss (the trainer's finite check). The batches come from the synthetic loader (drawn on the
device, the Batch contract's shapes and channels-last strides).

On CUDA: ResNet-50, 224 px images, 64 px patches, batch 256, bf16 autocast, channels-last, a bank
of ImageNet's 1,281,167 rows. On the CPU: the smoke experiment's ResNet-18 at toy sizes, fp32.
One row per --compile mode (off: eager; on: torch.compile of the model), each guarded:

  samples_per_s   B * timed steps / their time (CUDA events around the timed steps: the device's
                  time, not the host's)
  step_ms         the mean step time
  warmup_s        wall time of the --warmup untimed steps (with compile: the compilation)
  peak_mem_gib    (CUDA) torch.cuda.max_memory_allocated over the row
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from pirl_fast.bench.record import Recorder
from pirl_fast.data.config import DataConfig
from pirl_fast.data.loader_synthetic import SyntheticLoader
from pirl_fast.model.loss import LossConfig, PIRLCriterion, PIRLObjective
from pirl_fast.model.memory_bank import BankConfig, MemoryBank
from pirl_fast.model.network import ModelConfig, PIRLModel, memory_format_for
from pirl_fast.train.optim import OptimConfig, build_optimizer

IMAGENET_ROWS = 1_281_167


def add_arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--batch", type=int, default=256 if cuda else 8, help="batch (default 256 on CUDA, 8 on the CPU)")
    p.add_argument("--steps", type=int, default=30 if cuda else 3, help="timed steps (default 30 / 3)")
    p.add_argument("--warmup", type=int, default=8 if cuda else 1, help="untimed steps first (default 8 / 1)")
    p.add_argument("--arch", default="resnet50" if cuda else "resnet18", help="resnet50 | resnet18")
    p.add_argument("--image-size", type=int, default=224 if cuda else 32, help="image crop side (224 / 32)")
    p.add_argument("--patch-size", type=int, default=64 if cuda else 8, help="patch side (64 / 8)")
    p.add_argument("--bank-rows", type=int, default=IMAGENET_ROWS if cuda else 4096,
                   help="memory-bank rows (default ImageNet's 1,281,167 on CUDA, 4,096 on the CPU)")
    p.add_argument("--negatives", type=int, default=32000 if cuda else 256, help="K per term (32,000 / 256)")
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                   help="rows to run: off (eager), on (torch.compile); e.g. --compile off on")
    p.add_argument("--device", default="cuda" if cuda else "cpu")


def measure(args, compiled: bool) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    module = PIRLModel(ModelConfig(arch=args.arch, stem="imagenet" if args.image_size >= 128 else "small"))
    module.to(device, memory_format=memory_format_for(device))  # channels-last on CUDA
    model = torch.compile(module) if compiled else module
    bank = MemoryBank(args.bank_rows, module.cfg.embed_dim, BankConfig(num_negatives=args.negatives)).to(device)
    criterion = PIRLCriterion(LossConfig(), args.bank_rows).to(device)
    objective = PIRLObjective(criterion, bank)
    optimizer = build_optimizer(module, OptimConfig(), lr=0.03)
    data = DataConfig(backend="synthetic", batch_size=args.batch, synthetic_samples=args.bank_rows,
                      image_size=args.image_size, patch_size=args.patch_size,
                      patch_crop_size=3 * args.patch_size + 3)
    batches = iter(SyntheticLoader(data, args.batch, 0, 1, device))
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        batch = next(batches)
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            outputs = model(*objective.inputs(batch))  # f, g (B, D)
        terms = objective(outputs, batch)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        loss = terms.total.item()  # the trainer's one host read per step (its finite check)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is not finite ({loss})")
        optimizer.step()
        objective.update(outputs, batch)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t0
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        seconds = time.perf_counter() - t0
    row = {"samples_per_s": args.batch * args.steps / seconds, "step_ms": seconds / args.steps * 1e3,
           "warmup_s": warmup_s, "precision": "bf16" if cuda else "fp32",
           "channels_last": memory_format_for(device) == torch.channels_last}
    if cuda:
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def run(args, rec: Recorder | None = None) -> list[dict]:
    """One row per --compile mode, each guarded: a failed mode is a row with its error."""
    rec = rec or Recorder("compute")
    if min(args.batch, args.steps, args.bank_rows, args.negatives) < 1 or args.warmup < 0:
        raise SystemExit("--batch, --steps, --bank-rows and --negatives must be >= 1, --warmup >= 0")
    for mode in args.compile:
        description = {"backend": "synthetic", "arch": args.arch, "batch": args.batch, "image_size": args.image_size,
                       "patch_size": args.patch_size, "bank_rows": args.bank_rows, "negatives": args.negatives,
                       "compile": mode == "on", "device": args.device}
        print(f"-- compile {mode}: {args.warmup} + {args.steps} steps of {args.arch}, batch {args.batch}", flush=True)
        rec.guarded(description, lambda compiled=mode == "on": measure(args, compiled))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the last row's model and bank are gone: give their memory back
    return rec.rows
