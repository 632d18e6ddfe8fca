"""The PIRL augmentations in torchvision transforms v2, for the `torch` loader backend.

The same two views as dali_pipelines/pirl.py, with torchvision's own ColorJitter / RandomGrayscale /
RandomHorizontalFlip / RandomResizedCrop: an image view (random_resized_crop 224, scale .08-1) and
a patch view (random_resized_crop 255, scale .6-1, cut into a 3x3 grid of 85 px cells, one 64 px
crop per cell at its own offset, each patch jittered / greyed / flipped on its own). Every random
draw comes from the global torch RNG of the process that runs the transform (the main process
with data.workers=0, else the DataLoader worker).
"""

from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from pirl_fast.data import DataConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
ASPECT_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, as in the DALI pipeline


class PIRLTransform:
    """jpeg bytes -> (image view (S,S,3), patches (9,P,P,3) in cell order), float32 normalised, HWC."""

    def __init__(self, cfg: DataConfig):
        colour = ([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue),
                   v2.RandomGrayscale(cfg.gray_p)] if cfg.color_aug else [])
        self.image_view = v2.Compose([
            v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.image_scale), ratio=ASPECT_RATIO, antialias=True),
            *colour, v2.RandomHorizontalFlip(cfg.flip_p)])
        self.patch_crop = v2.RandomResizedCrop(cfg.patch_crop_size, scale=tuple(cfg.patch_scale),
                                               ratio=ASPECT_RATIO, antialias=True)
        self.patch_view = v2.Compose([*colour, v2.RandomHorizontalFlip(cfg.flip_p)])  # one draw per patch
        self.grid, self.cell, self.patch = cfg.grid, cfg.patch_crop_size // cfg.grid, cfg.patch_size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) uint8 -> (..., H, W, 3) float32 contiguous (HWC: channels_last in the batch)."""
        return ((x.float() - self.mean) / self.std).movedim(-3, -1).contiguous()

    def __call__(self, jpeg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_jpeg(jpeg, mode=ImageReadMode.RGB)  # (3, H, W) uint8
        view = self.normalise(self.image_view(image))  # (S, S, 3)
        g, c, p = self.grid, self.cell, self.patch
        crop = self.patch_crop(image)  # (3, C, C)
        cells = crop.reshape(3, g, c, g, c).permute(1, 3, 0, 2, 4).reshape(g * g, 3, c, c)  # (9, 3, c, c) row-major
        offsets = torch.randint(0, c - p + 1, (g * g, 2)).tolist()  # (9, 2): own offset per cell
        patches = torch.stack([self.patch_view(cell[:, oy:oy + p, ox:ox + p])
                               for cell, (oy, ox) in zip(cells, offsets)])  # (9, 3, P, P)
        return view, self.normalise(patches)  # (S, S, 3), (9, P, P, 3)
