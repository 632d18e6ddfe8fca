"""Linear classifiers on the frozen trunk's stages, all trained together: the paper's "which layer"
analysis. Two protocols (`eval linear --protocol goyal|gap`):

goyal (default): the benchmark of Goyal et al., "Scaling and Benchmarking Self-Supervised Visual
Representation Learning" (ICCV 2019), as the reference runs it for every ResNet-50 in its model
zoo: facebookresearch/vissl configs/config/benchmark/linear_image_classification/imagenet1k/
eval_resnet_8gpu_transfer_in1k_linear.yaml. Each stage is average-pooled to about 9,000 numbers
(its LINEAR_EVAL_FEAT_POOL_OPS_MAP), then BatchNorm2d over the channels and one Linear (its
`eval_mlp` head, vissl/models/heads/linear_eval_mlp.py):

    head      stage map at 224 px    AvgPool2d(kernel, stride, pad)   pooled        Linear in (R50)
    conv1     64 x 112 x 112         (10, 10, 4)                      64 x 12 x 12  9216
    res2      256 x 56 x 56          (16, 8, 0)                       256 x 6 x 6   9216
    res3      512 x 28 x 28          (13, 5, 0)                       512 x 4 x 4   8192
    res4      1024 x 14 x 14         (8, 3, 0)                        1024 x 3 x 3  9216
    res5      2048 x 7 x 7           (6, 1, 0)                        2048 x 2 x 2  8192
    res5avg   2048 x 1 x 1           (global average pool)            2048          2048
    res5avg_fc  the same res5avg features, Linear only (the yaml's 7th head, a plain `mlp`)

conv1 is relu(bn1(conv1(x))) before the max-pool (the reference trunk's "conv1_relu",
vissl/models/trunks/resnext.py). Schedule (the yaml's OPTIMIZER): SGD with Nesterov momentum 0.9,
weight decay 5e-4 on weights and biases but not on BatchNorm (regularize_bn False,
regularize_bias True), lr 0.01 per 256 images scaled linearly with the batch (auto_lr_scaling),
x0.1 at epochs 8, 16, 24 of 28; train images RandomResizedCrop 224 + flip, test images resize
256 + centre crop 224; the trunk is frozen in eval mode (FREEZE_TRUNK_ONLY, EVAL_MODE_ON).

Other image sizes (CPU tests at 32-64 px, a model pre-trained at 96 px): a stage map whose size
is not the 224-px one is pooled with adaptive average pooling to the *same output grid*
(12, 6, 4, 3, 2). We chose this over scaling kernel/stride/padding because the heads then keep
the reference's widths at any resolution (the "about 9,000 dimensions" design, and checkpoints of
the heads stay comparable), and adaptive windows, like the reference's, overlap and cover the
whole map; a map smaller than its grid (res5 is 1 x 1 at 32 px) is replicated, which adds no
information but breaks nothing. At 224 px the reference's AvgPool2d is used exactly.

gap: the earlier global-pool probes, one per stage: global average pool ->
BatchNorm1d(affine=False) -> Linear (the BatchNorm only standardises each feature; it folds into
the Linear at test time, as MAE's probe does). Widths 64, 256, 512, 1024, 2048 (R50). Quick, and
the right probe for very small images; not comparable with published per-layer numbers.

Without augmentation (`--no-augment`) every epoch would see the same features, so the trunk runs
once and the heads train on stored pooled features (small data only: the Goyal features are about
190 KB per image).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pirl_fast.model.network import weight_layout
from pirl_fast.runtime.progress import progress

STAGES = ("conv1", "res2", "res3", "res4", "res5")
PROTOCOLS = ("goyal", "gap")
LR_MILESTONES = (8 / 28, 16 / 28, 24 / 28)  # the yaml's milestones [8, 16, 24] of num_epochs 28, as fractions
REFERENCE_BATCH = 256  # auto_lr_scaling.base_lr_batch_size: lr is given for 256 images per step

# eval_resnet_8gpu_transfer_in1k_linear.yaml, LINEAR_EVAL_FEAT_POOL_OPS_MAP: AvgPool2d(kernel, stride, padding).
GOYAL_POOL = {"conv1": (10, 10, 4), "res2": (16, 8, 0), "res3": (13, 5, 0), "res4": (8, 3, 0), "res5": (6, 1, 0)}
MAP_SIZE_224 = {"conv1": 112, "res2": 56, "res3": 28, "res4": 14, "res5": 7}  # ResNet stage maps at 224 px
# (size + 2 pad - kernel) // stride + 1 at 224 px: the output grid every image size is pooled to.
GOYAL_GRID = {s: (MAP_SIZE_224[s] + 2 * p - k) // st + 1 for s, (k, st, p) in GOYAL_POOL.items()}
GOYAL_HEADS = STAGES + ("res5avg", "res5avg_fc")


@dataclass
class ProbeConfig:
    protocol: str = "goyal"  # goyal | gap (see the module docstring)
    epochs: int = 28
    lr: float = 0.01  # per REFERENCE_BATCH images; the step uses lr * batch_size / 256
    batch_size: int = 256
    weight_decay: float = 5e-4  # the yaml's 0.0005 (its comment: Caffe2's RN50 benchmark used 1e-4)
    momentum: float = 0.9
    nesterov: bool = True
    augment: bool = True  # random resized crop + flip on the training images (False: centre crop)
    seed: int = 0

    def as_dict(self) -> dict:
        return {**asdict(self), "effective_lr": self.effective_lr}

    @property
    def effective_lr(self) -> float:
        return self.lr * self.batch_size / REFERENCE_BATCH


# ---- features ------------------------------------------------------------------------------------

@torch.no_grad()
def stage_maps(trunk: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Each stage's output map of a torchvision ResNet: {stage: (N, C_stage, H_stage, W_stage)}."""
    x = x.contiguous(memory_format=weight_layout(trunk))  # the weights' layout: NCHW on CPU, NHWC on CUDA
    x = trunk.relu(trunk.bn1(trunk.conv1(x)))  # (N, 64, H/2, W/2): conv1 before the max-pool
    out = {"conv1": x}
    x = trunk.maxpool(x)
    for stage, layer in zip(STAGES[1:], (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)):
        x = layer(x)
        out[stage] = x
    return out


@torch.no_grad()
def stage_features(trunk: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """gap: global-average-pooled output of each stage: {stage: (N, C_stage)} float32."""
    return {s: m.float().mean(dim=(2, 3)) for s, m in stage_maps(trunk, x).items()}


def goyal_pool(stage: str, x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, g, g): the reference's AvgPool2d at its 224-px map size, else adaptive
    average pooling to the same g x g grid (module docstring)."""
    if x.shape[-2:] == (MAP_SIZE_224[stage], MAP_SIZE_224[stage]):
        kernel, stride, padding = GOYAL_POOL[stage]
        return F.avg_pool2d(x, kernel, stride, padding)  # count_include_pad=True, as nn.AvgPool2d's default
    return F.adaptive_avg_pool2d(x, GOYAL_GRID[stage])


@torch.no_grad()
def goyal_features(trunk: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """goyal: {stage: (N, C, g, g)} for the five stages plus res5avg (N, C5, 1, 1), float32, NCHW."""
    maps = stage_maps(trunk, x)
    out = {s: goyal_pool(s, m.float()).contiguous() for s, m in maps.items()}
    out["res5avg"] = maps["res5"].float().mean(dim=(2, 3), keepdim=True)  # (N, C5, 1, 1)
    return out


FEATURES = {"goyal": goyal_features, "gap": stage_features}


def stage_widths(trunk: nn.Module) -> dict[str, int]:
    """Channel width of each stage (read from the modules, so any torchvision ResNet works)."""
    widths = {"conv1": trunk.conv1.out_channels}
    for stage, layer in zip(STAGES[1:], (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)):
        last = layer[-1]
        widths[stage] = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
    return widths


# ---- heads ---------------------------------------------------------------------------------------

class StageProbes(nn.Module):
    """gap: one BatchNorm1d(affine=False) + Linear head per feature; forward({name: (N, C)}) -> {name: logits}.
    The features are the five stages, or any other flat vectors (the learning benchmark's raw pixels)."""

    def __init__(self, widths: dict[str, int], num_classes: int):
        super().__init__()
        self.inputs = {s: s for s in widths}  # head -> the feature it reads
        self.heads = nn.ModuleDict({
            s: nn.Sequential(nn.BatchNorm1d(width, affine=False), nn.Linear(width, num_classes))
            for s, width in widths.items()
        })
        for head in self.heads.values():
            nn.init.normal_(head[1].weight, std=0.01)  # the usual linear-probe init
            nn.init.zeros_(head[1].bias)

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        return {h: self.heads[h](feats[self.inputs[h]]) for h in self.heads}


class GoyalProbes(nn.Module):
    """goyal: the reference's seven heads; forward(goyal_features) -> {head: logits (N, classes)}.

    A stage head is BatchNorm2d(C) on the pooled (N, C, g, g) map, flatten, Linear(C*g*g, classes),
    with PyTorch's default initialisation and BatchNorm eps 1e-5, momentum 0.1 (vissl defaults.yaml
    HEAD.BATCHNORM_EPS / BATCHNORM_MOMENTUM), as `eval_mlp` builds it.
    """

    def __init__(self, widths: dict[str, int], num_classes: int):
        super().__init__()
        self.inputs = {**{s: s for s in STAGES}, "res5avg": "res5avg", "res5avg_fc": "res5avg"}
        heads = {}
        for s in STAGES:
            c, g = widths[s], GOYAL_GRID[s]
            heads[s] = nn.Sequential(nn.BatchNorm2d(c), nn.Flatten(1), nn.Linear(c * g * g, num_classes))
        c5 = widths["res5"]
        heads["res5avg"] = nn.Sequential(nn.BatchNorm2d(c5), nn.Flatten(1), nn.Linear(c5, num_classes))
        heads["res5avg_fc"] = nn.Sequential(nn.Flatten(1), nn.Linear(c5, num_classes))
        self.heads = nn.ModuleDict(heads)

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        return {h: self.heads[h](feats[self.inputs[h]]) for h in self.heads}


def build_probes(protocol: str, widths: dict[str, int], num_classes: int) -> nn.Module:
    if protocol == "goyal":
        return GoyalProbes(widths, num_classes)
    if protocol == "gap":
        return StageProbes(widths, num_classes)
    raise ValueError(f"linear probe protocol {protocol!r} is unknown; choose one of {', '.join(PROTOCOLS)}")


def head_in_features(probes: nn.Module) -> dict[str, int]:
    """{head: input width of its Linear}: 9216, 9216, 8192, 9216, 8192, 2048, 2048 for goyal on a ResNet-50."""
    return {h: next(m for m in head if isinstance(m, nn.Linear)).in_features for h, head in probes.heads.items()}


# ---- training --------------------------------------------------------------------------------------

def lr_at(epoch_fraction: float, cfg: ProbeConfig) -> float:
    """Step schedule: the effective lr, x0.1 after each of LR_MILESTONES (fractions of training done)."""
    return cfg.effective_lr * 0.1 ** sum(epoch_fraction >= m for m in LR_MILESTONES)


def param_groups(probes: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the Linear weights and biases, none on BatchNorm (regularize_bn False,
    regularize_bias True in the reference yaml)."""
    bn = [p for m in probes.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
    ids = {id(p) for p in bn}
    rest = [p for p in probes.parameters() if id(p) not in ids]
    return [{"params": rest, "weight_decay": weight_decay}] + ([{"params": bn, "weight_decay": 0.0}] if bn else [])


def sgd_step(optimizer: torch.optim.Optimizer, loss: Tensor, where: str, lr_per_256: float) -> float:
    """Check the loss is finite, then backward and one optimiser step; returns the loss value."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: the loss is {loss.item()}: lower --lr (now {lr_per_256} per 256 images)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_probes(probes: nn.Module, epoch_batches, cfg: ProbeConfig, steps_per_epoch: int, device) -> list[float]:
    """Train all heads together (one optimiser, the sum of their cross-entropies: they share no
    parameters, so the sum trains each exactly as alone). `epoch_batches(epoch)` yields
    ({feature: tensor}, labels) for one epoch. Returns the mean summed loss per epoch."""
    probes.train().to(device)
    opt = torch.optim.SGD(param_groups(probes, cfg.weight_decay), lr=cfg.effective_lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov and cfg.momentum > 0)
    history = []
    bar = progress(total=cfg.epochs * steps_per_epoch, desc="linear probes", unit="step")
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        for step, (feats, labels) in enumerate(epoch_batches(epoch)):
            for group in opt.param_groups:
                group["lr"] = lr_at((epoch + step / max(1, steps_per_epoch)) / cfg.epochs, cfg)
            logits = probes({s: f.to(device) for s, f in feats.items()})
            labels = labels.to(device)
            loss = sum(F.cross_entropy(out, labels) for out in logits.values())
            total, count = total + sgd_step(opt, loss, f"linear probes, epoch {epoch}", cfg.lr), count + 1
            bar.update(1)
        history.append(total / max(1, count))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    bar.close()
    return history


@torch.no_grad()
def evaluate_probes(probes: nn.Module, batches, device) -> dict[str, dict[str, float]]:
    """{head: {"top1", "top5"}} over the batches ({feature: tensor}, labels) (top-5 capped at C)."""
    probes.eval().to(device)
    correct1 = {h: 0 for h in probes.heads}
    correct5 = {h: 0 for h in probes.heads}
    n = 0
    for feats, labels in batches:
        logits = probes({s: f.to(device) for s, f in feats.items()})
        labels = labels.to(device)
        for h, out in logits.items():
            ranked = out.argsort(dim=1, descending=True)
            correct1[h] += (ranked[:, 0] == labels).sum().item()
            correct5[h] += (ranked[:, :5] == labels[:, None]).any(dim=1).sum().item()
        n += labels.shape[0]
    if n == 0:
        raise ValueError("evaluate_probes: no validation samples")
    return {h: {"top1": correct1[h] / n, "top5": correct5[h] / n} for h in probes.heads}


def cached_batches(feats: dict[str, Tensor], labels: Tensor, batch_size: int, shuffle: bool, seed: int):
    """Mini-batches over stored features (shuffled with a per-epoch seed when asked)."""
    n = labels.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if shuffle and idx.numel() < 2:
            continue  # BatchNorm cannot train on a batch of one
        yield {s: f[idx] for s, f in feats.items()}, labels[idx]


def probe_cached(train_feats: dict[str, Tensor], train_labels: Tensor, val_feats: dict[str, Tensor],
                 val_labels: Tensor, num_classes: int, cfg: ProbeConfig, device) -> tuple[dict, list[float]]:
    """Train the heads of cfg.protocol on stored features (the `--no-augment` path, from
    cache_stage_features with the same protocol) and evaluate them on the stored validation features:
    ({head: {"top1", "top5"}}, mean loss per epoch)."""
    torch.manual_seed(cfg.seed)  # the heads' initialisation
    # gap: one head per stored feature (the five stages, or e.g. {"pixels": (N, 3*H*W)}); goyal: the stages
    names = list(train_feats) if cfg.protocol == "gap" else STAGES
    probes = build_probes(cfg.protocol, {s: train_feats[s].shape[1] for s in names}, num_classes)  # C per feature
    batches = lambda epoch: cached_batches(train_feats, train_labels, cfg.batch_size, True,  # noqa: E731
                                           cfg.seed + epoch)
    history = train_probes(probes, batches, cfg, -(-train_labels.shape[0] // cfg.batch_size), device)
    return evaluate_probes(probes, cached_batches(val_feats, val_labels, 1024, False, 0), device), history


def image_batches(trunk: nn.Module, loader, device, protocol: str = "goyal"):
    """Mini-batches of features computed on the fly: one trunk forward feeds every head."""
    features = FEATURES[protocol]
    for images, labels, *_ in loader:
        yield features(trunk, images.to(device, non_blocking=True)), labels


@torch.no_grad()
def cache_stage_features(trunk: nn.Module, loader, device, desc: str, protocol: str = "goyal"
                         ) -> tuple[dict[str, Tensor], Tensor]:
    """Every batch's features, on the CPU: ({feature: (N, ...)}, labels (N,))."""
    feats: dict[str, list[Tensor]] = {}
    labels = []
    for out, y in progress(image_batches(trunk, loader, device, protocol), total=len(loader), desc=desc,
                           unit="batch"):
        for s, f in out.items():
            feats.setdefault(s, []).append(f.cpu())
        labels.append(y)
    return {s: torch.cat(v) for s, v in feats.items()}, torch.cat(labels).long()
