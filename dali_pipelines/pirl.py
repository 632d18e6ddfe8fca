"""The PIRL input pipeline in DALI: WebDataset shards -> (image view, 9 patches, index, label).

One definition builds both graphs: with `device_id` an int, JPEGs are decoded with
device="mixed" (nvJPEG) and every augmentation runs on the GPU; with `device_id=None` the same
graph runs on the CPU (tests, CPU-only machines, the CPU throughput benchmark).

Per sample (S = image_size, C = patch_crop_size, G = grid, c = C // G, P = patch_size):
    jpeg ──decode (once, shared by both views)──▶ (H, W, 3) uint8
      image view: random_resized_crop S (image_scale) → colour twist (+grey) → flip → normalise
                  ─▶ images  (S, S, 3) float32, HWC
      patch view: random_resized_crop C (patch_scale) ─▶ (C, C, 3)
                  → reshape/transpose into its 9 cells (9, c, c, 3), row-major
                  → warp_affine with 9 per-frame matrices: frame k is a P×P crop of cell k at
                    its own random integer offset in [0, c - P], mirrored on its own coin with
                    probability flip_p (the mirror folded into the matrix) ─▶ (9, P, P, 3)
                  → colour twist (+grey) drawn per frame → normalise
                  ─▶ patches (9, P, P, 3) float32, FHWC, frames in cell order
      index, label: int64 scalars read from KEY.idx / KEY.lbl, shape (1,)

Channels stay last (HWC / FHWC), so a torch view (B, H, W, 3).permute(0, 3, 1, 2) is already
channels_last-strided: no copy between DALI and the model. Patches leave DALI in cell order; the
random presentation order is applied by the loader (pirl_fast.data.PatchOrder).

Why one full decode for both views: on the CPU (400-500 px JPEGs, 2 threads) decode + two
random_resized_crops cost 3.9 CPU-ms per sample against 4.6 for two ROI decodes
(fn.decoders.image_random_crop) + two resizes; on the GPU the decoder engine is the scarce part.
The colour twists cost about 2.1 CPU-ms per sample, the patch cut and normalisation about 0.8.

Colour jitter, mapped from torchvision's ColorJitter(b, c, s, h) to one fn.color_twist:
    brightness ~ U[1-b, 1+b], contrast ~ U[1-c, 1+c], saturation ~ U[1-s, 1+s] (multipliers, as
    torchvision); hue: torchvision's h is a fraction of the colour circle, DALI's hue is in
    degrees, so hue ~ U[-360h, +360h] degrees (h = 0.2 -> ±72°). Differences: color_twist applies
    the four in one fixed order (torchvision shuffles the order) and contrast pivots on a fixed
    grey (contrast 0 gives a uniform grey image), not on the image's mean grey.
Greyscale with probability gray_p keeps 3 channels: saturation is multiplied by 0 for those
    samples, which removes all chroma in YIQ space; Y = 0.299 R + 0.587 G + 0.114 B, torchvision's
    rgb_to_grayscale weights. Grey is applied after the jitter, as in torchvision's pipeline.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types

# ImageNet statistics, on the 0-255 scale DALI's uint8 images are in.
IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
# torchvision's RandomResizedCrop default aspect-ratio range.
ASPECT_RATIO = [3 / 4, 4 / 3]
READER_NAME = "Reader"


def grid_cells(crop, cfg):
    """(C, C, 3) crop -> (G*G, c, c, 3) sequence of its grid cells, row-major, layout FHWC.

    A reshape-transpose-reshape: one copy of the crop, instead of stacking 9 copies of it to give
    warp_affine a sequence to apply per-frame matrices to (DALI does not expand an HWC input).
    """
    g, cell = cfg.grid, cfg.patch_crop_size // cfg.grid
    blocks = fn.reshape(crop, shape=[g, cell, g, cell, 3], layout="")  # (row, y, col, x, C)
    blocks = fn.transpose(blocks, perm=[0, 2, 1, 3, 4])  # (row, col, y, x, C)
    return fn.reshape(blocks, shape=[g * g, cell, cell, 3], layout="FHWC")  # (9, c, c, 3)


def patch_matrices(cfg, num_cells: int):
    """Per-sample (num_cells, 2, 3) destination->source affine matrices, one per grid cell.

    Frame k crops P×P pixels from cell k at an integer offset (ox, oy), each drawn uniformly from
    [0, c - P], mirrored horizontally on its own coin f ~ Bernoulli(flip_p):
        x_src = s·x + ox + f·P,  y_src = y + oy,  s = 1 - 2f.
    One coin per patch and one offset per patch and axis, broadcast over the matrix elements they
    set (a coin per element would give a patch's scale and shift different coins). Integer
    translations and unit scale put every destination pixel centre on a source pixel centre, so
    nearest-neighbour sampling is an exact crop (and an exact mirror).
    """
    slack = cfg.patch_crop_size // cfg.grid - cfg.patch_size  # 85 - 64 = 21: offset range in a cell
    base = np.zeros((num_cells, 2, 3), np.float32)
    base[:, 0, 0] = 1.0  # identity scale
    base[:, 1, 1] = 1.0
    translation_mask = np.zeros_like(base)
    translation_mask[:, :, 2] = 1.0  # row 0 gets ox, row 1 gets oy, in the translation column
    flip_mask = np.zeros_like(base)
    flip_mask[:, 0, 0] = -2.0  # s = 1 - 2f
    flip_mask[:, 0, 2] = float(cfg.patch_size)  # shift so the mirrored patch covers the same pixels

    offsets = fn.random.uniform(values=[float(v) for v in range(slack + 1)], shape=[num_cells, 2, 1])  # (9, 2, 1)
    matrices = types.Constant(base) + offsets * types.Constant(translation_mask)  # (9, 2, 3)
    if cfg.flip_p > 0:
        flips = fn.cast(fn.random.coin_flip(probability=cfg.flip_p, shape=[num_cells, 1, 1]), dtype=types.FLOAT)  # (9,1,1)
        matrices = matrices + flips * types.Constant(flip_mask)
    return matrices


def colour_twist(images, cfg, frames: int | None = None):
    """Colour jitter + greyscale, drawn per sample (frames=None) or per frame of a sequence."""
    shape = [] if frames is None else [frames]

    def draw(op):  # a per-sample scalar, or a per-frame (frames,) vector marked as per-frame
        return op if frames is None else fn.per_frame(op)

    def around_one(strength):
        return fn.random.uniform(range=[1.0 - strength, 1.0 + strength], shape=shape)

    grey = fn.cast(fn.random.coin_flip(probability=cfg.gray_p, shape=shape), dtype=types.FLOAT)
    saturation = around_one(cfg.saturation) * (1.0 - grey)  # grey samples: saturation 0
    hue_degrees = 360.0 * cfg.hue
    return fn.color_twist(
        images,
        brightness=draw(around_one(cfg.brightness)),
        contrast=draw(around_one(cfg.contrast)),
        saturation=draw(saturation),
        hue=draw(fn.random.uniform(range=[-hue_degrees, hue_degrees], shape=shape)),
    )


@pipeline_def(enable_conditionals=False)
def pirl_pipeline(tar_paths: list[str], index_paths: list[str], cfg, shard_id: int, num_shards: int,
                  gpu: bool):
    """Build with pirl_pipeline(tar_paths, index_paths, cfg, shard_id, num_shards, gpu,
    batch_size=per_rank, num_threads=cfg.workers, device_id=(cuda index | None), seed=...).

    Returns (images (B,S,S,3) f32, patches (B,9,P,P,3) f32, index (B,1) i64, label (B,1) i64).
    """
    num_cells = cfg.grid * cfg.grid
    jpegs, index, label = fn.readers.webdataset(
        paths=tar_paths,
        index_paths=index_paths,
        ext=["jpg", "idx", "lbl"],
        dtypes=[types.UINT8, types.INT64, types.INT64],
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        # Samples were shuffled globally when the shards were written; the buffer mixes locally
        # and shuffle_after_epoch reorders the tar files each epoch (same seed on all ranks, so
        # the ranks still partition the dataset).
        random_shuffle=True,
        initial_fill=cfg.shuffle_buffer,
        shuffle_after_epoch=True,
        shuffle_after_epoch_seed=cfg.seed,
        # Every rank pads its part by repeating samples up to ceil(N / global_batch) batches.
        pad_last_batch=True,
        name=READER_NAME,
    )
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)

    # Image view.
    view = fn.random_resized_crop(images, size=[cfg.image_size, cfg.image_size],
                                  random_area=list(cfg.image_scale), random_aspect_ratio=ASPECT_RATIO)
    if cfg.color_aug:
        view = colour_twist(view, cfg)
    mirror = fn.random.coin_flip(probability=cfg.flip_p) if cfg.flip_p > 0 else 0
    view = fn.crop_mirror_normalize(view, mirror=mirror, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                    dtype=types.FLOAT, output_layout="HWC")  # (S, S, 3)

    # Patch view: its own crop of the same decoded image, then 9 crops in one warp.
    crop = fn.random_resized_crop(images, size=[cfg.patch_crop_size, cfg.patch_crop_size],
                                  random_area=list(cfg.patch_scale), random_aspect_ratio=ASPECT_RATIO)
    patches = fn.warp_affine(grid_cells(crop, cfg), matrix=fn.per_frame(patch_matrices(cfg, num_cells)),
                             size=[cfg.patch_size, cfg.patch_size],
                             interp_type=types.INTERP_NN)  # (9, P, P, 3) uint8, exact crops
    if cfg.color_aug:
        patches = colour_twist(patches, cfg, frames=num_cells)
    patches = fn.crop_mirror_normalize(patches, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                       dtype=types.FLOAT, output_layout="FHWC")  # (9, P, P, 3)
    return view, patches, index, label
