"""The PIRL input pipeline in DALI: WebDataset shards -> (image view, 9 patches, index, label),
and the augmentation contract that every loader backend follows.

One definition builds both graphs: with `device_id` an int, JPEGs are decoded with
device="mixed" (nvJPEG) and every augmentation runs on the GPU; with `device_id=None` the same
graph runs on the CPU (tests, CPU-only machines, the CPU throughput benchmark).

THE AUGMENTATION CONTRACT (data.* keys; pirl_fast/data/torch_transforms.py is the torchvision version,
tests/test_augment_contract.py reads the draws back from the pixels of both backends)
---------------------------------------------------------------------------------------------
U[a, b) is a continuous uniform draw, U{a..b} a uniform integer draw with both ends included,
B(p) a coin that is 1 with probability p. Every draw is independent of every other: between
samples, between the image view and the patch crop, between the 9 patches, between the steps
of one crop, and between x and y.

Per sample, one decode, then two crops of the decoded image:
  image view  random resized crop to S x S (S = image_size): area fraction ~ U[image_scale],
              aspect w/h with log(w/h) ~ U[log 3/4, log 4/3) (torchvision's rule: up to 10 tries,
              then a centre crop)
  patch crop  its own random resized crop to C x C (C = patch_crop_size, area ~ U[patch_scale]),
              cut into a G x G grid of cells of c = C // G px (row-major); in cell k one P x P
              patch (P = patch_size) at offsets ox_k ~ U{0..c-P}, oy_k ~ U{0..c-P}
Per crop (the view and each of the 9 patches, each with its own draws), in this order (the
reference's: vissl configs/config/pretrain/pirl/pirl_jigsaw_4node_resnet50.yaml lists
ColorJitter, ImgPilRandomPhotometric, RandomGrayscale, RandomHorizontalFlip):
  1. colour jitter, with probability jitter_p (the improved recipe's RandomApply):
       brightness b ~ U[max(0, 1-brightness), 1+brightness)   multiply
       contrast   k ~ U[max(0, 1-contrast), 1+contrast)       blend with the crop's mean grey
       saturation s ~ U[max(0, 1-saturation), 1+saturation)   blend with the pixel's grey
       hue        h ~ U[-hue, hue) of the colour circle       rotate the hue by 360h degrees
  2. photometric, with probability photometric_p, all four in this order (vissl
     vissl/data/ssl_transforms/img_pil_random_photometric.py: RandomApply of the list, and
     pil_photometric_transforms_lib.py for each op and its range):
       posterize  keep the top n ~ U{posterize_bits} bits of each channel           ([4, 8])
       sharpness  v ~ U[sharpness): blend with the 3x3 smoothed image,
                  out = smooth + v (in - smooth)                                     ([0.1, 1.9))
       solarize   t ~ U{solarize_threshold}: values >= t become 255 - value          ([0, 256])
       autocontrast  per channel, stretch [min, max] of the crop to [0, 255] (floor)
  3. greyscale with probability gray_p: Y = 0.299 R + 0.587 G + 0.114 B in all three channels
  4. Gaussian blur with probability blur_p: sigma ~ U[blur_sigma), a (2 ceil(3 sigma) + 1)-tap
     Gaussian, reflected borders (vissl ImgPilGaussianBlur, radius = sigma, in the improved recipe)
  5. horizontal mirror with probability flip_p
  6. normalise with the ImageNet mean and std
color_aug=false turns off steps 1-4 (geometry tests). A probability of 0 removes its step from
the graph.

Where the backends differ, on purpose (each difference is in the contract and in its test):
  - Jitter order. torchvision applies the four jitter ops in a random order per crop, clamping
    to [0, 255] after each; DALI applies hue + saturation as one linear colour map, then
    contrast + brightness as one affine map. Brightness, contrast about the mean grey and
    saturation about the pixel's grey commute exactly, and DALI's hue rotation keeps the grey
    value, so before clamping the order changes nothing in DALI's model; torchvision's HSV hue
    does not commute with the others. Shuffling in DALI would cost four masked colour passes per
    crop (about 4x the colour cost of the CPU graph) for an effect of clamping order.
  - Hue model. torchvision shifts H in HSV (the reference); DALI rotates the chroma (I, Q) of YIQ
    about the grey axis. Same angle h, a different colour wheel; grey and saturation are equal.
  - Rounding. PIL and torchvision truncate to integers after every step; DALI rounds once per
    operator (hue + saturation, contrast + brightness, the sharpness filter), and its greyscale
    folded into the jitter's saturation (when photometric_p = 0) can leave the channels 1 level
    apart: about 1 grey level, which autocontrast may stretch.
  - Patch offsets. The reference draws randint(0, c - P), i.e. U{0..c-P-1} (vissl
    img_patches_tensor.py); both backends here reach the last column too, U{0..c-P}.
Everything else is equal: the same draws with the same distributions, the mean-grey contrast
pivot, the greyscale weights, integer posterize/solarize/autocontrast, PIL's unsharpened 1-px
border, the Gaussian kernel.

THE GRAPH (S = image_size, C = patch_crop_size, G = grid, c = C // G, P = patch_size):
    jpeg ──decode (once, shared by both views)──▶ (H, W, 3) uint8
      image view: random_resized_crop S → colour steps 1-4, drawn per sample → mirror + normalise
                  ─▶ images  (S, S, 3) float32 (data.output_dtype), HWC
      patch view: random_resized_crop C ─▶ (C, C, 3)
                  → reshape/transpose into its 9 cells (9, c, c, 3), row-major
                  → warp_affine with 9 per-frame matrices: frame k is a P×P crop of cell k at its
                    own offset, mirrored on its own coin (folded into the matrix) ─▶ (9, P, P, 3)
                  → colour steps 1-4, drawn per frame (one operator call for all 9) → normalise
                  ─▶ patches (9, P, P, 3) float32 (data.output_dtype), FHWC, frames in cell order
      index, label: int64 scalars read from KEY.idx / KEY.lbl, shape (1,); in the GPU graph copied
                  to the GPU inside the pipeline, so every output is handed to torch on the device
The GPU graph's decoder takes the data.* decoder settings (hw_decoder_load, the nvJPEG memory
paddings, the hardware decoder's preallocation hints); pirl_fast/data/loaders.py's DataConfig says what to try.
The mirror comes first for the patches and last for the view: it commutes with every other step
(each is pointwise, per channel over the whole crop, or a mirror-symmetric filter).
With `gate` (pirl_fast.shard.corrupt.DaliGate), the encoded bytes pass it on the host before the decoder:
it checks the KEY.crc member (read only when the shards have one) and records where each sample
came from, so that a corrupt sample is named, and with data.on_corrupt=skip never decoded.

Channels stay last (HWC / FHWC), so a torch view (B, H, W, 3).permute(0, 3, 1, 2) is already
channels_last-strided: no copy between DALI and the model. Patches leave DALI in cell order; the
random presentation order is applied by the loader (pirl_fast.data.batch.PatchOrder).

Why one full decode for both views: on the CPU (400-500 px JPEGs, 2 threads) decode + two
random_resized_crops cost 3.9 CPU-ms per sample against 4.6 for two ROI decodes
(fn.decoders.image_random_crop) + two resizes; on the GPU the decoder engine is the scarce part.

Cost of the colour steps on the CPU graph. DALI's CPU float -> uint8 conversions cost more than
the ops themselves, so every step stays in uint8: hue + saturation is one fn.hsv, contrast about
the mean grey + brightness one fn.brightness_contrast (its contrast_center a per-crop mean from a
reduction), posterize and solarize one bitwise expression each, the sharpness a 3x3 fn.filter
with a per-frame kernel (the sharpened image on the interior, the input on the border, by two
full-size masks: broadcasting a mask costs twice as much), autocontrast an integer expression
after a min and a max reduction, greyscale after the photometric step a 1-channel colour
conversion and a blend. The patches' coins turn into identity parameters (bits 8, threshold 256,
sharpness 1, window 1), so a step is one operator call for all 9; the view's coins are DALI
conditionals (on_coin), so unlucky samples skip the work. Single-thread CPU time per sample
(224 view + 9 patches of 64, from 400-500 px JPEGs), measured on the 2-core development machine
while loaded, so rough: the whole graph 5.9-6.3 ms with the former single fn.color_twist
(contrast about a fixed grey), 6.3-6.5 ms with the mean-grey pivot, 8.5-8.9 ms with the
photometric ops on (photometric_p 0.66); the torch backend 17-23 ms with them.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from dali_pipelines import ASPECT_RATIO, IMAGENET_MEAN, IMAGENET_STD

# ImageNet statistics, on the 0-255 scale DALI's uint8 images are in.
MEAN_255 = [255 * m for m in IMAGENET_MEAN]
STD_255 = [255 * s for s in IMAGENET_STD]
READER_NAME = "Reader"
GREY_WEIGHTS = [0.299, 0.587, 0.114]  # ITU-R 601 luma: torchvision's rgb_to_grayscale, PIL's convert("L")
# PIL's ImageFilter.SMOOTH, the degenerate image of ImageEnhance.Sharpness (and torchvision's).
SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
IDENTITY3 = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32)
OUTPUT_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}  # data.output_dtype


def grid_cells(crop, cfg):
    """(C, C, 3) crop -> (G*G, c, c, 3) sequence of its grid cells, row-major, layout FHWC.

    A reshape-transpose-reshape: one copy of the crop, instead of stacking 9 copies of it to give
    warp_affine a sequence to apply per-frame matrices to (DALI does not expand an HWC input).
    """
    g, cell = cfg.grid, cfg.patch_crop_size // cfg.grid
    blocks = fn.reshape(crop, shape=[g, cell, g, cell, 3], layout="")  # (row, y, col, x, C)
    blocks = fn.transpose(blocks, perm=[0, 2, 1, 3, 4])  # (row, col, y, x, C)
    return fn.reshape(blocks, shape=[g * g, cell, cell, 3], layout="FHWC")  # (9, c, c, 3)


def offset_slack(cfg) -> int:
    """Offsets of a patch in its cell are U{0..slack}: c - P (data.patch_offsets=full) or c - P - 1 (reference:
    vissl img_patches_tensor.py's np.random.randint(0, patch_jitter), patch_jitter = c - P)."""
    slack = cfg.patch_crop_size // cfg.grid - cfg.patch_size
    return slack - 1 if cfg.patch_offsets == "reference" else slack


def jigsaw_crop(images, jpegs, cfg):
    """data.patch_view=jigsaw: the reference's Resize(R) + RandomCrop(C) (R = patch_resize, C = patch_crop_size;
    vissl configs/config/pretrain/jigsaw/jigsaw_8gpu_resnet.yaml) -> (C, C, 3) uint8.

    Resize follows torchvision's size rule: the shorter side becomes R, the longer int(R * long / short),
    computed here from the JPEG's header (peek_image_shape, on the host in both graphs). The crop's corner
    is an integer uniform in U{0..H'-C} x U{0..W'-C}, as RandomCrop draws it."""
    shape = fn.peek_image_shape(jpegs, dtype=types.INT64)  # (H, W, 3)
    h, w = shape[0], shape[1]
    r = types.Constant(cfg.patch_resize, dtype=types.INT64)
    wide = fn.cast(h <= w, dtype=types.INT64)  # 1: the height is the shorter side
    out_h = wide * r + (1 - wide) * (r * h // w)
    out_w = wide * (r * w // h) + (1 - wide) * r
    resized = fn.resize(images, resize_y=fn.cast(out_h, dtype=types.FLOAT), resize_x=fn.cast(out_w, dtype=types.FLOAT),
                        interp_type=types.INTERP_LINEAR, antialias=True)

    def corner(extent):  # U{0..extent - C}, from u ~ U[0, 1)
        room = fn.cast(extent - cfg.patch_crop_size + 1, dtype=types.FLOAT)
        return dmath.min(dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * room), room - 1.0)

    start = fn.cat(fn.reshape(corner(out_h), shape=[1]), fn.reshape(corner(out_w), shape=[1]))  # (2,) y, x
    return fn.slice(resized, start=fn.cast(start, dtype=types.INT32), shape=[cfg.patch_crop_size] * 2,
                    axis_names="HW")


def patch_matrices(cfg, num_cells: int):
    """Per-sample (num_cells, 2, 3) destination->source affine matrices, one per grid cell.

    Frame k crops P×P pixels from cell k at an integer offset (ox, oy), each drawn uniformly from
    [0, c - P], mirrored horizontally on its own coin f ~ B(flip_p):
        x_src = s·x + ox + f·P,  y_src = y + oy,  s = 1 - 2f.
    One coin per patch and one offset per patch and axis, broadcast over the matrix elements they
    set (a coin per element would give a patch's scale and shift different coins). Integer
    translations and unit scale put every destination pixel centre on a source pixel centre, so
    nearest-neighbour sampling is an exact crop (and an exact mirror).
    """
    slack = offset_slack(cfg)  # offsets in U{0..slack}: 21 (full) or 20 (reference) for 64 px patches in 85 px cells
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
    if cfg.flip_p > 0 and cfg.patch_view == "pirl":  # jigsaw: the crop was mirrored as a whole
        flips = fn.cast(fn.random.coin_flip(probability=cfg.flip_p, shape=[num_cells, 1, 1]),
                        dtype=types.FLOAT)  # (9,1,1)
        matrices = matrices + flips * types.Constant(flip_mask)
    return matrices


# ------------------------------------------------------------------------------------ per-crop draws
# A crop is one sample of an HWC batch (frames=None: scalar draws) or one frame of an FHWC batch
# (frames=F: (F,) draws, one per frame, one operator call for all frames).
def _shape(frames: int | None) -> list[int]:
    return [] if frames is None else [frames]


def uniform(lo: float, hi: float, frames: int | None):
    """U[lo, hi); lo == hi gives lo (DALI refuses an empty range)."""
    if lo == hi:
        return fn.random.uniform(values=[float(lo)], shape=_shape(frames))
    return fn.random.uniform(range=[lo, hi], shape=_shape(frames))


def integers(lo: int, hi: int, frames: int | None):
    """U{lo..hi}, both ends included, as float32."""
    return fn.random.uniform(values=[float(v) for v in range(lo, hi + 1)], shape=_shape(frames))


def coin(p: float, frames: int | None, dtype=types.FLOAT):
    """B(p) as 0/1 of `dtype` (coin_flip itself makes bool, uint8 or int32)."""
    flips = fn.random.coin_flip(probability=p, shape=_shape(frames), dtype=types.UINT8)
    return flips if dtype == types.UINT8 else fn.cast(flips, dtype=dtype)


def argument(draw, frames: int | None):
    """A draw as a named operator argument: per sample, or marked per frame."""
    return draw if frames is None else fn.per_frame(draw)


def operand(draw, frames: int | None, images):
    """A draw as an arithmetic operand broadcast over the crop's pixels, on the images' device."""
    if frames is not None:
        draw = fn.reshape(draw, shape=[frames, 1, 1, 1])  # (F, 1, 1, 1) against (F, H, W, C)
    return draw.gpu() if images.device == "gpu" else draw


def mean_grey(images):
    """Mean of Y over each crop: () per sample or (F,) per frame, float32, on the images' device."""
    means = fn.reductions.mean(images, axis_names="HW", dtype=types.FLOAT)  # (C,) or (F, C)
    weights = types.Constant(np.array(GREY_WEIGHTS, np.float32), device=images.device)  # an array: on the data's device
    return fn.reductions.sum(means * weights, axes=[-1])


# ------------------------------------------------------------------------------------ contract steps
def colour_jitter(images, cfg, frames: int | None, grey=None, arithmetic: bool | None = None):
    """Step 1 on uint8 crops; `grey` (0/1 draws) folds step 3 into the saturation when nothing
    runs between the two. `arithmetic` forces the GPU graph's contrast formulation (tests)."""
    applied = coin(cfg.jitter_p, frames) if cfg.jitter_p < 1 else None

    def draw(lo: float, hi: float, identity: float):  # U[lo, hi), the identity where not applied
        value = uniform(lo, hi, frames)
        return value if applied is None else identity + applied * (value - identity)

    on = cfg.jitter_p > 0  # jitter_p 0: no jitter ops in the graph (a folded greyscale still needs hsv)

    def factor(strength: float):  # torchvision's ColorJitter range for a multiplicative factor
        return draw(max(0.0, 1.0 - strength), 1.0 + strength, 1.0) if strength > 0 and on else None

    if (on and (cfg.hue > 0 or cfg.saturation > 0)) or grey is not None:
        saturation = factor(cfg.saturation)
        if grey is not None:
            saturation = (1.0 - grey) if saturation is None else saturation * (1.0 - grey)  # grey: saturation 0
        hue = draw(-360.0 * cfg.hue, 360.0 * cfg.hue, 0.0) if cfg.hue > 0 and on else None  # torchvision h -> degrees
        images = fn.hsv(images, **{name: argument(value, frames) for name, value in
                                   (("hue", hue), ("saturation", saturation)) if value is not None})
    if on and (cfg.brightness > 0 or cfg.contrast > 0):
        images = contrast_brightness(images, factor(cfg.brightness), factor(cfg.contrast), frames, arithmetic)
    return images


def contrast_brightness(images, brightness, contrast, frames: int | None, arithmetic: bool | None = None):
    """out = b · (m + k · (in - m)), m the crop's mean grey (torchvision's contrast pivot).

    On the CPU one fn.brightness_contrast with m as its contrast_center; on the GPU m is in GPU
    memory, which a named argument cannot take, so the same formula is an arithmetic expression
    (as nvidia.dali.auto_aug.augmentations.contrast does)."""
    if arithmetic is None:
        arithmetic = images.device == "gpu"
    m = mean_grey(images)  # () or (F,)
    if not arithmetic:
        args = {name: argument(draw, frames) for name, draw in
                (("brightness", brightness), ("contrast", contrast), ("contrast_center", m)) if draw is not None}
        return fn.brightness_contrast(images, **args)
    m = fn.reshape(m, shape=[frames, 1, 1, 1]) if frames is not None else m
    out = images if contrast is None else m + (images - m) * operand(contrast, frames, images)
    out = out if brightness is None else out * operand(brightness, frames, images)
    return fn.cast(dmath.clamp(out, 0.0, 255.0), dtype=types.UINT8)


def masked(value, identity: float, applied):
    """value where the crop's coin `applied` is 1, `identity` where it is 0; value itself without a coin."""
    if applied is None:
        return value
    return identity + fn.cast(applied, dtype=types.FLOAT) * (value - identity)


def photometric(images, cfg, frames: int | None, size: int, applied=None):
    """Step 2 on uint8 size x size crops: posterize, sharpness, solarize, autocontrast, all on one
    coin `applied` (0/1 per crop; None: every crop). A crop whose coin is 0 gets identity parameters."""
    u8 = lambda v: types.Constant(v, dtype=types.UINT8)  # noqa: E731

    # posterize: x & mask, mask = 255 - (2^(8 - n) - 1) keeps the top n bits
    lo_bits, hi_bits = cfg.posterize_bits
    masks = [float(255 ^ ((1 << (8 - n)) - 1)) for n in range(lo_bits, hi_bits + 1)]
    mask = masked(fn.random.uniform(values=masks, shape=_shape(frames)), 255.0, applied)
    images = images & operand(fn.cast(mask, dtype=types.UINT8), frames, images)

    # sharpness: correlation with smooth + v (identity - smooth) = identity + (1 - v)(smooth - identity),
    # on the interior only: PIL's 3x3 filter leaves the 1-px border as it was, and autocontrast's
    # min and max would otherwise see a changed border.
    weight = masked(1.0 - uniform(*cfg.sharpness, frames), 0.0, applied)  # 0: the identity kernel
    if frames is not None:
        weight = fn.reshape(weight, shape=[frames, 1, 1])
    kernel = argument(types.Constant(IDENTITY3) + weight * types.Constant(SMOOTH - IDENTITY3), frames)  # (3,3)|(F,3,3)
    sharpened = fn.filter(images, kernel.gpu() if images.device == "gpu" else kernel)
    border = np.full(_shape(frames) + [size, size, 3], 255, np.uint8)  # full shape: no broadcasting, 2x faster
    border[..., 1:-1, 1:-1, :] = 0
    keep, take = (types.Constant(m, device=images.device) for m in (border, 255 - border))
    images = (images & keep) | (sharpened & take)

    # solarize: x >= t -> 255 - x, i.e. x XOR 255 (t = 256: never)
    t = fn.cast(masked(integers(*cfg.solarize_threshold, frames), 256.0, applied), dtype=types.INT16)
    images = images ^ ((images >= operand(t, frames, images)) * u8(255))

    # autocontrast per channel: floor((x - lo) * 255 / (hi - lo)); identity where hi == lo (or not applied)
    lo = fn.reductions.min(images, axis_names="HW", keep_dims=True)  # (1, 1, C) | (F, 1, 1, C)
    hi = fn.reductions.max(images, axis_names="HW", keep_dims=True)
    stretch = hi > lo if applied is None else (hi > lo) * operand(fn.cast(applied, dtype=types.UINT8), frames, images)
    offset = lo * stretch  # uint8
    scale = types.Constant(1, dtype=types.UINT16) + stretch * types.Constant(254, dtype=types.UINT16)  # 255 or 1
    divisor = types.Constant(1, dtype=types.UINT16) + stretch * (hi - lo - u8(1))  # hi - lo or 1
    return fn.cast(((images - offset) * scale) // divisor, dtype=types.UINT8)


def greyscale(images, frames: int | None, applied=None):
    """Step 3 on its own (after step 2): Y in all three channels where the coin `applied` is 1."""
    y = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)  # (.., 1)
    if applied is None:
        return fn.cat(y, y, y, axis_name="C")
    g = operand(fn.cast(applied, dtype=types.UINT8), frames, images)
    return images * (types.Constant(1, dtype=types.UINT8) - g) + y * g


def gaussian_blur(images, cfg, frames: int | None, applied=None):
    """Step 4: sigma ~ U[blur_sigma), window 2 ceil(3 sigma) + 1; window 1 (identity) where not applied."""
    sigma = uniform(*cfg.blur_sigma, frames)
    window = fn.cast(masked(1.0 + 2.0 * dmath.ceil(3.0 * sigma), 1.0, applied), dtype=types.INT32)
    return fn.gaussian_blur(images, sigma=argument(sigma, frames), window_size=argument(window, frames))


def on_coin(step, images, applied, frames: int | None, **kwargs):
    """`step` on the crops whose coin `applied` is 1. Samples (the view): a DALI conditional, so the
    others skip the work (a third less photometric work on the views, four fifths less greyscale).
    Frames (the patches, one operator call for all 9): the coin turns the parameters into identities."""
    if frames is not None:
        return step(images, frames=frames, applied=applied, **kwargs)
    if fn.cast(applied, dtype=types.BOOL):
        images = step(images, frames=None, **kwargs)
    return images


def colour_steps(images, cfg, frames: int | None, size: int):
    """Contract steps 1-4 on uint8 size x size crops, every draw per crop."""
    grey = coin(cfg.gray_p, frames) if cfg.gray_p > 0 else None
    fold_grey = grey is not None and cfg.photometric_p == 0  # nothing between jitter and greyscale
    images = colour_jitter(images, cfg, frames, grey if fold_grey else None)
    if cfg.photometric_p > 0:
        images = on_coin(photometric, images, coin(cfg.photometric_p, frames), frames, cfg=cfg, size=size)
        if grey is not None:
            images = on_coin(greyscale, images, grey, frames)
    if cfg.blur_p > 0:
        images = on_coin(gaussian_blur, images, coin(cfg.blur_p, frames), frames, cfg=cfg)
    return images


@pipeline_def(enable_conditionals=True)  # the view's coins (on_coin)
def pirl_pipeline(tar_paths: list[str], index_paths: list[str], cfg, shard_id: int, num_shards: int,
                  gpu: bool, gate=None):
    """Build with pirl_pipeline(tar_paths, index_paths, cfg, shard_id, num_shards, gpu, gate,
    batch_size=per_rank, num_threads=cfg.workers, device_id=(cuda index | None), seed=...).

    Returns (images (B,S,S,3), patches (B,9,P,P,3) in data.output_dtype (f32 | f16), index (B,1) i64,
    label (B,1) i64), all on the GPU in the GPU graph.
    """
    num_cells = cfg.grid * cfg.grid
    checksums = ["crc"] if gate is not None and gate.checksums else []
    jpegs, index, label, *crc = fn.readers.webdataset(
        paths=tar_paths,
        index_paths=index_paths,
        ext=["jpg", "idx", "lbl", *checksums],
        dtypes=[types.UINT8, types.INT64, types.INT64, *[types.INT64 for _ in checksums]],
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
    if gate is not None:  # on the host, before decoding: checksums, and where each sample came from
        jpegs = fn.python_function(jpegs, index, fn.get_property(jpegs, key="source_info"), *crc, function=gate,
                                   batch_processing=True)
    if gpu:  # nvJPEG: hybrid CPU/GPU decode, part of the JPEGs on the hardware decoder where there is one
        images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=cfg.hw_decoder_load,
                                   device_memory_padding=cfg.device_memory_padding,
                                   host_memory_padding=cfg.host_memory_padding,
                                   preallocate_width_hint=cfg.preallocate_width_hint,
                                   preallocate_height_hint=cfg.preallocate_height_hint)
        index, label = index.gpu(), label.gpu()  # 16 bytes a sample: no host-to-device copy in the loader
    else:
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    dtype = OUTPUT_DTYPES[cfg.output_dtype]

    # Image view.
    view = fn.random_resized_crop(images, size=[cfg.image_size, cfg.image_size],
                                  random_area=list(cfg.image_scale), random_aspect_ratio=list(ASPECT_RATIO))
    if cfg.color_aug:
        view = colour_steps(view, cfg, None, cfg.image_size)
    mirror = fn.random.coin_flip(probability=cfg.flip_p) if cfg.flip_p > 0 else 0
    view = fn.crop_mirror_normalize(view, mirror=mirror, mean=MEAN_255, std=STD_255,
                                    dtype=dtype, output_layout="HWC")  # (S, S, 3)

    # Patch view: its own crop of the same decoded image, then 9 crops in one warp.
    jigsaw = cfg.patch_view == "jigsaw"
    if jigsaw:  # the reference's Jigsaw: colour steps and the mirror once, for the whole crop
        crop = jigsaw_crop(images, jpegs, cfg)
        if cfg.color_aug:
            crop = colour_steps(crop, cfg, None, cfg.patch_crop_size)
        if cfg.flip_p > 0:
            crop = fn.flip(crop, horizontal=fn.random.coin_flip(probability=cfg.flip_p, dtype=types.INT32))
    else:
        crop = fn.random_resized_crop(images, size=[cfg.patch_crop_size, cfg.patch_crop_size],
                                      random_area=list(cfg.patch_scale), random_aspect_ratio=list(ASPECT_RATIO))
    patches = fn.warp_affine(grid_cells(crop, cfg), matrix=fn.per_frame(patch_matrices(cfg, num_cells)),
                             size=[cfg.patch_size, cfg.patch_size],
                             interp_type=types.INTERP_NN)  # (9, P, P, 3) uint8, exact crops
    if cfg.color_aug and not jigsaw:
        patches = colour_steps(patches, cfg, num_cells, cfg.patch_size)
    patches = fn.crop_mirror_normalize(patches, mean=MEAN_255, std=STD_255,
                                       dtype=dtype, output_layout="FHWC")  # (9, P, P, 3)
    return view, patches, index, label
