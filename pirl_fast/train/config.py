"""The run's configuration: dataclass schemas, registered in Hydra's ConfigStore.

`pirl_fast/train/conf/config.yaml` starts its defaults list with `pirl_schema` (the `Config` below), so
a misspelt key (`optim.lrr=0.1`) or a wrong type (`optim.lr=fast`) fails at composition. The component
schemas live beside their code; this file composes them and adds `TrainerConfig` and the top-level
keys. Where each default lives and how to add an option: README.md, "Configuration".

    python -m pirl_fast.train experiment=smoke data.shards=demo/shards trainer.max_steps=20
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pirl_fast.data.config import DataConfig, check_config
from pirl_fast.model.loss import LossConfig
from pirl_fast.model.memory_bank import BankConfig
from pirl_fast.model.network import ModelConfig
from pirl_fast.train.optim import SCHEDULES, OptimConfig

METHODS = ("pirl", "jigsaw", "supervised")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cuda", "cpu")


class ConfigError(ValueError):
    """The configuration cannot work; the message names the key and the fix."""


@dataclass
class TrainerConfig:
    epochs: int = 800  # the cosine LR spans epochs * batches-per-epoch steps
    max_steps: int = 0  # stop after this many optimiser steps in all (counting resumed ones); 0 = epochs
    device: str = "auto"  # auto (cuda:LOCAL_RANK when CUDA is there, else cpu) | cuda | cpu
    precision: str = "auto"  # auto (bf16 autocast + channels-last on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the DDP model: a few minutes of compile, then faster steps (long runs)
    seed: int = 0  # torch / numpy / python RNGs (model init is the same on every rank)
    # torch.use_deterministic_algorithms: repeatable bit for bit on one device type, slower (README: resume)
    deterministic: bool = False
    log_every: int = 50  # steps between metrics.jsonl lines / TensorBoard points; a line costs nothing measurable
    # steps between checkpoints (0: only at epoch ends, the end and signals); ResNet-50 + the ImageNet
    # bank is ~0.9 GB per checkpoint
    ckpt_every: int = 1000
    ckpt_epoch_end: bool = True  # also checkpoint at the end of every epoch
    keep_checkpoints: int = 3  # newest checkpoints kept; older ones are deleted after each save
    progress: bool = True  # tqdm bar on rank 0
    # false: compute/bank timed by CUDA events, read late (no host sync); true: torch.cuda.synchronize
    # after each phase (an exact host-side split; three device-wide syncs per step, which also wait on
    # DALI's prefetch). pirl_fast/train/metrics.py explains both.
    sync_timing: bool = False
    timing_warmup_steps: int = 2  # first steps left out of samples/s (cuDNN autotune, compile, prefetch)
    # epochs between kNN top-1 scores of the val split beside data.shards against the memory bank, and at
    # the end (pirl_fast/train/knn_monitor.py); 0: off. Each costs one eval-mode forward of the val split:
    # 7-10% of an epoch at experiment=fmnist on a CPU (BENCHMARKS.md, "kNN monitor"). ImageNet: 50k val images
    # against 1.28M training images, each a forward + backward of the image and 9 patches per epoch: about
    # 1% of an epoch by that count (not measured on a GPU); every 5 epochs gives 160 points over 800 epochs
    # for ~0.2%. Small experiments (smoke) set 1.
    knn_every: int = 5
    # true: start even where the memory estimate (pirl_fast/train/preflight.py) says the run does not fit
    force: bool = False


@dataclass
class Config:
    # "pirl" | "jigsaw" (the baseline, pirl_fast/model/jigsaw.py; experiment=jigsaw_in1k_r50) | "supervised"
    # (the labelled upper bound, pirl_fast/model/supervised.py: needs model.num_classes)
    method: str = "pirl"
    name: str = "${method}_${model.arch}"  # names the default run directory runs/${name}
    run_dir: str = ""  # filled in by main() from hydra.run.dir; set it only when calling train() yourself
    # "auto": continue the run directory's run from its newest valid checkpoint, when it is the same run
    # (pirl_fast/train/run_dirs.py); "none": start from scratch; a path: continue from that checkpoint file
    resume: str = "auto"
    num_samples: int = 0  # 0: the shard manifest's count; > 0: asserted equal to it (the bank has one row each)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register() -> None:
    """Put the schema into Hydra's ConfigStore (idempotent; done on import of this module)."""
    ConfigStore.instance().store(name="pirl_schema", node=Config)


register()


def to_dataclass(cfg: DictConfig) -> Config:
    """The composed DictConfig as a `Config` of plain dataclasses, interpolations resolved.

    Mandatory values still missing (`???`, e.g. data.shards with the synthetic backend, which
    needs none) stay the string "???"; `validate` decides whether that matters.
    """
    try:
        tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception as e:  # an interpolation that does not resolve
        raise ConfigError(f"the configuration does not resolve: {e}") from e
    tree.pop("hydra", None)  # present when composed with return_hydra_config=True
    groups = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "bank": BankConfig,
              "optim": OptimConfig, "trainer": TrainerConfig}
    try:
        return Config(**{k: (groups[k](**v) if k in groups else v) for k, v in tree.items()})
    except TypeError as e:  # composed without the schema, so unknown keys got this far
        raise ConfigError(f"the configuration does not match the pirl_schema dataclasses ({e}): compose "
                          "pirl_fast/train/conf/config.yaml, whose defaults list starts with pirl_schema") from e


def validate(cfg: Config, world_size: int) -> None:
    """Everything that can be checked before a single tensor is built; raises ConfigError."""
    bad = non_finite(cfg)
    if bad:
        raise ConfigError(f"{', '.join(bad)}: every number in the configuration must be finite (nan and inf are "
                          "refused at start-up, before they could turn into a NaN loss steps later)")
    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} is not known; choose one of {', '.join(METHODS)}")
    if cfg.method == "jigsaw" and cfg.data.num_permutations < 2:
        raise ConfigError(f"method=jigsaw classifies the permutation among a fixed set: set data.num_permutations to "
                          f"P >= 2 (the paper's Jigsaw uses 1000; got {cfg.data.num_permutations}, where 0 means "
                          "'any of 9!', which has no class ids)")
    if cfg.trainer.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if cfg.trainer.device not in DEVICES:
        raise ConfigError(f"trainer.device={cfg.trainer.device!r}; choose one of {', '.join(DEVICES)}")
    if cfg.data.backend != "synthetic" and cfg.data.shards in ("", "???"):
        raise ConfigError(f"data.shards is not set (data.backend={cfg.data.backend}): pass data.shards=DIR, a folder "
                          "written by `python -m pirl_fast.shard SRC DIR`, or data.backend=synthetic to time compute "
                          "only")
    batch = cfg.data.batch_size
    if batch < 1:
        raise ConfigError(f"data.batch_size={batch} is below 1: it is the GLOBAL batch (samples per step over all "
                          f"{world_size} rank(s)); use e.g. data.batch_size={32 * world_size}")
    if batch % world_size != 0:
        lower = max(world_size, batch // world_size * world_size)
        raise ConfigError(
            f"data.batch_size={batch} is the GLOBAL batch and must divide evenly over the {world_size} ranks; "
            f"use a multiple of {world_size}, e.g. data.batch_size={lower} or data.batch_size={lower + world_size}")
    try:
        check_config(cfg.data, world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.model.num_patches != cfg.data.grid ** 2:
        raise ConfigError(f"model.num_patches={cfg.model.num_patches} but data.grid={cfg.data.grid} cuts "
                          f"{cfg.data.grid ** 2} patches per image: set model.num_patches={cfg.data.grid ** 2}")
    if cfg.trainer.epochs < 1:
        raise ConfigError(f"trainer.epochs={cfg.trainer.epochs} must be >= 1")
    if cfg.trainer.max_steps < 0:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps} must be >= 0 (0 means: run all epochs)")
    if cfg.trainer.log_every < 1:
        raise ConfigError(f"trainer.log_every={cfg.trainer.log_every} must be >= 1")
    if cfg.trainer.knn_every < 0:
        raise ConfigError(f"trainer.knn_every={cfg.trainer.knn_every} must be >= 0 (0: no kNN monitor)")
    if cfg.trainer.ckpt_every < 0 or cfg.trainer.keep_checkpoints < 1:
        raise ConfigError(f"trainer.ckpt_every ({cfg.trainer.ckpt_every}) must be >= 0 and trainer.keep_checkpoints "
                          f"({cfg.trainer.keep_checkpoints}) >= 1")
    if cfg.optim.lr <= 0 or not 0 <= cfg.optim.final_lr_ratio <= 1 or cfg.optim.warmup_epochs < 0:
        raise ConfigError(f"need optim.lr > 0 (got {cfg.optim.lr}), 0 <= optim.final_lr_ratio <= 1 (got "
                          f"{cfg.optim.final_lr_ratio}) and optim.warmup_epochs >= 0 (got {cfg.optim.warmup_epochs})")
    if cfg.optim.schedule not in SCHEDULES or (cfg.optim.schedule == "multistep"
                                                              and not cfg.optim.milestones):
        raise ConfigError(f"optim.schedule={cfg.optim.schedule!r}: use cosine, or multistep with optim.milestones "
                          f"(epochs, e.g. [30, 60, 90, 100]; got {list(cfg.optim.milestones)})")
    if cfg.resume not in ("auto", "none") and not cfg.resume.endswith(".pt"):
        raise ConfigError(f"resume={cfg.resume!r}: use auto, none, or the path of a checkpoint file (*.pt)")


def non_finite(node: Any, prefix: str = "") -> list[str]:
    """`key=value` for every float in the dataclass tree `node` (lists included) that is nan or inf."""
    found = []
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found += non_finite(value, f"{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            found.append(f"{key}={value}")
        elif isinstance(value, (list, tuple)):
            found += [f"{key}[{i}]={v}" for i, v in enumerate(value) if isinstance(v, float) and not math.isfinite(v)]
    return found


def to_yaml(cfg: Config | DictConfig) -> str:
    """The resolved config as YAML text (saved as run_dir/config.yaml and inside every checkpoint)."""
    node = OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg
    return OmegaConf.to_yaml(node, resolve=True)
