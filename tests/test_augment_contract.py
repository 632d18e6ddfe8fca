"""The augmentation contract (dali_pipelines/pirl.py's docstring), held against both backends.

Generated images whose pixels give the draws back, one family per group of draws; each runs
through the real loaders (`dali` CPU graph, `torch` in-process), and every crop (the view and
each of the 9 patches, put back in cell order with Batch.perm) is read back:

  family       images (48 x 48, JPEG q100 4:4:4)   config                          read back per crop
  geometry     red = x, green = y                  colour off, whole patch crop    mirror; each patch an exact
                                                                                   window: its offsets; the
                                                                                   view's crop scale, aspect
  patch_crop   the same                            colour off, default crops       mirror; the patch crop's
                                                                                   scale and aspect (slopes)
  jitter       one flat colour, channels 70..130   brightness + contrast only      greyscale; jitter applied;
                                                                                   b and k from the affine map
                                                                                   out = b (Y + k (x - Y))
  hue          one flat colour, Y 110..150         saturation + hue only           greyscale; jitter applied;
                                                                                   s and h (torch: HSV, DALI:
                                                                                   YIQ, as the contract says)
  photometric  one flat grey x = 16 j + 15         photometric only, default       posterize bits and solarize
                                                   ranges                          inversion (a flat crop is
                                                                                   left alone by sharpness
                                                                                   and autocontrast)
  sharpness    grey 70 | 174 halves per cell       photometric with posterize and  applied (autocontrast
                                                   solarize fixed to identity      stretches to 0..255);
                                                                                   v from the edge pixels
  blur         the same                            blur only                       sigma, fitted to the edge

Checks, each per backend against the contract's value (one-sample) and between the backends
(two-sample), all at |z| <= 3.5 (two-sided 5e-4 per check, about 40 checks):
  probabilities  z-tests of shares; where the expected share differs per crop (photometric), of
                 the sum of its coins against the sum of the expected probabilities
  factors        mean and spread (standard deviation) z-tests, a two-sample Kolmogorov-Smirnov
                 test at p >= 1e-3 (not for sharpness, see check_sharpness), and the observed
                 range against the contract's
  crops          Kolmogorov-Smirnov of area and log-aspect against a simulation of torchvision's
                 RandomResizedCrop rule and between the backends, and mean/spread z-tests
  offsets        chi-square of U{0..4} per axis and backend, both ends reached
  independence   correlation between the 10 crops of a sample (view + 9 cells), per read-back
                 coin or value, |r| <= 4.2 / sqrt(n) (a Bonferroni bound over the 45 pairs)
  readability    every crop is read back (an exact window, an exact affine map, a known outcome)

Power, the arithmetic behind the sample counts. For a share p0 over n coins per backend, the
two-sample z-test at |z| <= 3.5 detects a relative error e with power 0.95 when
e >= (3.5 + 1.645) sqrt(2 (1 - p0) / (p0 n)); a 10% error needs n >= 5294 (1 - p0) / p0 coins:
  probability     family, coins                                  p0     needs    has     detects
  flip_p          geometry, the patches                          0.5     5294   18432     5.4%
  gray_p          jitter, all 10 crops                           0.4     7941   10240     8.8%
  jitter_p        jitter, the non-grey crops                     0.8     1324   ~6100     4.7%
  photometric_p   sharpness, all 10 crops                        0.66    2727    3200     9.2%
  photometric_p   photometric, its non-identity share            ~0.6    3530    6400     7.5%
  blur_p          blur, sigma >= 0.5 (visible) share             0.39    8103    8320     9.9%
The one-sample test (each backend against the contract's value) needs half as many. The view
has one coin per sample; its shares are checked on their own too, where the two-sample
(one-sample) test detects 16% (11%) for flip_p, 28% (20%) gray_p, 15% (10%) jitter_p, 24% (17%)
photometric_p and 31% (22%) blur_p. A spread: the standard deviation of n uniform values has a
standard error of 0.447 sd / sqrt(n), so a 10% wider range is detected (two-sample, power 0.95)
from n >= 2 (5.145 x 0.447 / 0.1)^2 = 1058 values; each factor has 2100 or more.
test_a_wrong_draw_is_caught runs the DALI side again with one probability or range 10% off, and
with the per-element mirror coin that corrupted patches, and asserts that the check for it fails.
The whole file took about 30 CPU-seconds on the (loaded) 2-core development machine: fit for CI.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field

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

SIDE, CELL, PATCH, VIEW = 48, 16, 12, 32  # source and patch crop 48 px: 3x3 cells of 16 px, patches of 12
SLACK = CELL - PATCH  # offsets in U{0..4}
IMAGES = 64  # per family, one class each: the label names the image
BATCH = 64
Z = 3.5  # critical |z| of every check
KS_P = 1e-3  # smallest acceptable Kolmogorov-Smirnov p-value
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
LUMA = np.array([0.299, 0.587, 0.114])
YIQ = np.array([[0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])  # RGB -> (I, Q)


# ------------------------------------------------------------------------------------------- images
def ramp_images(rng) -> list[np.ndarray]:
    pixels = np.zeros((SIDE, SIDE, 3), np.uint8)
    pixels[..., 0] = np.round(np.arange(SIDE) * 255 / (SIDE - 1))[None, :]
    pixels[..., 1] = np.round(np.arange(SIDE) * 255 / (SIDE - 1))[:, None]
    pixels[..., 2] = 128
    return [pixels] * IMAGES


def flat(colour) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (SIDE, SIDE, 3)).copy()


def jitter_images(rng) -> list[np.ndarray]:
    """Channels in 70..130 (b (Y + k (x - Y)) stays in 0..255 for b, k up to 1.4), chroma >= 45,
    luma near 100, away from the 128 a fixed-grey contrast pivot would use."""
    colours = []
    while len(colours) < IMAGES:
        c = rng.integers(70, 131, 3)
        if c.max() - c.min() >= 45 and abs(c @ LUMA - 100) < 12:
            colours.append(c)
    return [flat(c) for c in colours]


def hue_images(rng) -> list[np.ndarray]:
    """Luma 110..150, chroma 30..60: a 1.4x saturation and any hue rotation stay in the gamut."""
    colours = []
    while len(colours) < IMAGES:
        c = rng.integers(60, 201, 3)
        if 30 <= c.max() - c.min() <= 60 and 110 <= c @ LUMA <= 150:
            colours.append(c)
    return [flat(c) for c in colours]


def photometric_images(rng) -> list[np.ndarray]:
    """Greys 16 j + 15: the low four bits set, so posterize to 4..8 bits gives 5 different values,
    and an inverted value lies in the other half of 0..255 (a flat grey decodes exactly)."""
    return [flat([16 * (i % 16) + 15] * 3) for i in range(IMAGES)]


EDGE_LOW, EDGE_HIGH = 70, 174  # 3/13 of the step is 24 exactly: PIL's rounded smoothing is exact there


def edge_images(rng) -> list[np.ndarray]:
    """Every 16 px cell: left half 70, right half 174 (a patch always holds 4..8 columns of each)."""
    pixels = np.full((SIDE, SIDE, 3), EDGE_LOW, np.uint8)
    for x0 in range(CELL // 2, SIDE, CELL):
        pixels[:, x0:x0 + CELL // 2] = EDGE_HIGH
    return [pixels] * IMAGES


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, tuple[str, np.ndarray]]:
    """family -> (shard dir, (IMAGES, 48, 48, 3) float32 of each label's image as both backends
    decode it: libjpeg-turbo, byte for byte the same in DALI and torchvision)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, make in (("ramp", ramp_images), ("jitter", jitter_images), ("hue", hue_images),
                       ("photometric", photometric_images), ("edges", edge_images)):
        root = tmp_path_factory.mktemp(f"contract_{name}")
        decoded = []
        for label, pixels in enumerate(make(rng)):
            encoded = io.BytesIO()
            Image.fromarray(pixels).save(encoded, format="JPEG", quality=100, subsampling=0)
            (root / "src" / f"c{label:03d}").mkdir(parents=True)
            (root / "src" / f"c{label:03d}" / "0.jpg").write_bytes(encoded.getvalue())  # copied as-is
            data = torch.frombuffer(bytearray(encoded.getvalue()), dtype=torch.uint8)
            decoded.append(decode_jpeg(data).permute(1, 2, 0).numpy())
        run_shard(Options(src=str(root / "src"), dst=str(root / "shards"), samples_per_shard=16, seed=0),
                  progress=False)
        out[name] = (str(root / "shards"), np.stack(decoded).astype(np.float32))
    return out


# ------------------------------------------------------------------------------------ collection
@dataclass
class Crops:
    views: np.ndarray  # (N, S, S, 3) float32 on the 0..255 scale
    patches: np.ndarray  # (N, 9, P, P, 3), cell order
    truth: np.ndarray  # (N, 48, 48, 3): each sample's source image as decoded


_CACHE: dict = {}


def collect(datasets, family: Family, backend: str, **changes) -> Crops:
    """`family.samples` samples through build_loader; cached per (family, backend, changes)."""
    key = (family.name, backend, repr(sorted(changes.items())))
    if key not in _CACHE:
        shards, decoded = datasets[family.images]
        settings = {"seed": 0, **family.settings, **changes}
        cfg = DataConfig(shards=shards, backend=backend, batch_size=BATCH, workers=1 if backend == "dali" else 0,
                         patch_crop_size=SIDE, patch_size=PATCH, shuffle_buffer=IMAGES, **settings)
        torch.manual_seed(0)  # the torch backend with workers=0 draws from the global RNG
        loader = build_loader(cfg)
        views, patches, labels = [], [], []
        while len(labels) * BATCH < family.samples:
            for batch in loader:
                b = len(batch.index)
                order = torch.argsort(batch.perm, dim=1)  # presented position of each cell
                cells = batch.patches.reshape(b, 9, 3, PATCH, PATCH)[torch.arange(b)[:, None], order]
                views.append(denormalise(batch.images.permute(0, 2, 3, 1)))
                patches.append(denormalise(cells.permute(0, 1, 3, 4, 2)))
                labels.append(batch.label.numpy())
        labels = np.concatenate(labels)
        _CACHE[key] = Crops(np.concatenate(views), np.concatenate(patches), decoded[labels])
    return _CACHE[key]


def denormalise(x: torch.Tensor) -> np.ndarray:
    return np.round(x.numpy() * STD + MEAN).astype(np.float32)


# ------------------------------------------------------------------------------------ statistics
def ks_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov, asymptotic p-value (Kolmogorov's series)."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)).max()
    lam = d * math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    if lam < 0.3:
        return 1.0
    return float(min(1.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))))


def chi_square_z(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square over the cells, as a z-score (Wilson-Hilferty)."""
    keep = expected > 0
    stat, k = float((((observed - expected) ** 2)[keep] / expected[keep]).sum()), int(keep.sum()) - 1
    return ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))


class Report:
    """Collects the failed checks of one family, named so a test can ask which one failed."""

    def __init__(self):
        self.failures: list[str] = []

    def check(self, ok: bool, name: str, detail: str) -> None:
        if not ok:
            self.failures.append(f"{name}: {detail}")

    def share(self, name: str, a: np.ndarray, b: np.ndarray, p_a: float | np.ndarray, p_b=None) -> None:
        """Coins a (dali), b (torch) against the contract (p_a, p_b: a number, or one probability per
        coin) and against each other."""
        a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
        for label, x, p in (("dali", a, p_a), ("torch", b, p_a if p_b is None else p_b)):
            p = np.broadcast_to(np.asarray(p, float).ravel() if np.ndim(p) else float(p), x.shape)
            z = (x.sum() - p.sum()) / math.sqrt(max((p * (1 - p)).sum(), 1e-12))
            self.check(abs(z) <= Z, name,
                       f"{label} share {x.mean():.4f}, contract {p.mean():.4f} (z = {z:.1f}, n = {len(x)})")
        pooled = (a.sum() + b.sum()) / (len(a) + len(b))
        z = (a.mean() - b.mean()) / math.sqrt(max(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)), 1e-12))
        self.check(abs(z) <= Z, name, f"dali {a.mean():.4f} vs torch {b.mean():.4f} (z = {z:.1f})")

    def uniform(self, name: str, a: np.ndarray, b: np.ndarray, lo: float, hi: float, tolerance: float,
                bias: float = 0.0, ks: bool = True) -> None:
        """Values a, b against U[lo, hi) (mean, spread, range) and each other (spread, KS). `tolerance`:
        how far read-back noise may carry a value past the range; `bias`: how far the read-back may
        shift the mean (a fraction of the range; the spread gets the same relative allowance);
        ks=False where the backends' documented rounding gives their read-backs different fine grains."""
        a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
        mean0, sd0 = (lo + hi) / 2, (hi - lo) / math.sqrt(12)
        for label, x in (("dali", a), ("torch", b)):
            n = len(x)
            self.check(n >= 200, name, f"{label}: only {n} values read back")
            if n < 2:
                continue
            z_mean = max(0.0, abs(x.mean() - mean0) - bias * (hi - lo)) / (sd0 / math.sqrt(n))
            z_sd = max(0.0, abs(x.std() - sd0) - bias * sd0) / (0.447 * sd0 / math.sqrt(n))
            self.check(z_mean <= Z and z_sd <= Z, name,
                       f"{label} mean {x.mean():.4f} sd {x.std():.4f}, contract {mean0:.4f} {sd0:.4f} "
                       f"(|z| = {z_mean:.1f}, {z_sd:.1f} beyond a read-back bias of {bias:.0%})")
            self.check(lo - tolerance <= x.min() and x.max() <= hi + tolerance, name,
                       f"{label} range [{x.min():.3f}, {x.max():.3f}] outside [{lo}, {hi}] +- {tolerance}")
        if min(len(a), len(b)) >= 2:
            gap = max(0.0, abs(a.std() - b.std()) - bias * sd0)
            z = gap / math.sqrt((0.447 * a.std()) ** 2 / len(a) + (0.447 * b.std()) ** 2 / len(b))
            self.check(z <= Z, name, f"spread dali {a.std():.4f} vs torch {b.std():.4f} (|z| = {z:.1f})")
            if ks:
                p = ks_p_value(a, b)
                self.check(p >= KS_P, name, f"Kolmogorov-Smirnov dali vs torch p = {p:.2g}")

    def independent(self, name: str, values: np.ndarray, backend: str) -> None:
        """values (N, crops): no two crops of a sample correlated beyond |r| <= 4.2 / sqrt(N)."""
        values = np.asarray(values, float)
        keep = values.std(0) > 0
        if keep.sum() < 2:
            return
        r = np.corrcoef(values[:, keep], rowvar=False)
        worst = np.abs(r - np.eye(len(r))).max()
        self.check(worst <= 4.2 / math.sqrt(len(values)), name, f"{backend}: crops correlated, max |r| = {worst:.3f}")

    def named(self, name: str) -> list[str]:
        return [f for f in self.failures if f.startswith(name + ":")]


def crops(c: Crops) -> list[np.ndarray]:
    """The 10 crops of every sample: [view (N, S, S, 3), cell 0 (N, P, P, 3), ..., cell 8]."""
    return [c.views] + [c.patches[:, k] for k in range(9)]


# ------------------------------------------------------------------------------------ read-backs
def read_ramp_view(views: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mirrored, area fraction, log aspect) of each view's crop from its red (x) and green (y) slopes."""
    inner = np.arange(2, VIEW - 2)
    px_per_level = (SIDE - 1) / 255
    red = views[:, 2:-2, 2:-2, 0].mean(1)  # (N, S-4) along x
    green = views[:, 2:-2, 2:-2, 1].mean(2)  # (N, S-4) along y
    sx = np.polyfit(inner, red.T, 1)[0] * px_per_level  # source px per view px, signed
    sy = np.polyfit(inner, green.T, 1)[0] * px_per_level
    w, h = np.round(np.abs(sx) * VIEW), np.round(sy * VIEW)  # crop size in source px: integers, read to +-0.15
    return sx < 0, w * h / SIDE**2, np.log(w / h)


def read_windows(c: Crops) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per patch (N, 9): mirrored, ox, oy, and whether it equals that window of the decoded source."""
    n = len(c.patches)
    red, green = c.patches[..., 0], c.patches[..., 1]  # (N, 9, P, P)
    mirrored = red[..., :, -1].mean(-1) < red[..., :, 0].mean(-1)
    px_per_level = (SIDE - 1) / 255
    cols, rows = np.arange(9) % 3, np.arange(9) // 3
    centre_x = red.mean((-1, -2)) * px_per_level  # the window's centre column in source px
    centre_y = green.mean((-1, -2)) * px_per_level
    ox = np.clip(np.round(centre_x - (PATCH - 1) / 2) - cols * CELL, 0, SLACK).astype(int)
    oy = np.clip(np.round(centre_y - (PATCH - 1) / 2) - rows * CELL, 0, SLACK).astype(int)
    exact = np.zeros((n, 9), bool)
    ar = np.arange(PATCH)
    for k in range(9):
        ys = (rows[k] * CELL + oy[:, k])[:, None] + ar  # (N, P)
        xs = (cols[k] * CELL + ox[:, k])[:, None] + ar
        xs = np.where(mirrored[:, k, None], xs[:, ::-1], xs)
        window = c.truth[np.arange(n)[:, None, None], ys[:, :, None], xs[:, None, :]]  # (N, P, P, 3)
        exact[:, k] = np.abs(window - c.patches[:, k]).max((1, 2, 3)) <= 0.5
    return mirrored, ox, oy, exact


def read_patch_crop(c: Crops) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mirrored (N, 9), area fraction (N,), log aspect (N,)) of the patch crop from the patch slopes
    (12 px each: the sides come out to about +-0.3 px, not as integers)."""
    inner = np.arange(1, PATCH - 1)
    px_per_level = (SIDE - 1) / 255
    red = c.patches[..., 1:-1, 1:-1, 0].mean(-2)  # (N, 9, P-2) along x
    green = c.patches[..., 1:-1, 1:-1, 1].mean(-1)  # (N, 9, P-2) along y
    sx = np.polyfit(inner, red.reshape(-1, PATCH - 2).T, 1)[0].reshape(-1, 9) * px_per_level
    sy = np.polyfit(inner, green.reshape(-1, PATCH - 2).T, 1)[0].reshape(-1, 9) * px_per_level
    w, h = np.abs(sx).mean(1) * SIDE, sy.mean(1) * SIDE
    return sx < 0, w * h / SIDE**2, np.log(w / h)


def flat_colours(c: Crops) -> tuple[np.ndarray, np.ndarray]:
    """(out (N, 10, 3), x (N, 3)): each crop's colour (flat images: every pixel alike) and the source's."""
    out = np.stack([crop.reshape(len(crop), -1, 3).mean(1) for crop in crops(c)], 1)
    return out, c.truth[:, 0, 0]


def is_grey(out: np.ndarray) -> np.ndarray:
    """R = G = B, within DALI's rounding: its greyscale, folded into a YIQ saturation of 0, can leave
    channels 1 level apart, 2 after a brightness of up to 1.4 (chromatic crops differ by 10+)."""
    return out.max(-1) - out.min(-1) <= 3.0


def read_jitter(c: Crops):
    """Brightness b and contrast k of every crop: out = b (Y + k (x - Y)) for each channel, so a
    line fit out = A + B x over the 3 channels gives B = b k, A = b (1 - k) Y. Greyscale crops keep
    only Y' = b Y. Returns grey, applied, b, k (N, 10) (NaN where not readable) and the fit's residual."""
    out, x = flat_colours(c)
    y = x @ LUMA  # (N,)
    grey = is_grey(out)
    xc = x - x.mean(1, keepdims=True)
    slope = ((out - out.mean(2, keepdims=True)) * xc[:, None]).sum(2) / (xc**2).sum(1)[:, None]  # (N, 10) = b k
    offset = out.mean(2) - slope * x.mean(1)[:, None]  # b (1 - k) Y
    residual = np.abs(out - (offset[..., None] + slope[..., None] * x[:, None])).max(2)
    b = np.where(grey, out.mean(2) / y[:, None], slope + offset / y[:, None])
    k = np.where(grey, np.nan, slope / b)
    applied = np.where(grey, np.nan, (np.abs(out - x[:, None]).max(2) > 0.5).astype(float))
    return grey, applied, b, k, np.where(grey, 0.0, residual)


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hue in [0, 1), max - min) of (..., 3) colours, as torchvision's _rgb_to_hsv."""
    r, g, b = np.moveaxis(rgb, -1, 0)
    hi, lo = rgb.max(-1), rgb.min(-1)
    d = np.where(hi > lo, hi - lo, 1.0)
    h = np.where(hi == r, (g - b) / d, np.where(hi == g, 2 + (b - r) / d, 4 + (r - g) / d)) / 6
    return np.mod(h, 1.0), hi - lo


def read_hue(c: Crops, backend: str):
    """Saturation s and hue h of every crop, in the backend's model (the contract's hue difference):
    torch shifts H in HSV and scales max - min; DALI rotates and scales the (I, Q) chroma of YIQ."""
    out, x = flat_colours(c)
    grey = is_grey(out)
    if backend == "torch":
        (h_out, range_out), (h_in, range_in) = rgb_to_hsv(out), rgb_to_hsv(x[:, None])
        s, h = range_out / range_in, np.mod(h_out - h_in + 0.5, 1.0) - 0.5
    else:
        z_out, z_in = out @ YIQ.T, x @ YIQ.T  # (N, 10, 2), (N, 2)
        ratio = (z_out[..., 0] + 1j * z_out[..., 1]) / (z_in[:, 0] + 1j * z_in[:, 1])[:, None]
        s, h = np.abs(ratio), -np.angle(ratio) / (2 * np.pi)  # DALI's positive hue turns (I, Q) clockwise
    applied = np.where(grey, np.nan, (np.abs(out - x[:, None]).max(2) > 0.5).astype(float))
    return grey, applied, np.where(grey, np.nan, s), np.where(grey, np.nan, h)


def read_photometric(c: Crops, bits_range=(4, 8)):
    """(bits (N, 10), inverted (N, 10), readable (N, 10), x (N,)): which posterize and solarize
    outcome each flat grey crop shows (bits 8 and not inverted: the crop is unchanged)."""
    out, x = flat_colours(c)
    value, x = out[..., 0], x[:, 0]
    candidates = np.array([[(int(v) & (255 ^ ((1 << (8 - n)) - 1))) for n in range(4, 9)] for v in x])  # (N, 5)
    plain = np.abs(value[..., None] - candidates[:, None]) <= 0.5  # (N, 10, 5)
    inverted = np.abs(value[..., None] - (255 - candidates[:, None])) <= 0.5
    hit = plain | inverted
    bits = np.where(hit.any(-1), 4 + hit.argmax(-1), -1)
    return bits, inverted.any(-1), hit.any(-1) & is_grey(out), x


def expected_photometric(x: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """For grey x (N,): P(the crop changes) and P(inverted | bits n) for n = 4..8, (N, 5), under
    the contract (bits ~ U{4..8}, t ~ U{0..256}: P(t <= v) = (v + 1) / 257)."""
    posterized = np.array([[(int(v) & (255 ^ ((1 << (8 - n)) - 1))) for n in range(4, 9)] for v in x])  # (N, 5)
    p_inverted = (posterized + 1) / 257
    unchanged = (1 - p) + p * 0.2 * (1 - p_inverted[:, 4])  # not applied, or bits 8 and t > x
    return 1 - unchanged, p_inverted


def edge_rows(c: Crops) -> list[np.ndarray]:
    """The middle row of every crop (rows are alike in the edge images; the 1-px border row is left
    out): [(N, 48) for the view, (N, 12) for each cell]."""
    return [crop[:, crop.shape[1] // 2, :, 0] for crop in crops(c)]


def read_sharpness(c: Crops) -> tuple[np.ndarray, np.ndarray]:
    """(applied (N, 10), v (N, 10)): autocontrast stretches an applied crop to 0..255; sharpness moves
    the two pixels beside the edge by (1 - v) 3/13 of the step (PIL's 3x3 smoothing kernel),
    which the affine autocontrast leaves as a fraction of the step."""
    applied, v = [], []
    for row in edge_rows(c):
        if row.shape[1] == PATCH:  # the crop's border columns are flat (and never sharpened)
            low, high, around = row[:, 0], row[:, -1], row
        else:  # the view: the first low | high edge, flat pixels at columns 3 and 12
            low, high, around = row[:, 3], row[:, 12], row[:, :CELL - 1]
        edge = np.argmax(np.abs(np.diff(around, axis=1)), axis=1)  # last low column
        last_low, first_high = row[np.arange(len(row)), edge], row[np.arange(len(row)), edge + 1]
        fraction = ((last_low - low) + (high - first_high)) / 2 / np.maximum(high - low, 1)
        applied.append((row.min(1) <= 1) & (row.max(1) >= 254))
        v.append(1 - fraction * 13 / 3)
    return np.stack(applied, 1), np.stack(v, 1)


SIGMAS = np.round(np.arange(0.1, 2.5001, 0.01), 2)  # past the contract's 2.0: read-back noise is not cut off


def blurred_rows(row: np.ndarray) -> np.ndarray:
    """row (L,) blurred with every sigma in SIGMAS: (len(SIGMAS), L), 2 ceil(3 sigma) + 1 taps,
    reflect-101 borders, rounded: both backends' Gaussian."""
    out = []
    for sigma in SIGMAS:
        radius = math.ceil(3 * sigma)
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        padded = np.pad(row, radius, mode="reflect")
        out.append(np.round(np.convolve(padded, taps / taps.sum(), mode="valid")))
    return np.stack(out)


def read_blur(c: Crops) -> np.ndarray:
    """sigma (N, 10) fitted to each crop's middle row among SIGMAS, 0 for an unblurred step."""
    sigma = []
    for row in edge_rows(c):
        width = row.shape[1]
        if width == PATCH:  # a patch: the step sits after 4..8 low columns
            steps = {e: np.where(np.arange(PATCH) < e, EDGE_LOW, EDGE_HIGH).astype(float) for e in range(4, 9)}
            edge = (row < (EDGE_LOW + EDGE_HIGH) / 2).sum(1).clip(4, 8)
        else:  # the view: the whole 48 px pattern
            steps = {0: np.where(np.arange(width) % CELL < CELL // 2, EDGE_LOW, EDGE_HIGH).astype(float)}
            edge = np.zeros(len(row), int)
        found = np.zeros(len(row))
        for e, step in steps.items():
            table = np.concatenate([step[None], blurred_rows(step)])  # (1 + len(SIGMAS), width)
            mine = edge == e
            errors = ((row[mine, None, :] - table[None]) ** 2).sum(-1)  # (n, 1 + len(SIGMAS))
            found[mine] = np.concatenate([[0.0], SIGMAS])[errors.argmin(1)]
        sigma.append(found)
    return np.stack(sigma, 1)


def simulate_resized_crops(scale: tuple[float, float], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(area fraction, log aspect) of n torchvision RandomResizedCrop windows on a SIDE x SIDE image,
    written from its rule (10 tries of area ~ U[scale], log ratio ~ U[log 3/4, log 4/3), integer
    sides, else the whole image): the contract's distribution."""
    rng = np.random.default_rng(seed)
    area, aspect = np.empty(n), np.empty(n)
    for i in range(n):
        w = h = SIDE
        for _ in range(10):
            target = SIDE * SIDE * rng.uniform(*scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            tw, th = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < tw <= SIDE and 0 < th <= SIDE:
                w, h = tw, th
                break
        area[i], aspect[i] = w * h / SIDE**2, math.log(w / h)
    return area, aspect


# ------------------------------------------------------------------------------------ families
@dataclass
class Family:
    name: str
    images: str  # key of the datasets fixture
    samples: int
    settings: dict
    check: Callable[[Family, Crops, Crops, Report], None]
    contract: dict = field(default_factory=dict)  # the values the check holds both backends to


def check_geometry(family: Family, dali: Crops, torch_: Crops, report: Report) -> None:
    flip_p = family.contract["flip_p"]
    reads = {}
    for backend, c in (("dali", dali), ("torch", torch_)):
        mirrored, ox, oy, exact = read_windows(c)
        view_mirrored, area, aspect = read_ramp_view(c.views)
        report.check(exact.all(), "windows", f"{backend}: {int((~exact).sum())} of {exact.size} patches are no exact "
                                             "window of their cell")
        for name, o in (("offset x", ox), ("offset y", oy)):
            counts = np.bincount(o.ravel(), minlength=SLACK + 1)
            z = chi_square_z(counts, np.full(SLACK + 1, o.size / (SLACK + 1)))
            report.check(abs(z) <= Z and counts[0] > 0 and counts[-1] > 0, "offsets",
                         f"{backend} {name} counts {counts.tolist()} are not U{{0..{SLACK}}} (z = {z:.1f})")
        report.independent("mirror independence", np.concatenate([view_mirrored[:, None], mirrored], 1), backend)
        report.independent("offset independence", np.concatenate([ox, oy], 1), backend)
        reads[backend] = (mirrored, view_mirrored, area, aspect)
    report.share("flip_p patches", reads["dali"][0], reads["torch"][0], flip_p)
    report.share("flip_p views", reads["dali"][1], reads["torch"][1], flip_p)
    check_crop_shape(report, "view crop", family.contract["image_scale"], reads["dali"][2:], reads["torch"][2:], True)


def check_crop_shape(report: Report, name: str, scale, dali: tuple, torch_: tuple, integer_sides: bool) -> None:
    """Area fraction and log aspect against a simulation of torchvision's rule (its whole distribution
    where the sides are read back as integers, else its mean and spread) and between the backends."""
    simulated = simulate_resized_crops(tuple(scale), 20000)
    for what, i in (("area", 0), ("log aspect", 1)):
        expected = simulated[i]
        for backend, values in (("dali", dali[i]), ("torch", torch_[i])):
            if integer_sides:
                p = ks_p_value(values, expected)
                report.check(p >= KS_P, name, f"{backend} {what} differs from torchvision's rule (KS p = {p:.2g})")
            n = len(values)
            z_mean = (values.mean() - expected.mean()) / (expected.std() / math.sqrt(n))
            z_sd = (values.std() - expected.std()) / (expected.std() * math.sqrt(0.5 / n))  # normal-theory SE
            report.check(abs(z_mean) <= Z and abs(z_sd) <= Z, name,
                         f"{backend} {what} mean {values.mean():.4f} sd {values.std():.4f}, torchvision's rule "
                         f"{expected.mean():.4f} {expected.std():.4f} (z = {z_mean:.1f}, {z_sd:.1f})")
        p = ks_p_value(dali[i], torch_[i])
        report.check(p >= KS_P, name, f"{what}: dali vs torch KS p = {p:.2g}")


def check_patch_crop(family: Family, dali: Crops, torch_: Crops, report: Report) -> None:
    reads = {backend: read_patch_crop(c) for backend, c in (("dali", dali), ("torch", torch_))}
    report.share("flip_p patches", reads["dali"][0], reads["torch"][0], family.contract["flip_p"])
    check_crop_shape(report, "patch crop", family.contract["patch_scale"], reads["dali"][1:], reads["torch"][1:], False)


def check_jitter(family: Family, dali: Crops, torch_: Crops, report: Report) -> None:
    k = family.contract
    reads = {backend: read_jitter(c) for backend, c in (("dali", dali), ("torch", torch_))}
    for backend, (grey, _applied, b, _, residual) in reads.items():
        report.check((residual <= 1.5).all(), "readable", f"{backend}: {int((residual > 1.5).sum())} crops are no "
                                                          "affine map of their source colour")
        report.independent("grey independence", grey, backend)
        report.independent("jitter independence", np.where(np.isnan(b), 1.0, b), backend)
    (grey_d, applied_d, b_d, k_d, _), (grey_t, applied_t, b_t, k_t, _) = reads["dali"], reads["torch"]
    report.share("gray_p", grey_d, grey_t, k["gray_p"])
    report.share("gray_p views", grey_d[:, 0], grey_t[:, 0], k["gray_p"])
    report.share("jitter_p", applied_d[~grey_d], applied_t[~grey_t], k["jitter_p"])
    report.share("jitter_p views", applied_d[~grey_d[:, 0], 0], applied_t[~grey_t[:, 0], 0], k["jitter_p"])
    report.uniform("brightness", b_d[applied_d == 1], b_t[applied_t == 1], 1 - k["brightness"], 1 + k["brightness"],
                   0.02)
    report.uniform("contrast", k_d[applied_d == 1], k_t[applied_t == 1], 1 - k["contrast"], 1 + k["contrast"], 0.07)


def check_hue(family: Family, dali: Crops, torch_: Crops, report: Report) -> None:
    k = family.contract
    reads = {backend: read_hue(c, backend) for backend, c in (("dali", dali), ("torch", torch_))}
    for backend, (grey, _applied, _s, h) in reads.items():
        report.independent("grey independence", grey, backend)
        report.independent("hue independence", np.nan_to_num(h), backend)
    (grey_d, applied_d, s_d, h_d), (grey_t, applied_t, s_t, h_t) = reads["dali"], reads["torch"]
    report.share("gray_p", grey_d, grey_t, k["gray_p"])
    report.share("jitter_p", applied_d[~grey_d], applied_t[~grey_t], k["jitter_p"])
    on_d, on_t = applied_d == 1, applied_t == 1
    report.uniform("saturation", s_d[on_d], s_t[on_t], 1 - k["saturation"], 1 + k["saturation"], 0.05)
    report.uniform("hue", h_d[on_d], h_t[on_t], -k["hue"], k["hue"], 0.01)


def check_photometric(family: Family, dali: Crops, torch_: Crops, report: Report) -> None:
    p = family.contract["photometric_p"]
    reads = {}
    for backend, c in (("dali", dali), ("torch", torch_)):
        bits, inverted, readable, x = read_photometric(c)
        report.check(readable.all(), "readable",
                     f"{backend}: {int((~readable).sum())} crops show no posterize/solarize outcome of their grey")
        changed = (bits != 8) | inverted
        report.independent("photometric independence", changed, backend)
        reads[backend] = (bits, inverted, changed, x)
    (bits_d, inv_d, changed_d, x_d), (bits_t, inv_t, changed_t, x_t) = reads["dali"], reads["torch"]
    expect_d, p_inv_d = expected_photometric(x_d, p)
    expect_t, p_inv_t = expected_photometric(x_t, p)
    report.share("photometric_p", changed_d, changed_t, np.repeat(expect_d[:, None], 10, 1),
                 np.repeat(expect_t[:, None], 10, 1))
    report.share("photometric_p views", changed_d[:, 0], changed_t[:, 0], expect_d, expect_t)
    inverted, expected = {}, {}
    for backend, bits, inv, p_inv in (("dali", bits_d, inv_d, p_inv_d), ("torch", bits_t, inv_t, p_inv_t)):
        known = bits < 8  # applied for sure: 4..7 bits kept, 4 equally likely values
        counts = np.bincount(bits[known] - 4, minlength=4)
        z = chi_square_z(counts, np.full(4, known.sum() / 4))
        report.check(abs(z) <= Z, "posterize_bits", f"{backend} bits 4..7 counts {counts.tolist()} (z = {z:.1f})")
        inverted[backend] = inv[known]
        expected[backend] = p_inv[np.nonzero(known)[0], bits[known] - 4]  # P(t <= the posterized grey)
    report.share("solarize_threshold", inverted["dali"], inverted["torch"], expected["dali"], expected["torch"])


def check_sharpness(family: Family, dali: Crops, torch_: Crops, report: Report) -> None:
    k = family.contract
    reads = {backend: read_sharpness(c) for backend, c in (("dali", dali), ("torch", torch_))}
    for backend, (applied, _) in reads.items():
        report.independent("photometric independence", applied, backend)
    (applied_d, v_d), (applied_t, v_t) = reads["dali"], reads["torch"]
    report.share("photometric_p", applied_d, applied_t, k["photometric_p"])
    report.share("photometric_p views", applied_d[:, 0], applied_t[:, 0], k["photometric_p"])
    # v is read from pixels that PIL (so torch) truncates and DALI rounds, about 0.02 apart: a bias
    # allowance, and no KS test of the fine grain (it finds that difference from about 5000 values).
    report.uniform("sharpness", v_d[applied_d], v_t[applied_t], *k["sharpness"], 0.12, bias=0.02, ks=False)


def check_blur(family: Family, dali: Crops, torch_: Crops, report: Report) -> None:
    k = family.contract
    lo, hi = k["blur_sigma"]
    visible = 0.5  # sigma below about 0.4 barely moves a pixel: count only what can be seen
    reads = {backend: read_blur(c) for backend, c in (("dali", dali), ("torch", torch_))}
    for backend, sigma in reads.items():
        report.independent("blur independence", sigma >= visible, backend)
    s_d, s_t = reads["dali"], reads["torch"]
    share = k["blur_p"] * (hi - visible) / (hi - lo)
    report.share("blur_p", s_d >= visible, s_t >= visible, share)
    report.share("blur_p views", s_d[:, 0] >= visible, s_t[:, 0] >= visible, share)
    report.uniform("blur_sigma", s_d[s_d >= visible], s_t[s_t >= visible], visible, hi, 0.25, bias=0.01)  # fit: -0.01


OFF = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, photometric_p=0.0, gray_p=0.0, blur_p=0.0)
WHOLE = dict(image_scale=[1.0, 1.0], patch_scale=[1.0, 1.0])
FAMILIES = {f.name: f for f in [
    Family("geometry", "ramp", 2048, dict(color_aug=False, image_size=VIEW, patch_scale=[1.0, 1.0], flip_p=0.5),
           check_geometry, dict(flip_p=0.5, image_scale=(0.08, 1.0))),
    Family("patch_crop", "ramp", 1024, dict(color_aug=False, image_size=VIEW, flip_p=0.5),
           check_patch_crop, dict(flip_p=0.5, patch_scale=(0.6, 1.0))),
    Family("jitter", "jitter", 1024, {**OFF, "image_size": VIEW, "brightness": 0.4, "contrast": 0.4, "gray_p": 0.4,
                                      "jitter_p": 0.8},
           check_jitter, dict(brightness=0.4, contrast=0.4, gray_p=0.4, jitter_p=0.8)),
    Family("hue", "hue", 512, {**OFF, "image_size": VIEW, "saturation": 0.4, "hue": 0.2, "gray_p": 0.4,
                               "jitter_p": 0.8},
           check_hue, dict(saturation=0.4, hue=0.2, gray_p=0.4, jitter_p=0.8)),
    Family("photometric", "photometric", 640, {**OFF, "image_size": VIEW, "photometric_p": 0.66},
           check_photometric, dict(photometric_p=0.66)),
    Family("sharpness", "edges", 320, {**OFF, **WHOLE, "image_size": SIDE, "flip_p": 0.0, "photometric_p": 0.66,
                                       "posterize_bits": [8, 8], "solarize_threshold": [256, 256]},
           check_sharpness, dict(photometric_p=0.66, sharpness=(0.1, 1.9))),
    Family("blur", "edges", 832, {**OFF, **WHOLE, "image_size": SIDE, "flip_p": 0.0, "blur_p": 0.5},
           check_blur, dict(blur_p=0.5, blur_sigma=(0.1, 2.0))),
]}


def run_checks(datasets, family: Family, dali_changes: dict | None = None) -> Report:
    report = Report()
    family.check(family, collect(datasets, family, "dali", **(dali_changes or {})),
                 collect(datasets, family, "torch"), report)
    return report


@pytest.mark.parametrize("name", list(FAMILIES))
def test_backends_follow_the_contract(datasets, name):
    report = run_checks(datasets, FAMILIES[name])
    assert not report.failures, "\n".join(report.failures)


def mirror_coin_per_element(cfg, num_cells):
    """The bug this file was written after: patch_matrices as it was, a mirror coin per element."""
    from nvidia.dali import fn, types

    base, shift, flip = (np.zeros((num_cells, 2, 3), np.float32) for _ in range(3))
    base[:, 0, 0] = base[:, 1, 1] = 1.0
    shift[:, :, 2] = 1.0
    flip[:, 0, 0], flip[:, 0, 2] = -2.0, float(cfg.patch_size)
    slack = cfg.patch_crop_size // cfg.grid - cfg.patch_size
    offsets = fn.random.uniform(values=[float(v) for v in range(slack + 1)], shape=[num_cells, 2, 3])
    flips = fn.cast(fn.random.coin_flip(probability=cfg.flip_p, shape=[num_cells, 2, 3]), dtype=types.FLOAT)
    return types.Constant(base) + offsets * types.Constant(shift) + flips * types.Constant(flip)


@pytest.mark.parametrize("family,changes,check", [
    ("geometry", {"flip_p": 0.55}, "flip_p patches"),
    ("jitter", {"gray_p": 0.44}, "gray_p"),
    ("jitter", {"jitter_p": 0.88}, "jitter_p"),
    ("jitter", {"brightness": 0.44}, "brightness"),
    ("hue", {"hue": 0.22}, "hue"),
    ("photometric", {"photometric_p": 0.726}, "photometric_p"),
    ("sharpness", {"sharpness": [0.01, 1.99]}, "sharpness"),
    ("blur", {"blur_p": 0.55}, "blur_p"),
    ("geometry", {"mirror_bug": True}, "windows"),
])
def test_a_wrong_draw_is_caught(datasets, monkeypatch, family, changes, check):
    """The same checks, with the DALI side run 10% off in one probability or range (or with the
    per-element mirror coin): the check for it must fail."""
    changes = dict(changes)
    if changes.pop("mirror_bug", False):
        import dali_pipelines.pirl as pirl

        monkeypatch.setattr(pirl, "patch_matrices", mirror_coin_per_element)
        changes["seed"] = 1  # a cache key of its own
    report = run_checks(datasets, FAMILIES[family], changes)
    assert report.named(check), f"a 10% error in {changes} went unnoticed; failures: {report.failures}"
