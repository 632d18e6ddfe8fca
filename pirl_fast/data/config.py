"""The data keys (`DataConfig`, Hydra's `data:` group) and their checks: what every loader reads.

Every default is the dataclass field's; the yaml files under pirl_fast/train/conf/ hold only what
an experiment changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

from pirl_fast.data.batch import OUTPUT_DTYPES
from pirl_fast.data.permutations import PERMUTATION_SETS
from pirl_fast.runtime.cpus import cpus_per_rank

PATCH_VIEWS = ("pirl", "jigsaw")  # data.patch_view
PATCH_OFFSETS = ("full", "reference")  # data.patch_offsets
BACKENDS = ("dali", "torch", "synthetic")  # what build_loader builds; data.backend may also say "auto"
ON_CORRUPT = ("error", "skip")


@dataclass
class DataConfig:
    """Hydra structured config of the data group (plain int/float/str/bool/list fields only).

    The defaults are the paper's ImageNet recipe (conf/data/imagenet.yaml selects them by name).
    """

    # The shard folder (`python -m pirl_fast.shard SRC DIR`, holds manifest.json), or a dataset root's
    # (its train split is read); required unless backend=synthetic
    shards: str = "???"
    # auto: dali where NVIDIA DALI imports (GPU decode+crop; its CPU graph without CUDA), else torch with a
    # notice | dali (an error without DALI) | torch (PIL workers) | synthetic (compute only)
    backend: str = "auto"
    batch_size: int = 256  # GLOBAL batch over all ranks; per rank = batch_size // world_size (must divide evenly)
    # DALI CPU threads / DataLoader workers, per rank. auto: this process's CPU cores divided by the ranks
    # torchrun started on this node (cpus.cpus_per_rank); a number overrides it (0: torch loads in-process;
    # the torch backend needs ~8-12 per GPU)
    workers: Union[int, str] = "auto"  # noqa: UP007 (OmegaConf reads typing.Union, not int | str)
    image_size: int = 224  # the image view: a random resized crop to 224x224
    image_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random_resized_crop area
    patch_crop_size: int = 255  # the patch view: a random resized crop cut into grid x grid cells (must divide)
    patch_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    grid: int = 3  # 3x3 cells of patch_crop_size // grid (85) px
    patch_size: int = 64  # one 64x64 patch per cell at its own random offset (must be <= the 85 px cell)
    # How the patch crop is made (the contract in dali_pipelines/pirl.py): pirl (the reference's PIRL,
    # ImgPilToPatchesAndImage: a random resized crop of patch_scale; colour steps and mirror per patch) | jigsaw
    # (the reference's Jigsaw, configs/config/pretrain/jigsaw/jigsaw_8gpu_resnet.yaml: Resize(patch_resize) of
    # the shorter side, RandomCrop(patch_crop_size); colour steps and mirror once, for the whole crop)
    patch_view: str = "pirl"
    patch_resize: int = 256  # patch_view=jigsaw: the shorter side before the crop (the reference: 256, then 255)
    # Offsets of a patch in its cell of c = patch_crop_size // grid px: full: U{0..c-P} (every column reachable)
    # | reference: U{0..c-P-1}, vissl/data/ssl_transforms/img_patches_tensor.py's np.random.randint(0, patch_jitter)
    # with patch_size = c - patch_jitter (85 - 21 = 64), in PIRL and Jigsaw alike
    patch_offsets: str = "full"
    # The augmentation contract (dali_pipelines/pirl.py's docstring, with the ranges and the backends'
    # differences): per crop (the view and each patch), in this order, colour jitter -> photometric ->
    # greyscale -> blur -> mirror, every draw per crop. Values: vissl
    # configs/config/pretrain/pirl/pirl_jigsaw_4node_resnet50.yaml unless said otherwise.
    brightness: float = 0.4  # 1. ColorJitter(0.4, 0.4, 0.4, hue 0.2): factors ~ U[1-x, 1+x)
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.2  # h ~ U[-hue, hue) of the colour circle (torchvision units; DALI gets 360*h degrees)
    jitter_p: float = 1.0  # always: ColorJitter is not wrapped in a RandomApply there (the improved recipe: 0.8)
    # 2. ImgPilRandomPhotometric: posterize+sharpness+solarize+autocontrast together; no p given there, so its
    # from_config default 0.66 (vissl/data/ssl_transforms/img_pil_random_photometric.py). The three ranges:
    # vissl/data/ssl_transforms/pil_photometric_transforms_lib.py
    photometric_p: float = 0.66
    posterize_bits: list[int] = field(default_factory=lambda: [4, 8])  # RandomPosterizeTransform: bits kept ~ U{4..8}
    sharpness: list[float] = field(default_factory=lambda: [0.1, 1.9])  # RandomSharpnessTransform: ~ U[0.1, 1.9)
    # RandomSolarizeTransform: ImageOps.solarize threshold t ~ U{0..256}, both ends included; 256 = never
    solarize_threshold: list[int] = field(default_factory=lambda: [0, 256])
    gray_p: float = 0.2  # 3. RandomGrayscale(p=0.2)
    blur_p: float = 0.0  # 4. Gaussian blur: none in the paper's recipe (the improved recipe's ImgPilGaussianBlur: 0.5)
    # its radius_min, radius_max: sigma ~ U[0.1, 2.0) px (PIL's GaussianBlur radius is the sigma)
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    flip_p: float = 0.5  # 5. RandomHorizontalFlip (torchvision's default p)
    color_aug: bool = True  # false: none of steps 1-4 (geometry checks)
    num_permutations: int = 0  # 0: any of 9! orders per sample; P > 0: a fixed max-Hamming set of P orders
    # P > 0: the greedy rule that picks the set (pirl_fast/data/permutations.py): max_min | max_avg (the reference's
    # hamming_perms_2000_patches_9_max_avg.npy, vissl extra_scripts/generate_jigsaw_permutations.py --method max_avg)
    permutation_set: str = "max_min"
    shuffle_buffer: int = 4096  # DALI / webdataset shuffle buffer, samples (the shards are shuffled when written)
    synthetic_samples: int = 10000  # dataset size the synthetic backend pretends to have
    seed: int = 0
    prefetch: int = 2  # batches prepared ahead: DALI prefetch_queue_depth / DataLoader prefetch_factor
    verify_sha256: bool = False  # hash every shard at start-up: minutes for ImageNet (sizes and index files always)
    on_corrupt: str = "error"  # a sample failing its decode or checksum: error (stop, naming it) | skip (count it)
    # The views' dtype on every backend: float32 | float16. float16 halves the bytes from DALI into the model
    # (on CUDA the model runs bf16 autocast anyway; the normalised pixels, steps of 1/(255*0.229) ~ 0.017, fit
    # float16's 11-bit mantissa). Worth trying on any GPU (bench step --data output_dtype=float16); on the CPU
    # the fp32 model casts the views back, so only the loader's memory shrinks.
    output_dtype: str = "float32"
    # DALI's GPU JPEG decoder (backend=dali on CUDA, device="mixed"; the CPU graph and the other backends
    # ignore these). Defaults are DALI's own; the ImageNet sizes quoted come from DALI's ResNet-50 example
    # (docs/examples/use_cases/pytorch/resnet50/main.py). Measure, don't guess: `python -m pirl_fast.bench
    # loader` sweeps hw_decoder_load on a GPU (--hw-decoder-loads 0 0.5 0.65 0.8 0.9 1).
    # Share of the JPEGs for the hardware decoder. A100, H100, H200 have one (H100/H200: 7 NVJPG engines,
    # A100: 5 cores): try 0.5-0.9; the best value depends on how many CPU threads (workers) decode the rest.
    # GPUs without one (V100, T4, most RTX) ignore it.
    hw_decoder_load: float = 0.65
    # Bytes of nvJPEG device buffer per thread (16 MiB). ImageNet's largest JPEG needs 211025920 to never
    # reallocate: try it on any GPU with memory to spare (H100/H200: yes), per DALI thread.
    device_memory_padding: int = 16777216
    # Bytes of nvJPEG pinned host buffer per thread, twice (8 MiB). ImageNet: 140544512; with 16 threads
    # that is ~4.5 GB of pinned host memory.
    host_memory_padding: int = 8388608
    # px: the hardware decoder (A100/H100/H200 only) preallocates for images this wide and this high
    # (0: no hint). ImageNet's largest image is 5980 x 6430.
    preallocate_width_hint: int = 0
    preallocate_height_hint: int = 0


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
    for name, value, choices in (("patch_view", cfg.patch_view, PATCH_VIEWS),
                                 ("patch_offsets", cfg.patch_offsets, PATCH_OFFSETS),
                                 ("permutation_set", cfg.permutation_set, PERMUTATION_SETS)):
        if value not in choices:
            raise ValueError(f"data.{name}={value!r} is not one of {', '.join(choices)}")
    if cfg.patch_offsets == "reference" and cfg.patch_crop_size // cfg.grid == cfg.patch_size:
        raise ValueError(f"data.patch_offsets=reference draws offsets in U{{0..c-P-1}}, empty for a patch_size of "
                         f"{cfg.patch_size} filling its cell: use a smaller patch_size or data.patch_offsets=full")
    if cfg.patch_view == "jigsaw" and cfg.patch_resize < cfg.patch_crop_size:
        raise ValueError(f"data.patch_resize={cfg.patch_resize} is below data.patch_crop_size={cfg.patch_crop_size}: "
                         "the jigsaw view crops patch_crop_size from the image resized to patch_resize (256 and 255)")
    for name in ("image_scale", "patch_scale"):
        lo, hi = getattr(cfg, name)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.{name}={[lo, hi]} must satisfy 0 < min <= max <= 1")
    check_augmentation(cfg)
    return cfg.batch_size // world_size


# (key, lowest, highest, an example of a valid value) checked by check_config; sizes are pixels.
SIZES_AND_RATES = (
    ("image_size", 1, math.inf, "224 in the paper"), ("patch_crop_size", 1, math.inf, "255: a 3x3 grid of 85 px"),
    ("grid", 1, math.inf, "3 for the 3x3 jigsaw"), ("patch_resize", 1, math.inf, "256 for a 255 px crop"),
    ("patch_size", 1, math.inf, "64: one patch per 85 px cell"),
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
            raise ValueError(f"data.{name}={list(value)} must be [min, max] with {least} <= min <= max <= {most}: "
                             f"{what}")
