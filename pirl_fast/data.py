"""The loader layer: one batch contract (`Batch`) for every backend, built by `build_loader`.

Backends (DataConfig.backend):
    dali       dali_pipelines/pirl.py: GPU decode + augment when the device is CUDA, the same graph
               on the CPU otherwise (pirl_fast/loader_dali.py)
    torch      the `webdataset` library + torchvision transforms v2 in DataLoader workers, the same
               augmentations; the fallback without DALI and the baseline (pirl_fast/loader_torch.py)
    synthetic  random tensors made on the device, for compute-only timing (loader_synthetic.py)

The epoch, corrupt-sample and patch-order contract every backend keeps: pirl_fast/batch.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Union

import torch

from pirl_fast.batch import OUTPUT_DTYPES, PIRLLoader
from pirl_fast.cpus import cpus_per_rank
from pirl_fast.shard_format import Manifest, check_shard_files, load_manifest
from pirl_fast.splits import resolve_shards

BACKENDS = ("dali", "torch", "synthetic")  # what build_loader builds; data.backend may also say "auto"
DALI_INSTALL = "pip install nvidia-dali-cuda130"  # pyproject.toml's pin; the CPU graph needs no GPU
ON_CORRUPT = ("error", "skip")


@dataclass
class DataConfig:
    """Hydra structured config of the data group (plain int/float/str/bool/list fields only)."""

    shards: str = "???"  # shard directory, or a dataset root's (its train split is read); ignored by synthetic
    backend: str = "auto"  # auto (dali where NVIDIA DALI imports, else torch, with a notice) | dali | torch | synthetic
    batch_size: int = 256  # GLOBAL batch over all ranks; per rank = batch_size // world_size
    # DALI CPU threads / DataLoader workers, per rank. auto: this process's CPU cores divided by the ranks
    # torchrun started on this node (cpus.cpus_per_rank); a number overrides it (0: torch loads in-process)
    workers: Union[int, str] = "auto"
    image_size: int = 224
    image_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random_resized_crop area
    patch_crop_size: int = 255  # the patch view's crop, cut into grid x grid cells (must divide)
    patch_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    grid: int = 3  # 3x3 cells of patch_crop_size // grid (85) px
    patch_size: int = 64  # one patch per cell, at a random offset inside it
    # The augmentation contract (dali_pipelines/pirl.py's docstring): per crop, in this order,
    # colour jitter -> photometric -> greyscale -> blur -> mirror, every draw per crop.
    brightness: float = 0.4  # jitter factors ~ U[1-x, 1+x) (the paper's 0.4, 0.4, 0.4)
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.2  # h ~ U[-hue, hue) of the colour circle (torchvision units; DALI gets 360*h degrees)
    jitter_p: float = 1.0  # the jitter's probability (1: always, as the paper; the improved recipe 0.8)
    photometric_p: float = 0.66  # posterize+sharpness+solarize+autocontrast together (the reference's p)
    posterize_bits: list[int] = field(default_factory=lambda: [4, 8])  # bits kept ~ U{4..8}
    sharpness: list[float] = field(default_factory=lambda: [0.1, 1.9])  # factor ~ U[0.1, 1.9)
    solarize_threshold: list[int] = field(default_factory=lambda: [0, 256])  # t ~ U{0..256}; 256 = never
    gray_p: float = 0.2
    blur_p: float = 0.0  # Gaussian blur (the improved recipe's 0.5); off in the paper's recipe
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # sigma ~ U[0.1, 2.0) px
    flip_p: float = 0.5
    color_aug: bool = True  # off -> none of jitter, photometric, greyscale, blur (geometry tests)
    num_permutations: int = 0  # 0: any of 9! orders; P > 0: a fixed max-Hamming set of P
    shuffle_buffer: int = 4096  # DALI initial_fill / shuffle buffer, samples
    synthetic_samples: int = 10000  # dataset size the synthetic backend pretends to have
    seed: int = 0
    prefetch: int = 2  # batches prepared ahead: DALI prefetch_queue_depth / DataLoader prefetch_factor
    verify_sha256: bool = False  # hash every shard at start-up (minutes for ImageNet; sizes are always checked)
    on_corrupt: str = "error"  # a sample failing its decode or checksum: error (stop, naming it) | skip (count it)
    output_dtype: str = "float32"  # the views' dtype, every backend: float32 | float16 (half the bytes into the model)
    # DALI's GPU JPEG decoder (device="mixed"; ignored by the CPU graph and the other backends). DALI's
    # defaults; what to try on which GPU is in conf/data/imagenet.yaml, `bench loader` measures it.
    hw_decoder_load: float = 0.65  # share of the JPEGs sent to the hardware decoder (A100, H100, H200)
    device_memory_padding: int = 16777216  # bytes of nvJPEG device buffer per thread (16 MiB)
    host_memory_padding: int = 8388608  # bytes of nvJPEG pinned host buffer per thread, twice (8 MiB)
    preallocate_width_hint: int = 0  # px: the hardware decoder preallocates for images this wide (0: no hint)
    preallocate_height_hint: int = 0  # px: and this high


class BackendUnavailable(ImportError):
    """data.backend names a loader whose library is not installed; the message says how to get it."""


def resolve_backend(backend: str) -> tuple[str, str | None]:
    """(the backend to build, a one-line notice or None). "auto" is dali where NVIDIA DALI imports (the
    GPU graph on CUDA, its CPU graph otherwise), else torch with a notice saying so; an explicit "dali"
    without DALI raises BackendUnavailable, naming the fix."""
    if backend not in ("auto", "dali"):
        return backend, None
    from pirl_fast.loader_dali import dali_import_error  # here: importing loader_dali imports DALI

    error = dali_import_error()
    if error is None:
        return "dali", None
    if backend == "dali":
        raise BackendUnavailable(f"data.backend=dali but NVIDIA DALI does not import here ({error}): {DALI_INSTALL}, "
                                 "or use data.backend=auto (DALI where installed, else torch) or data.backend=torch")
    return "torch", (f"data.backend=auto: NVIDIA DALI does not import here ({error}), so the torch backend loads "
                     f"the data (webdataset + torchvision workers; {DALI_INSTALL} for the fast path)")


def resolve_workers(workers: int | str) -> int:
    """data.workers as a number: "auto" is cpus.cpus_per_rank()."""
    if workers == "auto":
        return cpus_per_rank()
    if isinstance(workers, int) or str(workers).isdigit():
        return int(workers)
    raise ValueError(f"data.workers={workers!r} is neither auto nor a number: use auto (the CPU cores per rank) or a "
                     "number of workers >= 0")


def check_config(cfg: DataConfig, world_size: int) -> int:
    """Validate `cfg` for `world_size` ranks; returns the per-rank batch size."""
    if cfg.backend not in ("auto", *BACKENDS):
        raise ValueError(f"data.backend={cfg.backend!r} is not one of auto, {', '.join(BACKENDS)}")
    if cfg.on_corrupt not in ON_CORRUPT:
        raise ValueError(f"data.on_corrupt={cfg.on_corrupt!r} is not one of {', '.join(ON_CORRUPT)}")
    if cfg.output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"data.output_dtype={cfg.output_dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    for name, low, high, example in SIZES_AND_RATES:
        value = getattr(cfg, name)
        if not low <= value <= high:
            valid = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise ValueError(f"data.{name}={value} is out of range: it must be {valid} ({example})")
    if world_size < 1 or cfg.batch_size % world_size or cfg.batch_size < world_size:
        raise ValueError(f"data.batch_size={cfg.batch_size} (global) must be a positive multiple of the world "
                         f"size {world_size}")
    if resolve_workers(cfg.workers) < (1 if cfg.backend == "dali" else 0):
        raise ValueError(f"data.workers={cfg.workers} is out of range: it must be >= 1 for DALI (its CPU threads) "
                         "and >= 0 for torch (0: load in this process); auto gives the CPU cores per rank")
    if cfg.patch_crop_size % cfg.grid:
        raise ValueError(f"data.patch_crop_size={cfg.patch_crop_size} must be divisible by data.grid={cfg.grid} "
                         f"(e.g. 255 for a 3x3 grid of 85 px cells)")
    if cfg.patch_crop_size // cfg.grid < cfg.patch_size:
        raise ValueError(f"data.patch_size={cfg.patch_size} does not fit in a {cfg.patch_crop_size // cfg.grid} px "
                         f"cell (patch_crop_size / grid)")
    for name in ("image_scale", "patch_scale"):
        lo, hi = getattr(cfg, name)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.{name}={[lo, hi]} must satisfy 0 < min <= max <= 1")
    check_augmentation(cfg)
    return cfg.batch_size // world_size


# (key, lowest, highest, an example of a valid value) checked by check_config; sizes are pixels.
SIZES_AND_RATES = (
    ("image_size", 1, math.inf, "224 in the paper"), ("patch_crop_size", 1, math.inf, "255: a 3x3 grid of 85 px"),
    ("grid", 1, math.inf, "3 for the 3x3 jigsaw"), ("patch_size", 1, math.inf, "64: one patch per 85 px cell"),
    ("shuffle_buffer", 1, math.inf, "4096"), ("prefetch", 1, math.inf, "2"),
    ("synthetic_samples", 1, math.inf, "10000"),
    ("num_permutations", 0, math.inf, "0: any order, or 1000"),
    ("hw_decoder_load", 0, 1, "a share of the JPEGs; DALI's default 0.65"),
    ("device_memory_padding", 0, math.inf, "bytes; DALI's default 16777216"),
    ("host_memory_padding", 0, math.inf, "bytes; DALI's default 8388608"),
    ("preallocate_width_hint", 0, math.inf, "px; 0: no hint, 5980 for ImageNet's widest JPEG"),
    ("preallocate_height_hint", 0, math.inf, "px; 0: no hint, 6430 for ImageNet's highest JPEG"),
)  # data.workers (auto or a number): below; the augmentation keys' ranges: check_augmentation


def check_augmentation(cfg: DataConfig) -> None:
    """The augmentation keys' ranges (the contract in dali_pipelines/pirl.py); raises ValueError."""
    for name in ("jitter_p", "photometric_p", "gray_p", "blur_p", "flip_p"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"data.{name}={getattr(cfg, name)} is out of range: it must be in [0, 1] (a probability)")
    for name in ("brightness", "contrast", "saturation"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"data.{name}={getattr(cfg, name)} must be >= 0 (the factor is drawn from "
                             f"[max(0, 1 - x), 1 + x); the paper uses 0.4)")
    if not 0 <= cfg.hue <= 0.5:
        raise ValueError(f"data.hue={cfg.hue} is out of range: it must be in [0, 0.5] "
                         f"(a fraction of the colour circle; the paper uses 0.2)")
    ranges = {"posterize_bits": (1, 8, "integers of bits kept, e.g. [4, 8]"),
              "sharpness": (0, float("inf"), "factors, e.g. [0.1, 1.9]"),
              "solarize_threshold": (0, 256, "integer thresholds, e.g. [0, 256] (256 never inverts)"),
              "blur_sigma": (1e-3, float("inf"), "Gaussian sigmas in pixels, e.g. [0.1, 2.0]")}
    for name, (least, most, what) in ranges.items():
        value = getattr(cfg, name)
        if len(value) != 2 or not least <= value[0] <= value[1] <= most:
            raise ValueError(f"data.{name}={list(value)} must be [min, max] with {least} <= min <= max <= {most}: {what}")


def check_shards(cfg: DataConfig) -> Manifest:
    """Load the manifest and check every shard before any reader opens it, so errors are ours
    (shard_format.check_shard_files; with cfg.verify_sha256 the tars' SHA-256 too). A dataset
    root's shards (cfg.shards/train, cfg.shards/val, ...) mean their train split (splits.py)."""
    manifest = load_manifest(resolve_shards(cfg.shards, "train").dir)
    check_shard_files(manifest, cfg.verify_sha256,
                      fix=f"re-run `python -m pirl_fast.shard SRC {cfg.shards}` (or restore the file from a copy)")
    return manifest


def build_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> PIRLLoader:
    """The loader for this rank: `len()` batches of cfg.batch_size // world_size samples per epoch.

    data.backend=auto and data.workers=auto are resolved here (the trainer resolves the backend
    earlier, to say which it chose)."""
    cfg = dataclasses.replace(cfg, backend=resolve_backend(cfg.backend)[0], workers=resolve_workers(cfg.workers))
    per_rank = check_config(cfg, world_size)
    device = torch.device(device)
    if cfg.backend == "synthetic":
        from pirl_fast.loader_synthetic import SyntheticLoader

        return SyntheticLoader(cfg, per_rank, rank, world_size, device)
    manifest = check_shards(cfg)
    if cfg.backend == "dali":
        from pirl_fast.loader_dali import DaliLoader

        return DaliLoader(cfg, manifest, per_rank, rank, world_size, device)
    from pirl_fast.loader_torch import TorchLoader

    return TorchLoader(cfg, manifest, per_rank, rank, world_size, device)
