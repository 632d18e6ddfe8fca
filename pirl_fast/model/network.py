"""The PIRL network: one torchvision ResNet trunk shared by the image and the jigsaw branch.

Per step the trunk runs twice with the same weights: once on the B images (224x224) and once
on the 9B patches (64x64). Features are res5 after global average pooling (torchvision's
`avgpool`, with `fc` replaced by an identity, so the trunk's state_dict keys are torchvision's
and a linear-evaluation or detection recipe can load `trunk` as is).

    f = normalize(image_head(trunk(images)))                             # (B, 128)
    g = normalize(jigsaw_head(concat_9(patch_head(trunk(patches)))))     # (B, 128)

The 9 patch embeddings are concatenated in the order the patches arrive: the loader has
already shuffled them, and the permutation is not predicted (PIRL wants g invariant to it).
The memory layout follows the weights: the trainer makes the model channels-last on CUDA
(cuDNN's fast NHWC path under bf16) and leaves it plain NCHW on the CPU, where oneDNN runs these
convolutions several times slower channels-last (`memory_format_for`); `features` gives its input
the weights' layout. Both outputs are float32 even under bf16 autocast, because the memory bank
and the loss work in float32.

Stems (`model.stem`): `imagenet` is torchvision's (7x7 conv stride 2 + 3x3 max-pool: a 224 px image
reaches res2 at 56 px); `small` is the stem CIFAR-sized ResNets use (He et al. 2016, Sec. 4.2;
SimCLR's and MoCo's CIFAR variants): one 3x3 conv stride 1, no max-pool, so a 32 px image reaches
res2 at 32 px and res5 at 4 px instead of 8 px and 1 px. Only conv1 and maxpool differ, so the
trunk's state_dict keys stay torchvision's (conv1.weight is (64, 3, 3, 3)).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from pirl_fast.model.batchnorm import frozen_running_stats

# arch -> (torchvision constructor name, width of res5 after avgpool)
ARCHS = {"resnet50": ("resnet50", 2048), "resnet18": ("resnet18", 512)}
STEMS = ("imagenet", "small")
HEADS = ("linear", "mlp")


@dataclass
class ModelConfig:
    # resnet50 (the paper's: res5 after avgpool is 2048-d) | resnet18 (512-d, ~4x fewer FLOPs: tests, quick runs)
    arch: str = "resnet50"
    embed_dim: int = 128  # the paper's embedding width, of both heads; the memory bank rows have this width
    num_patches: int = 9  # a 3x3 jigsaw grid
    stem: str = "imagenet"  # imagenet (7x7/2 conv + max-pool) | small (3x3/1 conv, no max-pool: 28-64 px images)
    # true: the patch forward also updates BN running stats, as the reference's does (experiment=pirl_in1k_r50);
    # false: images only (better on small data: pirl_fast/model/batchnorm.py, README "BatchNorm statistics")
    patch_bn_stats: bool = False
    embed_bn: bool = False  # true: BatchNorm1d (no affine) on f and g before the L2 normalisation (see below)
    jigsaw_head: str = "light"  # method=jigsaw only: light | reference (pirl_fast/model/jigsaw.py)
    # linear (the paper's) | mlp (the reference's improved recipe, experiment=pirl_mlp_in1k_r50; projection_heads)
    head: str = "linear"
    num_classes: int = 0  # method=supervised only: the classifier's classes (the shards' manifest count)


def apply_stem(resnet: nn.Module, stem: str) -> nn.Module:
    """Give a torchvision ResNet the `stem` (in place; returns it). "small": conv1 3x3 stride 1, no max-pool."""
    if stem not in STEMS:
        raise ValueError(f"model.stem={stem!r} is unknown; choose one of {STEMS} (small: for images under ~64 px)")
    if stem == "small":
        resnet.conv1 = nn.Conv2d(3, resnet.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(resnet.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
        resnet.maxpool = nn.Identity()
    return resnet


def build_trunk(cfg: ModelConfig) -> nn.Module:
    """The randomly initialised torchvision ResNet of cfg.arch with cfg.stem; fc is an identity, so
    trunk(x) is res5 after average pooling, (N, width)."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"model.arch={cfg.arch!r} is unknown; choose one of {sorted(ARCHS)}")
    trunk = apply_stem(getattr(torchvision.models, ARCHS[cfg.arch][0])(weights=None), cfg.stem)  # self-supervised
    trunk.fc = nn.Identity()
    return trunk


def memory_format_for(device: torch.device | str) -> torch.memory_format:
    """channels-last on CUDA; plain NCHW elsewhere (CPU convolutions are several times slower channels-last)."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def weight_layout(trunk: nn.Module) -> torch.memory_format:
    """The layout the trunk's weights are in (conv1's tells: never 1x1, so never ambiguous)."""
    w = trunk.conv1.weight
    return torch.channels_last if not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


def projection_heads(head: str, trunk_dim: int, embed_dim: int) -> tuple[nn.Module, nn.Module]:
    """(image head, per-patch head), trunk_dim -> embed_dim.

    linear: one Linear each (the paper; vissl pirl_jigsaw_4node_resnet50.yaml).
    mlp: the reference's MLP heads (vissl configs/config/pretrain/pirl/models/resnet50_mlphead.yaml,
    dims [2048, 2048, 128] for ResNet-50: the hidden width is the trunk's): image head
    Linear-ReLU-Linear; patch head Linear-ReLU-Linear-ReLU ("skip_last_layer_relu_bn": False
    there, so a ReLU follows its last layer too, before the 9 patch embeddings are concatenated).
    """
    if head == "linear":
        return nn.Linear(trunk_dim, embed_dim), nn.Linear(trunk_dim, embed_dim)
    if head == "mlp":
        image = nn.Sequential(nn.Linear(trunk_dim, trunk_dim), nn.ReLU(inplace=True), nn.Linear(trunk_dim, embed_dim))
        patch = nn.Sequential(nn.Linear(trunk_dim, trunk_dim), nn.ReLU(inplace=True), nn.Linear(trunk_dim, embed_dim),
                              nn.ReLU(inplace=True))
        return image, patch
    raise ValueError(f"model.head={head!r} is unknown; choose one of {HEADS}")


class TrunkModel(nn.Module):
    """A ResNet trunk (torchvision's keys minus fc) and `features`: what export, kNN, linear and
    invariance evaluation read, from PIRLModel and JigsawModel alike."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = build_trunk(cfg)  # trunk(x): res5 avgpool, flattened: (N, trunk_dim)
        self.trunk_dim = ARCHS[cfg.arch][1]

    def features(self, x: Tensor) -> Tensor:
        """res5 after average pooling: (N, 3, H, W) -> (N, trunk_dim), in the layout of the trunk's
        weights (weight_layout: channels-last on CUDA, plain on the CPU)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
        weight = self.trunk.conv1.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)  # float16 views (data.output_dtype) into an fp32 model; autocast casts itself
        return self.trunk(x.contiguous(memory_format=weight_layout(self.trunk)))  # no copy if already so


class PIRLModel(TrunkModel):
    """ResNet trunk + image head f and jigsaw head g; forward(images, patches) -> (f, g)."""

    def __init__(self, cfg: ModelConfig):
        if cfg.embed_dim < 1 or cfg.num_patches < 1:
            raise ValueError(f"model.embed_dim ({cfg.embed_dim}) and model.num_patches ({cfg.num_patches}) "
                             "must be positive integers")
        super().__init__(cfg)
        self.image_head, self.patch_head = projection_heads(cfg.head, self.trunk_dim, cfg.embed_dim)
        self.jigsaw_head = nn.Linear(cfg.num_patches * cfg.embed_dim, cfg.embed_dim)  # linear in both recipes
        # embed_bn: centre and scale each embedding dimension over the batch before normalising. A linear
        # head on post-ReLU features gives every image a large shared component; with few steps per
        # epoch the memory bank's rows then crowd into one cone (diagnostic bank_cos 0.8-0.9 within 3
        # epochs on 1,000 Fashion-MNIST images) and the trunk stops improving. Removing the batch mean
        # keeps the rows spread (bank_cos ~0.01); see BENCHMARKS.md. Off: the reference's heads.
        self.image_bn = nn.BatchNorm1d(cfg.embed_dim, affine=False) if cfg.embed_bn else nn.Identity()
        self.jigsaw_bn = nn.BatchNorm1d(cfg.embed_dim, affine=False) if cfg.embed_bn else nn.Identity()

    def embed_image(self, images: Tensor) -> Tensor:
        """f(v_I): (B, 3, H, W) -> (B, D), L2-normalised, float32."""
        f = self.image_bn(self.image_head(self.features(images)))  # (B, D)
        return F.normalize(f.float(), dim=1)

    def embed_patches(self, patches: Tensor) -> Tensor:
        """g(v_It): (B*P, 3, h, w), sample b's patches at [P*b : P*b+P] -> (B, D), L2-normalised, float32."""
        n, p = patches.shape[0], self.cfg.num_patches
        if n % p != 0:
            raise ValueError(f"got {n} patches, not a multiple of num_patches={p}: patches must be "
                             f"(B*{p}, 3, h, w) with each sample's {p} patches contiguous")
        with nullcontext() if self.cfg.patch_bn_stats else frozen_running_stats(self.trunk):
            e = self.patch_head(self.features(patches))  # (B*P, D); BN running stats: images only by default
        e = e.reshape(n // p, p * self.cfg.embed_dim)  # (B, P*D), concatenated in presented order
        return F.normalize(self.jigsaw_bn(self.jigsaw_head(e)).float(), dim=1)  # (B, D)

    def forward(self, images: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """(images (B,3,H,W), patches (B*P,3,h,w)) -> (f (B,D), g (B,D)), both unit rows, float32."""
        if patches.shape[0] != self.cfg.num_patches * images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {patches.shape[0]} patches; expected "
                             f"{self.cfg.num_patches} patches per image ({self.cfg.num_patches * images.shape[0]})")
        g = self.embed_patches(patches)  # patches first, as the reference (MULTI_INPUT_HEAD_MAPPING: patches, images):
        return self.embed_image(images), g  # with patch_bn_stats the running stats see them in its order
