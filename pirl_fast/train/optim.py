"""The optimiser: SGD with momentum, weight decay on conv/linear weights only.

The paper (and Goyal et al. 2017) apply weight decay 1e-4 to convolution and linear weights
but not to batch-norm scales/shifts or to biases: decaying BN's gamma towards 0 shrinks the
residual branches and costs accuracy, and biases have nothing to regularise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# Modules whose parameters never get weight decay (all of their parameters: scale and shift).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)

OPTIMIZERS = ("sgd",)
SCHEDULES = ("cosine", "multistep")


@dataclass
class OptimConfig:
    name: str = "sgd"  # only SGD for now (the paper's); LARS would go here for batch >> 4096
    lr: float = 0.12  # LR per `reference_batch` samples: peak = lr * data.batch_size / reference_batch
    reference_batch: int = 1024  # the paper's global batch (32 GPUs x 32)
    final_lr_ratio: float = 0.001  # cosine ends at lr * ratio (paper: 0.12 -> 0.00012)
    warmup_epochs: float = 0.0  # linear warm-up before the cosine (paper: none); try 5 for a batch well past 1024
    momentum: float = 0.9  # the paper's
    nesterov: bool = False
    schedule: str = "cosine"  # cosine | multistep (x0.1 at each of `milestones`, in epochs; see schedule.py)
    milestones: list[float] = field(default_factory=list)  # epochs, for schedule=multistep
    warmup_start_ratio: float = 0.0  # the warm-up starts at this x peak (0: at peak / warmup steps)
    weight_decay: float = 1e-4  # on conv / linear weights only (see param_groups)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: conv/linear weights with `weight_decay`; norm-layer parameters and biases with 0.

    Every trainable parameter lands in exactly one group, shared parameters once.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, NORM_TYPES) or name == "bias":
                no_decay.append(param)
            else:
                decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The optimiser over `model`'s parameters; `lr` is the starting LR (the loop sets it every step)."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, cfg.weight_decay)
    # foreach: one fused multi-tensor kernel per group instead of ~160 small ones (ResNet-50).
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
