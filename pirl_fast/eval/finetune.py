"""Semi-supervised fine-tuning: the whole pre-trained network trained on 1% or 10% of the labels.

As the reference runs it for PIRL (facebookresearch/vissl configs/config/benchmark/semi_supervised/
imagenet1k/eval_resnet_8gpu_transfer_in1k_semi_sup_fulltune.yaml with dataset/pirl_in1k_per01.yaml
or pirl_in1k_per10.yaml):

    network    the pre-trained trunk, every layer trained (BatchNorm in train mode), plus one
               Linear 2048 -> classes on res5 after global pooling (HEAD.PARAMS ["mlp", {"dims":
               [2048, 1000]}], PyTorch's default initialisation)
    optimiser  SGD, Nesterov momentum 0.9, weight decay 0 (the yaml's weight_decay: 0.000)
    lr         0.01 per 256 images, scaled linearly with the batch (auto_lr_scaling; the PIRL
               dataset files set base_value 0.01 and values [0.01, 0.001]), x0.1 at epoch 30
               (milestones [30], update_interval epoch), 70 epochs in all
    data       batch 256 (8 GPUs x 32), last partial batch dropped; train RandomResizedCrop 224 +
               flip, test resize 256 + centre crop 224
    loss       cross-entropy; reported: top-1 / top-5 on the validation shards

The SimCLR subsets (dataset/simclr_in1k_per01.yaml) keep the base yaml's 0.05; pass --lr 0.05 there.
`--freeze-trunk` trains only the Linear on the frozen trunk with the same schedule: the frozen-probe
baseline that fine-tuning should beat. One process on one device (CUDA: bf16 autocast,
channels-last); no multi-GPU data parallelism yet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pirl_fast.eval.linear_probe import REFERENCE_BATCH, param_groups, sgd_step
from pirl_fast.runtime.progress import progress


@dataclass
class FinetuneConfig:
    epochs: int = 70  # OPTIMIZER.num_epochs
    lr: float = 0.01  # per 256 images (pirl_in1k_per01/per10.yaml)
    milestones: tuple[int, ...] = (30,)  # epochs at which the lr drops x0.1
    batch_size: int = 256  # BATCHSIZE_PER_REPLICA 32 x 8 GPUs
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    freeze_trunk: bool = False
    seed: int = 0

    @property
    def effective_lr(self) -> float:
        return self.lr * self.batch_size / REFERENCE_BATCH

    def as_dict(self) -> dict:
        return {**asdict(self), "milestones": list(self.milestones), "effective_lr": self.effective_lr}


class Classifier(nn.Module):
    """trunk (res5 global pool, (N, D)) -> Linear(D, classes); forward(images) -> float32 logits."""

    def __init__(self, trunk: nn.Module, trunk_dim: int, num_classes: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x)).float()


def lr_at(epoch: int, cfg: FinetuneConfig) -> float:
    """The multistep schedule, updated per epoch as the reference's update_interval: epoch."""
    return cfg.effective_lr * 0.1 ** sum(epoch >= m for m in cfg.milestones)


def prepare(model: Classifier, cfg: FinetuneConfig, device: torch.device) -> torch.optim.Optimizer:
    """Trainable parameters (all, or the head alone) and the optimiser."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    for p in model.trunk.parameters():
        p.requires_grad_(not cfg.freeze_trunk)
    trainable = model.head if cfg.freeze_trunk else model
    return torch.optim.SGD(param_groups(trainable, cfg.weight_decay), lr=lr_at(0, cfg), momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def train(model: Classifier, loader, cfg: FinetuneConfig, device: torch.device) -> list[float]:
    """cfg.epochs epochs over `loader` ((images, labels) batches on `device`); mean loss per epoch."""
    optimizer = prepare(model, cfg, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = []
    bar = progress(total=cfg.epochs * len(loader), desc="finetune", unit="step")
    for epoch in range(cfg.epochs):
        model.train()
        if cfg.freeze_trunk:
            model.trunk.eval()  # frozen: BatchNorm statistics stay the pre-trained ones
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        total, count = 0.0, 0
        for images, labels in loader:
            with autocast:
                loss = F.cross_entropy(model(images), labels)
            total, count = total + sgd_step(optimizer, loss, f"fine-tuning, epoch {epoch}", cfg.lr), count + 1
            bar.update(1)
        if count == 0:
            raise ValueError(f"the training subset yields no full batch of {cfg.batch_size}: lower --batch-size")
        history.append(total / count)
        bar.set_postfix(loss=f"{history[-1]:.3f}", lr=f"{lr_at(epoch, cfg):.2g}")
    bar.close()
    return history


@torch.no_grad()
def evaluate(model: Classifier, loader, device: torch.device) -> dict[str, float]:
    """{"top1", "top5"} over every batch of `loader` (top-5 capped at the number of classes)."""
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    hit1 = hit5 = n = 0
    for images, labels in progress(loader, desc="finetune: val", unit="batch", leave=False):
        with autocast:
            ranked = model(images).argsort(dim=1, descending=True)
        hit1 += (ranked[:, 0] == labels).sum().item()
        hit5 += (ranked[:, :5] == labels[:, None]).any(dim=1).sum().item()
        n += labels.shape[0]
    if n == 0:
        raise ValueError("no validation samples")
    return {"top1": hit1 / n, "top5": hit5 / n}
