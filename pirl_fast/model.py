"""The PIRL network: one torchvision ResNet trunk shared by the image and the jigsaw branch.

Per step the trunk runs twice with the same weights: once on the B images (224x224) and once
on the 9B patches (64x64). Features are res5 after global average pooling (torchvision's
`avgpool`, with `fc` replaced by an identity, so the trunk's state_dict keys are torchvision's
and a linear-evaluation or detection recipe can load `trunk` as is).

    f = normalize(image_head(trunk(images)))                             # (B, 128)
    g = normalize(jigsaw_head(concat_9(patch_head(trunk(patches)))))     # (B, 128)

The 9 patch embeddings are concatenated in the order the patches arrive: the loader has
already shuffled them, and the permutation is not predicted (PIRL wants g invariant to it).
Everything runs channels-last; both outputs are float32 even under bf16 autocast, because
the memory bank and the loss work in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

# arch -> (torchvision constructor name, width of res5 after avgpool)
ARCHS = {"resnet50": ("resnet50", 2048), "resnet18": ("resnet18", 512)}


HEADS = ("linear", "mlp")


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # resnet50 (the paper's) | resnet18 (tests, quick runs)
    embed_dim: int = 128  # the paper's embedding width; the memory bank rows have this width
    num_patches: int = 9  # a 3x3 jigsaw grid
    jigsaw_head: str = "light"  # method=jigsaw only: light | reference (pirl_fast/jigsaw.py)
    head: str = "linear"  # linear (the paper's) | mlp (the reference's improved recipe, see projection_heads)


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


class PIRLModel(nn.Module):
    """ResNet trunk + image head f and jigsaw head g; forward(images, patches) -> (f, g)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ValueError(f"model.arch={cfg.arch!r} is unknown; choose one of {sorted(ARCHS)}")
        if cfg.embed_dim < 1 or cfg.num_patches < 1:
            raise ValueError(f"model.embed_dim ({cfg.embed_dim}) and model.num_patches ({cfg.num_patches}) "
                             "must be positive integers")
        self.cfg = cfg
        builder, self.trunk_dim = ARCHS[cfg.arch]
        self.trunk = getattr(torchvision.models, builder)(weights=None)  # random init: self-supervised
        self.trunk.fc = nn.Identity()  # trunk(x) is now res5 avgpool, flattened: (N, trunk_dim)
        self.image_head, self.patch_head = projection_heads(cfg.head, self.trunk_dim, cfg.embed_dim)
        self.jigsaw_head = nn.Linear(cfg.num_patches * cfg.embed_dim, cfg.embed_dim)  # linear in both recipes
        self.to(memory_format=torch.channels_last)  # conv weights NHWC: cuDNN's fast path under bf16

    def features(self, x: Tensor) -> Tensor:
        """res5 after average pooling: (N, 3, H, W) -> (N, trunk_dim)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
        return self.trunk(x.contiguous(memory_format=torch.channels_last))  # no copy if already NHWC

    def embed_image(self, images: Tensor) -> Tensor:
        """f(v_I): (B, 3, H, W) -> (B, D), L2-normalised, float32."""
        f = self.image_head(self.features(images))  # (B, D)
        return F.normalize(f.float(), dim=1)

    def embed_patches(self, patches: Tensor) -> Tensor:
        """g(v_It): (B*P, 3, h, w), sample b's patches at [P*b : P*b+P] -> (B, D), L2-normalised, float32."""
        n, p = patches.shape[0], self.cfg.num_patches
        if n % p != 0:
            raise ValueError(f"got {n} patches, not a multiple of num_patches={p}: patches must be "
                             f"(B*{p}, 3, h, w) with each sample's {p} patches contiguous")
        e = self.patch_head(self.features(patches))  # (B*P, D)
        e = e.reshape(n // p, p * self.cfg.embed_dim)  # (B, P*D), concatenated in presented order
        return F.normalize(self.jigsaw_head(e).float(), dim=1)  # (B, D)

    def forward(self, images: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """(images (B,3,H,W), patches (B*P,3,h,w)) -> (f (B,D), g (B,D)), both unit rows, float32."""
        if patches.shape[0] != self.cfg.num_patches * images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {patches.shape[0]} patches; expected "
                             f"{self.cfg.num_patches} patches per image ({self.cfg.num_patches * images.shape[0]})")
        return self.embed_image(images), self.embed_patches(patches)
