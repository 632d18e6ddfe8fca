"""data.patch_view=jigsaw: the reference's Jigsaw input pipeline, read back from the pixels of both backends.

The rule, written here from the reference (facebookresearch/vissl), not from our code:
  configs/config/pretrain/jigsaw/jigsaw_8gpu_resnet.yaml TRANSFORMS: Resize(R) (the shorter side; torchvision:
  the longer becomes int(R * long / short)), RandomHorizontalFlip, RandomCrop(C), RandomGrayscale(0.66), ToTensor,
  Normalize, ImgPatchesFromTensor(num_patches 9, patch_jitter J), ShuffleImgPatches.
  vissl/data/ssl_transforms/img_patches_tensor.py: cell side c = int(C / 3), patch side c - J, and in cell
  (column i, row j) the patch at x = i c + jx, y = j c + jy, with jx, jy = np.random.randint(0, J): U{0..J-1},
  independent per patch and axis.
So for source images whose shorter side is R already (the resize keeps them as they are), a patch of cell
(row, col) is an exact window of the source at
    unmirrored  x = x0 + col c + jx                    y = y0 + row c + jy
    mirrored    x = x0 + C - P - col c - jx            (the whole crop flipped: every patch, and their places)
with the crop corner x0 ~ U{0..W-C}, y0 ~ U{0..H-C}: x - col c (or its mirrored counterpart) follows the
convolution of U{0..W-C} and U{0..J-1}, read back here and tested by chi-square, its ends reached and never
passed; the greyscale coin is one per sample (all 9 patches grey, or none).

Sizes: the reference's (R 256, C 255, c 85, J 21, P 64) and an intermediate one (R 100, C 99, c 33, J 9, P 24),
on a square and a wide image. The whole file takes about 15 CPU-seconds.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from pirl_fast.data.config import DataConfig
from pirl_fast.data.loaders import build_loader
from pirl_fast.shard.cli import Options, run_shard

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# (R, C, J): the reference's jigsaw_8gpu_resnet.yaml, and an intermediate size with the same 1 px resize slack
SIZES = {"reference": (256, 255, 21), "intermediate": (100, 99, 9)}
WIDE = 1.2  # the wide image: R x int(1.2 R)
IMAGES = 8  # per shape, one class each
SAMPLES = 96  # per shape and backend: 864 patches, 96 crops
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def ramp(h: int, w: int, rng) -> np.ndarray:
    """red = x, green = y (scaled to 0..255), blue a little noise: any window is unique and its place readable."""
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[..., 0] = np.round(np.arange(w) * 255 / (w - 1))[None, :]
    pixels[..., 1] = np.round(np.arange(h) * 255 / (h - 1))[:, None]
    pixels[..., 2] = rng.integers(100, 156, (h, w))
    return pixels


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """(size, shape) -> (shard dir, (IMAGES, H, W, 3) float32 source images as both backends decode them)."""
    rng = np.random.default_rng(0)
    out = {}
    for size, (r, _, _) in SIZES.items():
        for shape, (h, w) in (("square", (r, r)), ("wide", (r, int(WIDE * r)))):
            root = tmp_path_factory.mktemp(f"jigsaw_{size}_{shape}")
            decoded = []
            for label in range(IMAGES):
                encoded = io.BytesIO()
                Image.fromarray(ramp(h, w, rng)).save(encoded, format="JPEG", quality=100, subsampling=0)
                (root / "src" / f"c{label:02d}").mkdir(parents=True)
                (root / "src" / f"c{label:02d}" / "0.jpg").write_bytes(encoded.getvalue())
                data = torch.frombuffer(bytearray(encoded.getvalue()), dtype=torch.uint8)
                decoded.append(decode_jpeg(data).permute(1, 2, 0).numpy())
            run_shard(Options(src=str(root / "src"), dst=str(root / "shards"), samples_per_shard=4, seed=0),
                      progress=False)
            out[size, shape] = (str(root / "shards"), np.stack(decoded).astype(np.float32))
    return out


def jigsaw_config(size: str, **changes) -> dict:
    r, c, j = SIZES[size]
    return dict(patch_view="jigsaw", patch_resize=r, patch_crop_size=c, patch_size=c // 3 - j,
                patch_offsets="reference", brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
                photometric_p=0.0, blur_p=0.0, image_size=32, **changes)


def collect(shards, size: str, shape: str, backend: str, **changes) -> tuple[np.ndarray, np.ndarray]:
    """(patches (N, 9, P, P, 3) on the 0..255 scale in cell order, the source image of each sample)."""
    root, decoded = shards[size, shape]
    cfg = DataConfig(shards=root, backend=backend, batch_size=IMAGES, workers=1 if backend == "dali" else 0,
                     shuffle_buffer=IMAGES, seed=0, **jigsaw_config(size, **changes))
    torch.manual_seed(0)
    loader = build_loader(cfg)
    p = cfg.patch_size
    patches, labels = [], []
    while len(labels) * IMAGES < SAMPLES:
        for batch in loader:
            b = len(batch.index)
            order = torch.argsort(batch.perm, dim=1)  # presented position of each cell
            cells = batch.patches.reshape(b, 9, 3, p, p)[torch.arange(b)[:, None], order]
            patches.append(np.round(cells.permute(0, 1, 3, 4, 2).numpy() * STD + MEAN).astype(np.float32))
            labels.append(batch.label.numpy())
    loader.close()
    return np.concatenate(patches)[:SAMPLES], decoded[np.concatenate(labels)[:SAMPLES]]


def locate(patch: np.ndarray, source: np.ndarray) -> tuple[int, int, bool]:
    """(x, y, mirrored) of the exact window of `source` the (P, P, 3) patch is; raises if there is none."""
    h, w, _ = source.shape
    p = patch.shape[0]
    mirrored = patch[:, -1, 0].mean() < patch[:, 0, 0].mean()
    window = patch[:, ::-1] if mirrored else patch
    x_guess = round(window[..., 0].mean() * (w - 1) / 255 - (p - 1) / 2)
    y_guess = round(window[..., 1].mean() * (h - 1) / 255 - (p - 1) / 2)
    for dy in (0, -1, 1, -2, 2):
        for dx in (0, -1, 1, -2, 2):
            x, y = x_guess + dx, y_guess + dy
            if 0 <= x <= w - p and 0 <= y <= h - p and np.abs(source[y:y + p, x:x + p] - window).max() <= 0.5:
                return x, y, bool(mirrored)
    raise AssertionError(f"a patch is no exact window of its source near ({x_guess}, {y_guess})")


def expected_shift(room: int, jitter: int) -> np.ndarray:
    """P(corner + jitter = k), corner ~ U{0..room}, jitter ~ U{0..J-1}: the reference's rule."""
    return np.convolve(np.full(room + 1, 1 / (room + 1)), np.full(jitter, 1 / jitter))


def chi_square_z(counts: np.ndarray, expected: np.ndarray) -> float:
    """Wilson-Hilferty z of Pearson's chi-square (cells with expected count < 5 pooled into neighbours)."""
    n = counts.sum()
    obs, exp, o, e = [], [], 0.0, 0.0
    for c, p in zip(counts, expected * n):
        o, e = o + c, e + p
        if e >= 5:
            obs.append(o), exp.append(e)
            o, e = 0.0, 0.0
    obs[-1] += o
    exp[-1] += e
    obs, exp = np.array(obs), np.array(exp)
    chi2, k = ((obs - exp) ** 2 / exp).sum(), len(obs) - 1
    return ((chi2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / np.sqrt(2 / (9 * k))


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("size", list(SIZES))
def test_patches_follow_the_reference_rule(shards, size, backend):
    _, crop, jitter = SIZES[size]
    cell, p = crop // 3, crop // 3 - jitter
    col, row = np.arange(9) % 3, np.arange(9) // 3
    for shape in ("square", "wide"):
        patches, sources = collect(shards, size, shape, backend, gray_p=0.0)
        h, w = sources.shape[1:3]
        assert patches.shape[2] == p
        found = np.array([[locate(patches[n, k], sources[n]) for k in range(9)] for n in range(len(patches))])
        x, y, mirrored = found[..., 0], found[..., 1], found[..., 2].astype(bool)  # (N, 9)
        assert (mirrored == mirrored[:, :1]).all(), "the mirror is one coin per crop, not per patch"
        assert 0.3 < mirrored[:, 0].mean() < 0.7, f"mirror share {mirrored[:, 0].mean():.2f}, expected 0.5"
        # In the (possibly mirrored) image the crop is cut from, patch k starts at corner + col c + jx:
        # a mirrored source x is column W - P - x of the mirrored image.
        shift_x = np.where(mirrored, w - p - x, x) - col * cell  # (N, 9): x0 + jx
        shift_y = y - row * cell  # y0 + jy
        for axis, shift, room in (("x", shift_x, w - crop), ("y", shift_y, h - crop)):
            where = f"{size} {shape} {backend} {axis}"
            spread = shift.max(1) - shift.min(1)  # one corner per sample: only the jitters differ
            assert spread.max() <= jitter - 1, f"{where}: patches of one crop {spread.max()} px apart > J - 1"
            expected = expected_shift(room, jitter)  # corner + U{0..J-1}
            counts = np.bincount(shift.ravel())
            assert shift.min() >= 0 and len(counts) <= len(expected), (
                f"{where}: shifts span {shift.min()}..{len(counts) - 1}, the rule 0..{len(expected) - 1}")
            if expected[-1] * shift.size >= 5:  # the ends are likely enough to be seen: they must be
                assert shift.min() == 0 and len(counts) == len(expected), f"{where}: an end is never reached"
            z = chi_square_z(counts, expected)
            assert abs(z) < 3.5, f"{where}: shifts are not U{{0..{room}}} + U{{0..{jitter - 1}}} (chi-square z {z:.1f})"


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_greyscale_is_one_coin_per_crop(shards, backend):
    patches, _ = collect(shards, "intermediate", "square", backend, gray_p=0.66)
    grey = (np.ptp(patches, axis=-1) <= 1).all((-1, -2))  # (N, 9): R = G = B (DALI may round 1 level apart)
    assert (grey == grey[:, :1]).all(), "the greyscale coin is one per crop, not per patch"
    share, n = grey[:, 0].mean(), len(grey)
    z = (share - 0.66) / np.sqrt(0.66 * 0.34 / n)
    assert abs(z) < 3.5, f"greyscale share {share:.2f} of {n}, expected 0.66"
