"""PIRL pre-training: `python -m pirl_fast.train` (one process) or `torchrun -m pirl_fast.train` (DDP).

    python -m pirl_fast.train experiment=smoke data.shards=demo/shards
    torchrun --nproc_per_node=8 -m pirl_fast.train experiment=pirl_in1k_r50 data.shards=shards/in1k
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        -m pirl_fast.train experiment=pirl_in1k_r50 data.shards=/shared/shards/in1k

`main(cfg)` is the Hydra entry point; `train(cfg)` is plain (tests call it with `compose(...)`).
One step, top to bottom, in `train_step`: LR, forward under autocast, loss, finite check,
backward, optimiser step, bank update. The loop around it (`fit`) fetches batches, checkpoints,
logs, and stops on max_steps, the last epoch, a signal (pirl_fast/runtime/signals.py), or a non-finite loss.

The run directory (pirl_fast/train/run_dirs.py) is chosen by rank 0 and broadcast; only rank 0 writes
there. Checkpoints (`save_checkpoint`): every trainer.ckpt_every steps, at epoch ends, at the end and
at the step boundary after a stop signal; never after a non-finite loss. When `resume` is bit-for-bit
exact (same world size, a replayable backend, deterministic kernels): README.md, "Resume is exact".
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pirl_fast.data.loader_synthetic import NUM_CLASSES as SYNTHETIC_CLASSES
from pirl_fast.data.loaders import BackendUnavailable, build_loader, resolve_backend
from pirl_fast.model.diagnostics import IntervalMeans
from pirl_fast.model.jigsaw import JigsawLoss, JigsawModel, JigsawObjective
from pirl_fast.model.loss import PIRLCriterion, PIRLObjective
from pirl_fast.model.memory_bank import MemoryBank
from pirl_fast.model.network import PIRLModel, memory_format_for
from pirl_fast.model.supervised import SupervisedModel, SupervisedObjective
from pirl_fast.runtime import dist, host_read
from pirl_fast.runtime.atomic import NoSpaceError, atomic_write, write_json
from pirl_fast.runtime.signals import STOP_SIGNALS, StopRequest, exit_status, stop_with_launcher
from pirl_fast.shard.format import ShardError, load_manifest
from pirl_fast.shard.splits import resolve_shards, shard_splits
from pirl_fast.train import checkpoint, knn_monitor, preflight, run_dirs
from pirl_fast.train.checkpoint import CheckpointError
from pirl_fast.train.config import Config, ConfigError, to_dataclass, to_yaml, validate
from pirl_fast.train.metrics import MetricsLogger, StepClock, format_summary, gpu_memory_gb
from pirl_fast.train.optim import build_optimizer, set_lr
from pirl_fast.train.run_dirs import RunChoice
from pirl_fast.train.schedule import LRSchedule, lr_at, scaled_lr


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


@dataclass
class Run:
    """The run's objects and position, passed to the step and the loop instead of long argument lists."""

    cfg: Config
    rank: int
    world_size: int
    device: torch.device
    run_dir: Path
    loader: Any  # a pirl_fast.data.batch.PIRLLoader
    module: PIRLModel  # the bare model: state_dict, parameter groups
    model: nn.Module  # what the step calls: `module`, wrapped in DDP and/or torch.compile
    criterion: PIRLCriterion | JigsawLoss | nn.CrossEntropyLoss
    bank: MemoryBank
    objective: PIRLObjective | JigsawObjective | SupervisedObjective  # the method: inputs, loss terms, bank update
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    stop_at: int  # the loop ends once `step` reaches this (epochs * batches per epoch, or max_steps)
    global_batch: int
    autocast_dtype: torch.dtype | None  # bf16 on CUDA by default; None: plain fp32
    logger: MetricsLogger | None = None
    clock: StepClock | None = None
    step: int = 0  # optimiser steps done (the LR schedule's position)
    epoch: int = 0  # epochs done
    batches_in_epoch: int = 0  # batches of the current epoch already consumed
    batches: Any = None  # the current epoch's iterator
    stop: StopRequest = field(default_factory=StopRequest)  # signals received, acted on at the next step boundary
    corrupt_skipped: int = 0  # corrupt samples replaced so far, over all ranks (data.on_corrupt=skip)
    last_checkpoint: Path | None = None
    interval_losses: list = field(default_factory=list)
    diagnostics: IntervalMeans = field(default_factory=IntervalMeans)  # on-device sums, read at log intervals
    knn: knn_monitor.KNNMonitor | None = None  # trainer.knn_every's kNN top-1 of the val split; None: off


# ---------------------------------------------------------------------------------------------- the step
def train_step(run: Run, batch) -> list[float]:
    """One optimiser step on `batch`; returns the global mean [total, jigsaw, image] loss, the batch's
    corrupt-sample count summed over ranks, and one flag per stop signal (> 0: some rank got it)."""
    lr = lr_at(run.step, run.schedule)
    set_lr(run.optimizer, lr)
    with run.clock.phase("compute"):
        with torch.autocast(run.device.type, dtype=run.autocast_dtype or torch.float32,
                            enabled=run.autocast_dtype is not None):
            outputs = run.model(*run.objective.inputs(batch))  # pirl: f, g (B, D) unit rows; jigsaw: logits (B, P)
        terms = run.objective(outputs, batch)  # fp32: total, jigsaw, image, and the diagnostics in scores
        run.diagnostics.add(terms.scores)  # collapse diagnostics stay on the device until the next log interval
        # One small all-reduce: the loss for the log is the mean over ranks, and a NaN or a stop
        # request on any rank reaches all of them, so every rank stops at the same step. The host's
        # numbers are filled in on the device (no host-to-device copy, no wait for the forward).
        host = host_read.device_values([batch.corrupt, *run.stop.flags()], run.device)  # (1 + 3,)
        flags = torch.cat([torch.stack([terms.total.detach(), terms.jigsaw.detach(), terms.image.detach()]), host])
        flags = dist.all_reduce_mean(flags)  # (7,)
        run.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        # The finite check reads the device once, after backward was queued (so the GPU keeps busy
        # while we wait) and before the optimiser step (so a NaN never reaches the weights or bank):
        # the step's only host read (pirl_fast/runtime/host_read.py).
        values = host_read.read(flags)
        if not all(math.isfinite(v) for v in values[:3]):
            raise NonFiniteLossError(non_finite_message(
                run, f"the loss is not finite at step {run.step + 1} (epoch {run.epoch}, batch "
                f"{run.batches_in_epoch + 1}): total={values[0]}, jigsaw={values[1]}, image={values[2]}", lr))
        run.optimizer.step()
    values[3] = round(values[3] * run.world_size)  # mean over ranks -> the step's total count
    with run.clock.phase("bank"):
        run.objective.update(outputs, batch)  # pirl: the batch's bank rows become f
    return values


def non_finite_message(run: Run, problem: str, lr: float) -> str:
    """`problem`, then what was kept and what usually causes it."""
    last = (f"{run.last_checkpoint} (step {checkpoint.step_of(run.last_checkpoint)})" if run.last_checkpoint
            else "none was written in this process; see checkpoints/ in the run directory")
    return (f"{problem}; lr={lr:.4g}. Stopped without saving anything from this step. Last good checkpoint: "
            f"{last}. Usual causes: a learning rate too high for the batch (optim.lr={run.cfg.optim.lr} per "
            f"{run.cfg.optim.reference_batch} samples), bf16 overflow (try trainer.precision=fp32), or "
            f"loss.temperature={run.cfg.loss.temperature} too small.")


# ---------------------------------------------------------------------------------------------- the loop
def next_batch(run: Run):
    """The next batch, starting a new epoch (a new iterator) when the previous one is used up."""
    if run.batches is None:
        run.batches = iter(run.loader)
    return next(run.batches)


def fit(run: Run) -> str:
    """Train until stop_at; returns why it stopped: "max_steps", "epochs", or the signal's name."""
    ckpt_every = run.cfg.trainer.ckpt_every
    run.clock.restart()
    while run.step < run.stop_at:
        with run.clock.phase("data"):
            batch = next_batch(run)
        values = train_step(run, batch)
        stop = StopRequest.decide(values[4:])  # the same on every rank: the flags were all-reduced
        run.corrupt_skipped += values[3]
        run.step += 1
        run.batches_in_epoch += 1
        epoch_done = run.batches_in_epoch == len(run.loader)
        if epoch_done:
            run.epoch, run.batches_in_epoch, run.batches = run.epoch + 1, 0, None
        stopping = stop is not None or run.step >= run.stop_at
        if stopping or (ckpt_every and run.step % ckpt_every == 0) or (epoch_done and run.cfg.trainer.ckpt_epoch_end):
            with run.clock.phase("checkpoint"):
                save_checkpoint(run)
        run.clock.end_step(run.global_batch)
        knn = {}
        if run.knn is not None and stop is None and run.knn.due(epoch_done, run.epoch, run.step >= run.stop_at):
            knn = run.knn.score(run.module, run.bank.bank, run.device, run.autocast_dtype)
            run.clock.restart()  # the monitor's time is no step's
        run.interval_losses.append(values[:3])
        run.logger.advance()
        if run.step % run.cfg.trainer.log_every == 0 or stopping or knn:
            log_interval(run, knn)
        if stop is not None:
            return stop.name
    return "max_steps" if run.cfg.trainer.max_steps and run.step >= run.cfg.trainer.max_steps else "epochs"


def log_interval(run: Run, knn: dict[str, float] | None = None) -> None:
    losses = np.mean(np.array(run.interval_losses), axis=0)  # mean over the interval's steps
    run.interval_losses.clear()
    timing = run.clock.take_interval()
    diagnostics = run.diagnostics.take(run.objective.interval_diagnostics())
    run.logger.log({
        "step": run.step, "epoch": run.epoch + run.batches_in_epoch / len(run.loader),
        "loss": float(losses[0]), "loss_jigsaw": float(losses[1]), "loss_image": float(losses[2]),
        "lr": lr_at(run.step - 1, run.schedule), "samples_per_s": timing["samples_per_s"],
        "data_wait_share": timing["data_wait_share"], "step_time_s": timing["step_time_s"],
        "gpu_mem_gb": gpu_memory_gb(run.device), "corrupt_skipped": run.corrupt_skipped, **diagnostics,
        **(knn or {}),  # knn_top1, knn_time_s: at the steps the kNN monitor scored
    })


def save_checkpoint(run: Run) -> None:
    """Every rank takes part (its RNG states are gathered); rank 0 writes atomically.

    Weights that went non-finite in the last optimiser step (the loss before it was finite) are
    refused here, so the newest checkpoint on disk is always a good one."""
    finite = torch.stack([p.detach().isfinite().all() for p in run.module.parameters()]).all()
    if not host_read.read(finite):
        raise NonFiniteLossError(non_finite_message(run, f"the weights are not finite after step {run.step}",
                                                    lr_at(run.step - 1, run.schedule)))
    rngs = dist.gather_objects(checkpoint.rng_state(loader_generators(run.loader)))  # every rank's, in rank order
    full = None
    try:
        if run.rank == 0:
            write_checkpoint(run, rngs)
    except NoSpaceError as e:  # the save left nothing behind: the newest checkpoint on disk is the last good one
        kept = (f"{run_dirs.shown(run.last_checkpoint)} (step {checkpoint.step_of(run.last_checkpoint)})"
                if run.last_checkpoint else "none")  # rank 0's: the other ranks never hold a written path
        full = (f"{e}; stopped at step {run.step} without its checkpoint. Newest valid checkpoint kept: {kept}. "
                "Free space, then run the same command again to continue from it")
    full = dist.broadcast_object(full)  # every rank stops at this step together, with rank 0's words
    if full is not None:
        raise DiskFullError(full)


def write_checkpoint(run: Run, rngs: list) -> None:
    """Rank 0's part of save_checkpoint: the file, written atomically, then the old ones pruned."""
    run.last_checkpoint = checkpoint.save(run.run_dir, {  # run_dirs.TRAINING_KEYS names these keys
        "step": run.step, "epoch": run.epoch, "batches_in_epoch": run.batches_in_epoch,  # see Run
        "model": run.module.state_dict(), "optimizer": run.optimizer.state_dict(),  # momentum buffers
        "criterion": run.criterion.state_dict(),  # the frozen NCE normalisers Z
        "bank": run.bank.state_dict(),  # rows + the negative stream's position
        "rng": rngs,  # torch / CUDA / numpy / Python states and the loader's generators
        "config_yaml": to_yaml(run.cfg),  # text, not an object: weights_only loading stays possible
        "world_size": run.world_size, "num_samples": run.loader.num_samples,
    }, run.cfg.trainer.keep_checkpoints)


def resume(run: Run, path: Path) -> None:
    """Load checkpoint `path` into `run`: model, optimiser, Z, bank, position, RNGs.

    Loader position: the loader is set to the checkpoint's epoch (when it has `set_epoch`) and the
    batches already consumed in that epoch are drawn and dropped (with DALI this decodes them:
    at worst one epoch of loading, no compute), then every RNG is restored, since the skipping
    consumed random numbers. Exactness conditions: README.md, "Resume is exact".
    """
    state = run_dirs.load_training(path)
    if state["num_samples"] != run.loader.num_samples:
        raise ConfigError(f"checkpoint {path} was trained on {state['num_samples']} samples, but data.shards="
                          f"{run.cfg.data.shards} holds {run.loader.num_samples}: the memory bank has one row per "
                          "sample. Resume with the same shards, or start a new run (another hydra.run.dir)")
    changed = run_dirs.config_changes(state["config_yaml"], to_yaml(run.cfg))  # legitimate for e.g. trainer.epochs
    if changed and run.rank == 0:
        warnings.warn(f"resuming {path} with a different config: " + "; ".join(changed), RuntimeWarning,
                      stacklevel=2)
    try:
        run.module.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit model.arch={run.cfg.model.arch}, "
                              f"model.embed_dim={run.cfg.model.embed_dim}: resume with the checkpoint's model config "
                              f"(see config_yaml inside it). {e}") from e
    run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:  # the config, not the checkpoint, decides these
        group["momentum"] = run.cfg.optim.momentum
        group["weight_decay"] = run.cfg.optim.weight_decay if group.get("group") == "decay" else 0.0
    run.criterion.load_state_dict(state["criterion"])
    run.bank.load_state_dict(state["bank"])
    run.step, run.epoch, run.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
    can_set_epoch = hasattr(run.loader, "set_epoch")
    if can_set_epoch:
        run.loader.set_epoch(run.epoch)
    if run.step >= run.stop_at:  # a finished run: `finished` reports it; drawing its epoch's batches is waste
        run.last_checkpoint = Path(path)
        return
    data_stream_notice(run)
    if run.batches_in_epoch:
        run.batches = iter(run.loader)
        for _ in range(run.batches_in_epoch):  # read and drop: the checkpointed run had consumed these
            next(run.batches)
    if len(state["rng"]) == run.world_size:
        checkpoint.set_rng_state(state["rng"][run.rank], loader_generators(run.loader))
    elif run.rank == 0:
        warnings.warn(f"checkpoint {path} was written by {len(state['rng'])} ranks, this run has {run.world_size}: "
                      "RNG streams start fresh (training continues correctly, but not bit for bit)",
                      RuntimeWarning, stacklevel=2)
    run.last_checkpoint = Path(path)


def data_stream_notice(run: Run) -> None:
    """One line when the resumed epoch cannot replay its data stream exactly, and only when batches of it
    were consumed before the checkpoint (at an epoch boundary nothing is seen twice or missed)."""
    data = run.cfg.data
    exact = data.backend == "synthetic" or (data.backend == "torch" and (run.epoch == 0
                                                                         or hasattr(run.loader, "set_epoch")))
    if not exact and run.batches_in_epoch and run.rank == 0:
        warnings.warn(f"data.backend={data.backend} (data.workers={data.workers}) cannot restore its exact data "
                      f"stream: epoch {run.epoch} continues after the {run.batches_in_epoch} batches it had consumed, "
                      "but with a fresh sample order and fresh augmentations (everything else resumes exactly; "
                      "see README.md, \"Resume is exact\")", RuntimeWarning, stacklevel=3)


def loader_generators(loader) -> dict[str, torch.Generator]:
    """The loader's own random streams (synthetic data, patch order), saved and restored with the rest."""
    found = {"loader": getattr(loader, "generator", None),
             "patch_order": getattr(getattr(loader, "order", None), "generator", None)}
    return {name: g for name, g in found.items() if isinstance(g, torch.Generator)}


# ---------------------------------------------------------------------------------------------- set-up
def stop_step(cfg: Config, steps_per_epoch: int) -> int:
    """The step a run stops at: all its epochs, or trainer.max_steps when that comes first."""
    total = cfg.trainer.epochs * steps_per_epoch
    return min(total, cfg.trainer.max_steps or total)


def setup(cfg: Config, run_dir: Path, info: dist.DistInfo, resume_path: Path | None = None,
          bank_rows: int = 0) -> Run:
    """Build everything (data first: missing shards fail before a model is allocated) and resume from
    `resume_path` (None: a fresh start). bank_rows: see run_training."""
    device = dist.pick_device(cfg.trainer.device, info.local_rank, "trainer.device", ConfigError)
    seed_everything(cfg.trainer.seed, info.rank, cfg.trainer.deterministic, device)
    loader = build_loader(cfg.data, rank=info.rank, world_size=info.world_size, device=device)
    if cfg.num_samples and cfg.num_samples != loader.num_samples:
        raise ConfigError(f"num_samples={cfg.num_samples} but the shards in {cfg.data.shards} hold "
                          f"{loader.num_samples} samples: the memory bank needs one row per sample. Drop the "
                          f"num_samples override (the manifest's count is used) or point data.shards at the right "
                          "folder")
    lengths = dist.all_gather_cat(torch.tensor([len(loader)], device=device)).tolist()
    if len(set(lengths)) != 1:
        raise RuntimeError(f"ranks disagree on batches per epoch ({lengths}): every rank must run the same "
                           "number of steps; this is a loader bug")
    if 0 < bank_rows < loader.num_samples:
        raise ValueError(f"bank_rows={bank_rows} is below the {loader.num_samples} samples the loader indexes")
    rows = bank_rows or loader.num_samples
    # Same seed on every rank: identical initial weights. Jigsaw and supervised keep the (unused) bank so
    # that checkpoints and resume stay one format.
    module, criterion, objective, bank = build_method(cfg, loader, rows, device)
    torch.manual_seed(cfg.trainer.seed + 1_000_003 * (info.rank + 1))  # from here on, each rank its own stream
    steps_per_epoch = len(loader)
    total = cfg.trainer.epochs * steps_per_epoch
    peak = scaled_lr(cfg.optim.lr, cfg.data.batch_size, cfg.optim.reference_batch)
    schedule = LRSchedule(peak_lr=peak, final_lr=peak * cfg.optim.final_lr_ratio, total_steps=total,
                          warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch),
                          # optim.schedule=multistep (the reference's Jigsaw): x0.1 at each milestone epoch
                          milestones=tuple(round(m * steps_per_epoch) for m in cfg.optim.milestones)
                          if cfg.optim.schedule == "multistep" else (),
                          warmup_start_ratio=cfg.optim.warmup_start_ratio)
    optimizer = build_optimizer(module, cfg.optim, lr_at(0, schedule))
    precision = cfg.trainer.precision if cfg.trainer.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    run = Run(cfg=cfg, rank=info.rank, world_size=info.world_size, device=device, run_dir=run_dir, loader=loader,
              module=module, model=module, criterion=criterion, bank=bank, objective=objective, optimizer=optimizer,
              schedule=schedule, stop_at=stop_step(cfg, steps_per_epoch), global_batch=cfg.data.batch_size,
              autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
              stop=StopRequest(info.rank, info.world_size))
    if resume_path is not None:
        resume(run, resume_path)
    if dist.is_distributed():
        # broadcast_buffers: rank 0's BN running statistics are pushed to all ranks every forward
        run.model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                            gradient_as_bucket_view=True)
    if cfg.trainer.compile:
        run.model = torch.compile(run.model)
    return run


def build_method(cfg: Config, loader, rows: int, device: torch.device):
    """(model, criterion, objective, bank) of cfg.method, on `device`; the trunk is built first, from the
    seeded generator, so every method starts from the same trunk weights."""
    if cfg.method == "supervised":
        where = "data.backend=synthetic" if cfg.data.backend == "synthetic" else f"the shards in {cfg.data.shards}"
        classes = (SYNTHETIC_CLASSES if cfg.data.backend == "synthetic"
                   else len(load_manifest(resolve_shards(cfg.data.shards, "train").dir).classes))
        if classes != cfg.model.num_classes:
            raise ConfigError(f"method=supervised: model.num_classes={cfg.model.num_classes} but {where} "
                              f"{'draws labels of' if cfg.data.backend == 'synthetic' else 'have'} {classes} classes: "
                              f"set model.num_classes={classes}")
        module = SupervisedModel(cfg.model, cfg.model.num_classes)
    elif cfg.method == "jigsaw":
        module = JigsawModel(cfg.model, cfg.data.num_permutations)
    else:
        module = PIRLModel(cfg.model)
    module.to(device, memory_format=memory_format_for(device))  # channels-last on CUDA only (see model/network.py)
    bank = MemoryBank(rows, cfg.model.embed_dim, cfg.bank).to(device)
    if cfg.method == "pirl":
        criterion = PIRLCriterion(cfg.loss, rows).to(device)
        return module, criterion, PIRLObjective(criterion, bank), bank
    if cfg.method == "jigsaw":
        criterion = JigsawLoss().to(device)
        return module, criterion, JigsawObjective(criterion), bank
    criterion = nn.CrossEntropyLoss().to(device)  # no state: the checkpoint's "criterion" entry stays empty
    return module, criterion, SupervisedObjective(criterion), bank


def seed_everything(seed: int, rank: int, deterministic: bool, device: torch.device) -> None:
    torch.manual_seed(seed)  # the same on every rank: identical model initialisation
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic  # autotuned convolutions are not repeatable
        torch.backends.cudnn.deterministic = deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        else:
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (bank scores)
            torch.backends.cudnn.allow_tf32 = True


def choose_run_dir(cfg: Config, default_dir: bool) -> RunChoice:
    """The run directory and the checkpoint to resume from (pirl_fast/train/run_dirs.py), decided by rank 0 and
    broadcast: every rank writes nowhere else and loads the same file. A refusal reaches every rank."""
    identity = run_dirs.run_identity(cfg)  # on every rank: missing shards fail on each, with the fix
    choice: RunChoice | Exception | None = None
    if dist.info().rank == 0:
        try:
            choice = run_dirs.choose(cfg, Path(cfg.run_dir).resolve(), identity, default_dir)
        except (ConfigError, CheckpointError) as e:  # e.g. unreadable checkpoints: every rank stops with it
            choice = e
    choice = dist.broadcast_object(choice)
    if isinstance(choice, Exception):
        raise choice
    return choice


# ---------------------------------------------------------------------------------------------- entry points
def train(cfg: DictConfig | Config, default_dir: bool = False) -> dict[str, Any]:
    """Train as configured; returns the summary (also printed and written to run_dir/summary.json).

    default_dir: cfg.run_dir is the default runs/${name}, not one the user named; a different run then
    goes to runs/${name}-2, -3, ... instead of being refused (pirl_fast/train/run_dirs.py)."""
    return run_training(cfg, default_dir)[1]


def run_training(cfg: DictConfig | Config, default_dir: bool = False,
                 bank_rows: int = 0) -> tuple[Run, dict[str, Any]]:
    """`train`, also returning the Run: its trained model, bank and optimiser (for tests and notebooks).

    bank_rows > 0 is for benchmarks (`bench step --bank-rows`): a bank of that many rows instead of
    one per sample, so that a few generated images pay the memory traffic of ImageNet's bank; the
    negatives are drawn from all of it, the positives and updates touch the loader's rows only."""
    config = to_dataclass(cfg) if isinstance(cfg, DictConfig) else cfg
    dist.slurm_to_torchrun_env()
    stop_with_launcher()  # under torchrun: its death is a SIGTERM for this rank
    info = dist.init()
    validate(config, info.world_size)  # before any data or model is touched
    if not config.run_dir:
        raise ConfigError("run_dir is empty: main() fills it from hydra.run.dir; when calling train() directly, "
                          "set run_dir=DIR")
    backend, backend_notice = resolve_backend(config.data.backend)  # data.backend=dali without DALI stops here
    config = replace(config, data=replace(config.data, backend=backend))
    num_samples = preflight_memory(config, info, bank_rows)  # before a run folder is taken or anything is built
    choice = choose_run_dir(config, default_dir)  # rank 0's ${now:}, if any, wins
    if info.rank == 0:
        print(choice.start_line(), flush=True)
    preflight_disk(config, choice, info, num_samples)
    # What runs goes into config.yaml and the checkpoints; run.json keeps what was asked for (auto).
    run_dir = choice.run_dir
    run = setup(config, run_dir, info, choice.checkpoint, bank_rows)
    if run.step >= run.stop_at:
        return run, finished(run)
    if run.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(run_dir / "config.yaml", "w") as f:
            f.write(to_yaml(config))
    run.logger = MetricsLogger(run_dir, enabled=run.rank == 0, progress=config.trainer.progress,
                               total_steps=run.stop_at, initial_step=run.step)
    run.clock = StepClock(run.device, config.trainer.sync_timing, config.trainer.timing_warmup_steps)
    if backend_notice:
        run.logger.message(backend_notice)
    if run.rank == 0:
        stale = checkpoint.remove_stale_temps(run_dir)  # left by runs killed while saving
        if stale:
            run.logger.message(f"removed {len(stale)} temp file(s) of interrupted checkpoint saves "
                               f"({sum(size for _, size in stale) / 2**20:,.0f} MB) from {stale[0][0].parent}")
    shards = resolve_shards(config.data.shards) if config.data.backend != "synthetic" else None
    if shards is not None and shards.chosen:
        run.logger.message(f"data.shards={config.data.shards} is a dataset root with the splits "
                           f"{', '.join(shard_splits(shards.root))}: training on its train split, {shards.dir} "
                           f"({run.loader.num_samples} samples)")
    run.knn, line = knn_monitor.build(config, shards, run.loader.num_samples, run.rank, run.world_size, run.device)
    if line:
        run.logger.message(line)
    if run.last_checkpoint is not None:
        run.logger.message(f"resumed from {run.last_checkpoint}: step {run.step}, epoch {run.epoch}, "
                           f"batch {run.batches_in_epoch} of {len(run.loader)}")
    try:
        with run.stop.installed():
            stopped_by = fit(run)
    finally:
        run.batches = None  # the epoch's iterator: loader.close() can then shut its workers down
        run.logger.close()
        run.loader.close()
    summary = make_summary(run, stopped_by)
    if run.rank == 0:
        write_json(run_dir / "summary.json", summary, indent=2)
        print(format_summary(summary), flush=True)
    dist.barrier()  # rank 0's last checkpoint is on disk before any rank reports success
    return run, summary


def finished(run: Run) -> dict[str, Any]:
    """A run whose directory already holds all its steps: says so and returns the summary of the run that
    did them, leaving summary.json, metrics.jsonl, tb/ and config.yaml as they are."""
    run.batches = None  # the resumed epoch's iterator first (its workers), as at the end of `fit`
    run.loader.close()
    cfg = run.cfg
    more = ("raise trainer.max_steps to train on" if run.stop_at == cfg.trainer.max_steps else
            f"all trainer.epochs={cfg.trainer.epochs} are done; more epochs stretch the LR schedule, which "
            "makes another run (its own directory)")
    recorded = run.run_dir / "summary.json"
    summary = None
    if recorded.is_file():
        try:
            summary = json.loads(recorded.read_text())
        except (OSError, json.JSONDecodeError):
            summary = None
    if run.rank == 0:
        print(f"{run_dirs.shown(run.run_dir)} has run all {run.stop_at} steps this config asks for: nothing to do, "
              f"its summary.json and metrics are left as they are ({more})", flush=True)
    dist.barrier()
    if summary is None:  # finished, but killed before its summary was written: figures unknown, nothing written
        summary = {"stopped_by": "finished_before", "step": run.step, "epoch": run.epoch,
                   "checkpoint": str(run.last_checkpoint), "run_dir": str(run.run_dir)}
    return summary


def make_summary(run: Run, stopped_by: str) -> dict[str, Any]:
    timing = run.clock.summary()
    return {
        "stopped_by": stopped_by, "step": run.step, "epoch": run.epoch, "batches_in_epoch": run.batches_in_epoch,
        "checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None, "run_dir": str(run.run_dir),
        "world_size": run.world_size, "global_batch": run.global_batch, "device": str(run.device),
        "backend": run.cfg.data.backend, "arch": run.cfg.model.arch,
        "precision": "bf16" if run.autocast_dtype is not None else "fp32", "corrupt_skipped": run.corrupt_skipped,
        "knn_top1": run.knn.last_top1 if run.knn is not None else None,  # the last kNN monitor score
        **timing,
    }


class DiskFullError(RuntimeError):
    """A checkpoint did not fit on the disk; the run stopped with the newest valid checkpoint kept."""


def preflight_memory(cfg: Config, info: dist.DistInfo, bank_rows: int = 0) -> int:
    """Refuse a run whose peak memory estimate exceeds the free memory (pirl_fast/train/preflight.py),
    on every rank, before anything is built; returns the number of samples (the bank's rows)."""
    num_samples = run_dirs.data_identity(cfg)["num_samples"]  # reads the manifest: missing shards fail here
    device = dist.pick_device(cfg.trainer.device, info.local_rank, "trainer.device", ConfigError)
    problem = None
    try:
        preflight.check_memory(cfg, device, max(num_samples, bank_rows), info.world_size)
    except ConfigError as e:
        problem = str(e)
    problems = [p for p in dist.gather_objects(problem) if p]
    if problems:
        raise ConfigError(problems[0])
    return num_samples


def preflight_disk(cfg: Config, choice: RunChoice, info: dist.DistInfo, num_samples: int) -> None:
    """Refuse (on every rank) a run whose checkpoints will not fit in its run folder, before step 1."""
    problem = None
    per_epoch = max(1, num_samples // cfg.data.batch_size)  # the loader's length, before it is built
    steps = stop_step(cfg, per_epoch)
    start = checkpoint.step_of(choice.checkpoint) or 0
    if info.rank == 0 and start < steps:  # a finished run writes nothing: `finished` says so, whatever the disk
        try:
            preflight.check_disk(cfg, choice.run_dir, num_samples, steps, per_epoch)
        except ConfigError as e:
            problem = str(e)
    problem = dist.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)


# Errors whose message says what was wrong and the fix: one line on stderr, exit status 2, no traceback.
USER_ERRORS = (ConfigError, ShardError, CheckpointError, BackendUnavailable, DiskFullError)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    # runs/${name} as Hydra's default (not hydra.run.dir=..., not a multirun job): a different run goes to
    # runs/${name}-2 instead of being refused.
    default_dir = not cfg.run_dir and hydra_cfg.mode == RunMode.RUN and not any(
        o.lstrip("+~").split("=", 1)[0] == "hydra.run.dir" for o in hydra_cfg.overrides.hydra)
    if not cfg.run_dir:
        cfg.run_dir = hydra_cfg.runtime.output_dir
    try:
        summary = train(cfg, default_dir)
    except USER_ERRORS as e:
        if dist.info().local_rank == 0:  # once per node, not once per rank
            rank = f" (rank {dist.info().rank})" if dist.info().world_size > 1 else ""
            print(f"error{rank}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    dist.shutdown()
    stopped_by = {s.name: s for s in STOP_SIGNALS}.get(summary["stopped_by"])
    if stopped_by is not None:
        sys.exit(exit_status(stopped_by))  # 143, 130 or 138: the shell's "stopped by signal" status
