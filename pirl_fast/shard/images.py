"""Decode, check and normalise one input image into bytes DALI can always decode.

DALI cannot skip a bad sample, so every image is decoded fully here first: a baseline RGB JPEG that
needs no change is kept byte for byte (no generation loss, and the fastest path: most of ImageNet
takes it); anything else is made upright, RGB and at most `max_side`, then re-encoded as a baseline
JPEG (shards/README.md, "What the sharder does to images"); what cannot be decoded raises UnusableImage.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ORIENTATION_TAG = 0x0112  # EXIF "Orientation"; 1 = upright, 2-8 = flips/rotations to apply


class UnusableImage(Exception):
    """The input cannot become a sample; str(e) is the reason recorded in the manifest."""


@dataclass
class NormalisedImage:
    jpeg: bytes
    width: int
    height: int
    copied: bool  # True when `jpeg` is the input file's bytes unchanged
    changes: tuple[str, ...]  # why it was re-encoded, e.g. ("format PNG", "mode CMYK"); () when copied


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) with the longer side scaled down to max_side, keeping the aspect ratio (sides >= 1)."""
    if max_side <= 0 or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def normalise_image(data: bytes, max_side: int = 0, quality: int = 95) -> NormalisedImage:
    """Turn the bytes of one input file into a baseline RGB JPEG (see the module docstring).

    max_side: longer-side limit in pixels, 0 = no limit. quality: JPEG quality for re-encodes.
    Raises UnusableImage for empty, truncated, corrupt or non-image data.
    """
    if not data:
        raise UnusableImage("empty file")
    # A truncated file must fail here, not be padded with grey: never accept truncated images.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set (by some import in this process); "
                           "the sharder needs it off to detect truncated files")
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) on a possible decompression bomb below 2x the limit and on
            # odd EXIF: an image is either decodable or not, warnings must not leak per file.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            orientation = img.getexif().get(ORIENTATION_TAG, 1) if hasattr(img, "getexif") else 1
            progressive = bool(img.info.get("progressive") or img.info.get("progression"))
            width, height = img.size
            needs_resize = max_side > 0 and max(width, height) > max_side
            changes = []
            if fmt != "JPEG":
                changes.append(f"format {fmt}")
            if img.mode != "RGB":
                changes.append(f"mode {img.mode}")
            if progressive:
                changes.append("progressive")
            if orientation not in (None, 1):
                changes.append(f"EXIF orientation {orientation}")
            if needs_resize:
                changes.append(f"larger than {max_side}px")
            if fmt == "JPEG" and needs_resize:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling): still reads every
                # coded block, so truncation is still caught, at a fraction of the cost.
                tw, th = _target_size(width, height, max_side)
                img.draft(img.mode, (tw, th))
            img.load()  # full decode: raises on truncated or corrupt data
    except UnidentifiedImageError as e:
        raise UnusableImage("not an image (Pillow cannot identify it)") from e
    except Image.DecompressionBombError as e:
        raise UnusableImage(f"too many pixels ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as e:
        raise UnusableImage(f"corrupt or truncated {fmt or 'image'}: {e}") from e

    if not changes:
        return NormalisedImage(jpeg=data, width=width, height=height, copied=True, changes=())

    try:
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img)  # (w, h) swap for orientations 5-8
        if img.mode != "RGB":
            img = img.convert("RGB")  # as torchvision's pil_loader: alpha dropped, CMYK/L/P expanded
        # Final size from the original dimensions (upright), not from a draft-reduced decode,
        # so it does not depend on which DCT scale libjpeg picked.
        upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        size = _target_size(*upright, max_side)
        if size != img.size:
            img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        # Baseline (not progressive), no EXIF (orientation already applied), no ICC profile:
        # DALI's decoders ignore colour profiles, so the pixels are what a loader will see.
        img.save(out, format="JPEG", quality=quality, progressive=False, optimize=False)
    except (OSError, ValueError) as e:
        raise UnusableImage(f"cannot convert {fmt} mode {img.mode} to RGB JPEG: {e}") from e
    return NormalisedImage(jpeg=out.getvalue(), width=size[0], height=size[1], copied=False, changes=tuple(changes))
