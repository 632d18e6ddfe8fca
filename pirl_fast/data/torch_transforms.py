"""The PIRL augmentations in torchvision transforms v2, for the `torch` loader backend.

They implement the augmentation contract written in dali_pipelines/pirl.py's docstring (the
draws, their ranges and their order per crop, and where the two backends differ), with
torchvision's own RandomResizedCrop / ColorJitter / RandomGrayscale / RandomHorizontalFlip and
its functional posterize / adjust_sharpness / solarize / autocontrast / gaussian_blur, which
follow PIL, the library the reference implementation calls. Every random draw comes from the
global torch RNG of the process that runs the transform (the main process with data.workers=0,
else the DataLoader worker).
"""

from __future__ import annotations

import math

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dali_pipelines import ASPECT_RATIO, IMAGENET_MEAN, IMAGENET_STD  # shared with the DALI graph; no DALI import
from pirl_fast.data.batch import OUTPUT_DTYPES
from pirl_fast.data.config import DataConfig

NEVER = 256  # a solarize threshold no uint8 value reaches (torchvision refuses it, so it is skipped)


class RandomPhotometric:
    """Contract step 2 on a (3, H, W) uint8 crop: with probability p, posterize, sharpness,
    solarize and autocontrast in this order, each with its own draw."""

    def __init__(self, cfg: DataConfig):
        self.p, self.bits, self.sharpness, self.threshold = (
            cfg.photometric_p, cfg.posterize_bits, cfg.sharpness, cfg.solarize_threshold)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return image
        bits = int(torch.randint(self.bits[0], self.bits[1] + 1, ()))
        factor = float(torch.empty(()).uniform_(*self.sharpness))
        threshold = int(torch.randint(self.threshold[0], self.threshold[1] + 1, ()))
        image = F.adjust_sharpness(F.posterize(image, bits), factor)
        if threshold < NEVER:
            image = F.solarize(image, threshold)
        return F.autocontrast(image)


class RandomGaussianBlur:
    """Contract step 4 on a (3, H, W) uint8 crop: with probability p, sigma ~ U[lo, hi) and a
    2 ceil(3 sigma) + 1 tap Gaussian (torchvision's GaussianBlur fixes the taps instead)."""

    def __init__(self, cfg: DataConfig):
        self.p, self.sigma = cfg.blur_p, cfg.blur_sigma

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return image
        sigma = float(torch.empty(()).uniform_(*self.sigma))
        taps = 2 * math.ceil(3 * sigma) + 1
        return F.gaussian_blur(image, [taps, taps], [sigma, sigma])


def colour_steps(cfg: DataConfig) -> list:
    """Contract steps 1-4 as transforms of one (3, H, W) uint8 crop (none with color_aug off)."""
    if not cfg.color_aug:
        return []
    steps = []
    if max(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) > 0 and cfg.jitter_p > 0:
        jitter = v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
        steps.append(jitter if cfg.jitter_p == 1 else v2.RandomApply([jitter], p=cfg.jitter_p))
    if cfg.photometric_p > 0:
        steps.append(RandomPhotometric(cfg))
    if cfg.gray_p > 0:
        steps.append(v2.RandomGrayscale(cfg.gray_p))
    if cfg.blur_p > 0:
        steps.append(RandomGaussianBlur(cfg))
    return steps


def offset_slack(cfg: DataConfig) -> int:
    """Offsets of a patch in its cell are U{0..slack} (data.patch_offsets: full c - P, reference c - P - 1)."""
    slack = cfg.patch_crop_size // cfg.grid - cfg.patch_size
    return slack - 1 if cfg.patch_offsets == "reference" else slack


class PIRLTransform:
    """jpeg bytes -> (image view (S,S,3), patches (9,P,P,3) in cell order), normalised, HWC, in
    data.output_dtype (float32 | float16).

    The patch crop per data.patch_view: pirl, a random resized crop whose 9 patches each get their own
    colour steps and mirror; jigsaw (the reference's Jigsaw), Resize(patch_resize) of the shorter side,
    RandomCrop(patch_crop_size), colour steps and mirror once for the whole crop, then the 9 patches."""

    def __init__(self, cfg: DataConfig):
        colour, mirror = colour_steps(cfg), v2.RandomHorizontalFlip(cfg.flip_p)
        self.image_view = v2.Compose([
            v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.image_scale), ratio=ASPECT_RATIO, antialias=True),
            *colour, mirror])
        if cfg.patch_view == "jigsaw":  # the reference: Resize, RandomHorizontalFlip, RandomCrop, RandomGrayscale;
            # the mirror last here: a uniform crop of the mirrored image is the mirror of a uniform crop
            self.patch_crop = v2.Compose([v2.Resize(cfg.patch_resize, antialias=True),
                                          v2.RandomCrop(cfg.patch_crop_size), *colour, mirror])
            self.patch_view = v2.Identity()
        else:
            self.patch_crop = v2.RandomResizedCrop(cfg.patch_crop_size, scale=tuple(cfg.patch_scale),
                                                   ratio=ASPECT_RATIO, antialias=True)
            self.patch_view = v2.Compose([*colour, mirror])  # its own draws for each patch
        self.grid, self.cell, self.patch = cfg.grid, cfg.patch_crop_size // cfg.grid, cfg.patch_size
        self.slack = offset_slack(cfg)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
        self.dtype = OUTPUT_DTYPES[cfg.output_dtype]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) uint8 -> (..., H, W, 3) contiguous (HWC: channels_last in the batch), computed
        in float32, delivered in data.output_dtype."""
        return ((x.float() - self.mean) / self.std).movedim(-3, -1).to(self.dtype).contiguous()

    def __call__(self, jpeg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_jpeg(jpeg, mode=ImageReadMode.RGB)  # (3, H, W) uint8
        view = self.normalise(self.image_view(image))  # (S, S, 3)
        g, c, p = self.grid, self.cell, self.patch
        crop = self.patch_crop(image)  # (3, C, C)
        cells = crop.reshape(3, g, c, g, c).permute(1, 3, 0, 2, 4).reshape(g * g, 3, c, c)  # (9, 3, c, c) row-major
        offsets = torch.randint(0, self.slack + 1, (g * g, 2)).tolist()  # (9, 2): own offset per cell
        patches = torch.stack([self.patch_view(cell[:, oy:oy + p, ox:ox + p])
                               for cell, (oy, ox) in zip(cells, offsets)])  # (9, 3, P, P)
        return view, self.normalise(patches)  # (S, S, 3), (9, P, P, 3)
