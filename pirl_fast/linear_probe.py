"""Linear classifiers on the frozen trunk's five stages at once: the paper's "which layer" analysis.

One forward of the frozen trunk yields every stage's output; each is global-average-pooled and
fed to its own linear classifier, and the five are trained together (one optimiser, the sum of
their cross-entropies; they share no parameters, so the sum trains each exactly as alone):

    stage   torchvision module                       width (resnet50 / resnet18)
    conv1   relu(bn1(conv1(x)))  (before maxpool)    64 / 64
    res2    layer1                                   256 / 64
    res3    layer2                                   512 / 128
    res4    layer3                                   1024 / 256
    res5    layer4  (= the features kNN uses)        2048 / 512

Each head is BatchNorm1d(affine=False) -> Linear. The BatchNorm only standardises each feature
with running statistics (as MAE's linear probe does); at test time it is a fixed affine map that
folds into the Linear, so the classifier stays linear, and it lets one learning rate serve five
stages whose feature scales differ by orders of magnitude.

Defaults (ProbeConfig) follow the linear benchmark PIRL reports against (Goyal et al., "Scaling and
Benchmarking Self-Supervised Visual Representation Learning", ICCV 2019): SGD momentum 0.9,
batch 256, lr 0.01 decayed x0.1 at 8/28, 16/28 and 24/28 of training, weight decay 5e-4,
28 epochs; training images get a random resized crop + flip, evaluation the centre crop.
Those are ImageNet-scale values; on a few hundred images pass more epochs and a larger lr
(the tests use 30 epochs at lr 0.1 on cached features).

Without augmentation (`--no-augment`) every epoch would see the same features, so the trunk runs
once and the heads train on the stored pooled features: epochs then cost almost nothing (the
quick protocol for small data; the tests use it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pirl_fast.model import weight_layout

STAGES = ("conv1", "res2", "res3", "res4", "res5")
LR_MILESTONES = (8 / 28, 16 / 28, 24 / 28)  # Goyal et al.'s 28-epoch step schedule, as fractions


@dataclass
class ProbeConfig:
    epochs: int = 28
    lr: float = 0.01
    batch_size: int = 256
    weight_decay: float = 5e-4
    momentum: float = 0.9
    augment: bool = True  # random resized crop + flip on the training images (False: centre crop)
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def stage_features(trunk: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Global-average-pooled output of each stage of a torchvision ResNet: {stage: (N, C_stage)}."""
    x = x.contiguous(memory_format=weight_layout(trunk))  # the weights' layout: NCHW on CPU, NHWC on CUDA
    x = trunk.relu(trunk.bn1(trunk.conv1(x)))  # (N, 64, H/2, W/2)
    out = {"conv1": x.mean(dim=(2, 3))}
    x = trunk.maxpool(x)
    for stage, layer in zip(STAGES[1:], (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)):
        x = layer(x)
        out[stage] = x.mean(dim=(2, 3))  # (N, C_stage)
    return {k: v.float() for k, v in out.items()}


def stage_widths(trunk: nn.Module) -> dict[str, int]:
    """Channel width of each stage (read from the modules, so any torchvision ResNet works)."""
    widths = {"conv1": trunk.conv1.out_channels}
    for stage, layer in zip(STAGES[1:], (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)):
        last = layer[-1]
        widths[stage] = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
    return widths


class StageProbes(nn.Module):
    """One BatchNorm1d(affine=False) + Linear head per stage; forward({stage: feats}) -> {stage: logits}."""

    def __init__(self, widths: dict[str, int], num_classes: int):
        super().__init__()
        self.heads = nn.ModuleDict({
            s: nn.Sequential(nn.BatchNorm1d(widths[s], affine=False), nn.Linear(widths[s], num_classes))
            for s in STAGES
        })
        for head in self.heads.values():
            nn.init.normal_(head[1].weight, std=0.01)  # the usual linear-probe init
            nn.init.zeros_(head[1].bias)

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        return {s: self.heads[s](feats[s]) for s in STAGES}


def lr_at(epoch_fraction: float, cfg: ProbeConfig) -> float:
    """Step schedule: cfg.lr, x0.1 after each of LR_MILESTONES (fractions of training done)."""
    return cfg.lr * 0.1 ** sum(epoch_fraction >= m for m in LR_MILESTONES)


def train_probes(probes: StageProbes, epoch_batches, cfg: ProbeConfig, steps_per_epoch: int, device) -> list[float]:
    """Train all heads together. `epoch_batches(epoch)` yields ({stage: feats}, labels) for one epoch.
    Returns the mean summed loss per epoch."""
    probes.train().to(device)
    opt = torch.optim.SGD(probes.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    history = []
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="linear probes", unit="step", dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        for step, (feats, labels) in enumerate(epoch_batches(epoch)):
            for group in opt.param_groups:
                group["lr"] = lr_at((epoch + step / max(1, steps_per_epoch)) / cfg.epochs, cfg)
            logits = probes({s: f.to(device) for s, f in feats.items()})
            labels = labels.to(device)
            loss = sum(F.cross_entropy(logits[s], labels) for s in STAGES)  # heads are independent
            if not torch.isfinite(loss):
                raise FloatingPointError(f"linear probe loss is {loss.item()} at epoch {epoch}: lower --lr "
                                         f"(now {cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item(), count + 1
            bar.update(1)
        history.append(total / max(1, count))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    bar.close()
    return history


@torch.no_grad()
def evaluate_probes(probes: StageProbes, batches, device) -> dict[str, dict[str, float]]:
    """{stage: {"top1", "top5"}} over the batches ({stage: feats}, labels) (top-5 capped at C)."""
    probes.eval().to(device)
    correct1 = {s: 0 for s in STAGES}
    correct5 = {s: 0 for s in STAGES}
    n = 0
    for feats, labels in batches:
        logits = probes({s: f.to(device) for s, f in feats.items()})
        labels = labels.to(device)
        for s in STAGES:
            ranked = logits[s].argsort(dim=1, descending=True)
            correct1[s] += (ranked[:, 0] == labels).sum().item()
            correct5[s] += (ranked[:, :5] == labels[:, None]).any(dim=1).sum().item()
        n += labels.shape[0]
    if n == 0:
        raise ValueError("evaluate_probes: no validation samples")
    return {s: {"top1": correct1[s] / n, "top5": correct5[s] / n} for s in STAGES}


def cached_batches(feats: dict[str, Tensor], labels: Tensor, batch_size: int, shuffle: bool, seed: int):
    """Mini-batches over stored stage features (shuffled with a per-epoch seed when asked)."""
    n = labels.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if shuffle and idx.numel() < 2:
            continue  # BatchNorm cannot train on a batch of one
        yield {s: f[idx] for s, f in feats.items()}, labels[idx]


def probe_cached(train_feats: dict[str, Tensor], train_labels: Tensor, val_feats: dict[str, Tensor],
                 val_labels: Tensor, num_classes: int, cfg: ProbeConfig, device) -> tuple[dict, list[float]]:
    """Train the five heads on stored stage features (the `--no-augment` protocol) and evaluate them
    on the stored validation features: ({stage: {"top1", "top5"}}, mean loss per epoch)."""
    torch.manual_seed(cfg.seed)  # the heads' initialisation
    probes = StageProbes({s: f.shape[1] for s, f in train_feats.items()}, num_classes)
    batches = lambda epoch: cached_batches(train_feats, train_labels, cfg.batch_size, True, cfg.seed + epoch)  # noqa: E731
    history = train_probes(probes, batches, cfg, -(-train_labels.shape[0] // cfg.batch_size), device)
    return evaluate_probes(probes, cached_batches(val_feats, val_labels, 1024, False, 0), device), history


def image_batches(trunk: nn.Module, loader, device):
    """Mini-batches of stage features computed on the fly: one trunk forward feeds all five heads."""
    for images, labels, _ in loader:
        yield stage_features(trunk, images.to(device, non_blocking=True)), labels


@torch.no_grad()
def cache_stage_features(trunk: nn.Module, loader, device, desc: str) -> tuple[dict[str, Tensor], Tensor]:
    feats: dict[str, list[Tensor]] = {s: [] for s in STAGES}
    labels = []
    for images, y, _ in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True):
        out = stage_features(trunk, images.to(device, non_blocking=True))
        for s in STAGES:
            feats[s].append(out[s].cpu())
        labels.append(y)
    return {s: torch.cat(v) for s, v in feats.items()}, torch.cat(labels).long()
