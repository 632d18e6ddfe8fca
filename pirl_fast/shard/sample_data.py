"""python -m pirl_fast.sample_data DIR --classes C --per-class N --seed S [--odd]

Writes a small labelled ImageFolder (DIR/<class>/<file>) of varied, natural-looking images made
on the fly (no download), for the demo and the tests:

    - each class has its own texture family (stripes, checks, rings, blobs, clouds, dots, waves,
      bark) and colour palette, so the classes are visually distinguishable -- a small model
      trained on them must beat random initialisation in kNN accuracy -- while every image
      varies in frequency, angle, phase, hue, lighting and noise;
    - sides of 96-400 px with varied aspect ratios;
    - the file formats ImageNet itself mixes: mostly baseline RGB JPEGs (`.JPEG`), and about
      8% greyscale JPEGs, 5% CMYK JPEGs, 5% progressive JPEGs and 10% PNGs (`.png`).

--odd adds the awkward inputs a sharder must survive (see `write_odd_files`): a PNG named
.JPEG, an EXIF-rotated JPEG, small progressive/CMYK/greyscale JPEGs, palette+transparency and
RGBA PNGs, a truncated JPEG, an empty file and a text file. The same arguments always give
byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

FAMILIES = ["stripes", "checks", "rings", "blobs", "clouds", "dots", "waves", "bark"]
GOLDEN = 0.618033988749895  # hue step between classes: consecutive classes get far-apart hues


def class_names(classes: int) -> list[str]:
    """Class folder names, sorted = label order: c00_stripes, c01_checks, ..."""
    return [f"c{c:02d}_{FAMILIES[c % len(FAMILIES)]}" for c in range(classes)]


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly (via PIL)."""
    coarse = rng.random((cells + 1, cells + 1), dtype=np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _texture(family: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An (h, w) float32 pattern in [0, 1] of the given family, with per-image random parameters."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    freq = rng.uniform(0.04, 0.12)  # cycles per pixel: 8-25 px periods, visible after a 224 crop
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    phase = rng.uniform(0, 2 * math.pi)
    if family == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * u + phase)
    elif family == "checks":
        t = ((np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float32)
    elif family == "rings":
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * np.hypot(x - cx, y - cy) + phase)
    elif family == "blobs":
        t = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(6, 14))):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 40)
            t += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        t = np.clip(t, 0, 1)
    elif family == "clouds":
        t = 0.6 * _smooth_noise(rng, h, w, 4) + 0.4 * _smooth_noise(rng, h, w, 12)
    elif family == "dots":
        t = ((np.sin(2 * math.pi * freq * u) * np.sin(2 * math.pi * freq * v)) > 0.5).astype(np.float32)
    elif family == "waves":
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * u + 3.0 * np.sin(2 * math.pi * freq * 0.5 * v + phase))
    elif family == "bark":
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * 2 * u + 8.0 * _smooth_noise(rng, h, w, 6))
    else:
        raise ValueError(f"unknown texture family {family!r}; valid: {FAMILIES}")
    return t.astype(np.float32)


def make_image(label: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `label`: its family's texture in its palette, with lighting and noise."""
    h, w = int(rng.integers(96, 401)), int(rng.integers(96, 401))  # aspect ratios from 1:4 to 4:1
    t = _texture(FAMILIES[label % len(FAMILIES)], rng, h, w)  # (h, w)
    hue = (label * GOLDEN + rng.uniform(-0.03, 0.03)) % 1.0
    dark = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.15, 0.4))  # (3,)
    light = _hsv_to_rgb((hue + 0.08) % 1.0, rng.uniform(0.3, 0.7), rng.uniform(0.75, 1.0))
    rgb = dark + t[..., None] * (light - dark)  # (h, w, 3)
    light_dir = rng.uniform(-1, 1, size=2)  # soft directional lighting across the image
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb *= (1.0 + 0.25 * (light_dir[0] * (xx / w - 0.5) + light_dir[1] * (yy / h - 0.5)))[..., None]
    rgb += rng.normal(0, 0.03, size=rgb.shape).astype(np.float32)  # sensor-like noise
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str]:
    """Encode in a randomly drawn ImageNet-like format; returns (bytes, file suffix)."""
    kind = rng.random()
    out = io.BytesIO()
    quality = int(rng.integers(75, 96))
    if kind < 0.08:
        img.convert("L").save(out, "JPEG", quality=quality)
    elif kind < 0.13:
        img.convert("CMYK").save(out, "JPEG", quality=quality)
    elif kind < 0.18:
        img.save(out, "JPEG", quality=quality, progressive=True)
    elif kind < 0.28:
        img.save(out, "PNG")
        return out.getvalue(), ".png"
    else:
        img.save(out, "JPEG", quality=quality)
    return out.getvalue(), ".JPEG"


def write_sample_folder(root: str | Path, classes: int = 4, per_class: int = 12, seed: int = 0,
                        odd: bool = False) -> Path:
    """Write the ImageFolder under `root` (created; existing files of the same names are replaced)."""
    if classes < 1 or per_class < 1:
        raise ValueError(f"classes and per_class must be >= 1, got classes={classes} per_class={per_class}")
    root = Path(root)
    for label, name in enumerate(class_names(classes)):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, label])  # per class: classes do not shift when C changes
        for i in range(per_class):
            data, suffix = _encode(make_image(label, rng), rng)
            (d / f"{name}_{i:05d}{suffix}").write_bytes(data)
    if odd:
        write_odd_files(root / class_names(classes)[0], seed)
    return root


def write_odd_files(class_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """Write awkward inputs into `class_dir`; returns {file name: "converted" or "skipped"}.

    converted: the sharder must turn it into a baseline RGB JPEG; skipped: it must list it in
    the manifest's `skipped` with a reason and carry on.
    """
    d = Path(class_dir)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 10_000])
    expected = {}

    def save(name: str, img: Image.Image, fmt: str, outcome: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        (d / name).write_bytes(buf.getvalue())
        expected[name] = outcome
        return buf.getvalue()

    save("odd_png_named.JPEG", make_image(0, rng), "PNG", "converted")
    # 200x120 stored, EXIF orientation 6 = "rotate 90 CW to view": upright it is 120x200.
    exif = Image.Exif()
    exif[0x0112] = 6
    save("odd_exif_rotated.JPEG", make_image(0, rng).resize((200, 120)), "JPEG", "converted", exif=exif.tobytes())
    small = (160, 120)  # under any --max-side a test uses: these must be converted for what they are, not resized
    save("odd_progressive.JPEG", make_image(0, rng).resize(small), "JPEG", "converted", progressive=True)
    save("odd_cmyk.JPEG", make_image(0, rng).resize(small).convert("CMYK"), "JPEG", "converted")
    save("odd_grey.JPEG", make_image(0, rng).resize(small).convert("L"), "JPEG", "converted")
    pal = make_image(0, rng).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    save("odd_palette_alpha.png", pal, "PNG", "converted", transparency=0)
    rgba = make_image(0, rng).convert("RGBA")
    rgba.putalpha(128)
    save("odd_rgba.png", rgba, "PNG", "converted")
    whole = save("odd_truncated.JPEG", make_image(0, rng), "JPEG", "skipped", quality=90)
    (d / "odd_truncated.JPEG").write_bytes(whole[: len(whole) // 2])  # cut mid-scan
    (d / "odd_empty.JPEG").write_bytes(b"")
    expected["odd_empty.JPEG"] = "skipped"
    (d / "odd_notes.txt").write_text("not an image: a note someone left in the class folder\n")
    expected["odd_notes.txt"] = "skipped"
    return expected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pirl_fast.sample_data", description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="output folder (created); gets one sub-folder per class")
    parser.add_argument("--classes", type=int, default=4, help="number of classes (default 4)")
    parser.add_argument("--per-class", type=int, default=12, help="images per class (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument("--odd", action="store_true", help="also write awkward/broken files into the first class")
    args = parser.parse_args(argv)
    try:
        root = write_sample_folder(args.dir, args.classes, args.per_class, args.seed, args.odd)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.classes} classes x {args.per_class} images{' + odd files' if args.odd else ''} to {root}")
    return 0
