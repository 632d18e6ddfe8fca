"""Patch geometry and colour facts of the PIRL views, DALI pipeline first, torch baseline alike.

Two kinds of test images:
- grid images, 255x255 (exactly one patch crop), 3x3 cells of 85 px; the left half of cell k
  is colour LEFT[k] and its right half RIGHT[k] (18 distinct, far-apart colours; class 1 images
  use the cells in another order). With patch_scale (1, 1) the patch crop is the whole image, and
  a 64 px patch at any offset in [0, 21] has its first columns in the left half and its last
  columns in the right half of its cell, so its two edge colours say which cell it came from and
  whether it was mirrored.
- coordinate images, 255x255, red = x and green = y: every patch pixel says where it came from.
  With both crops forced to the whole image each patch must be, pixel for pixel, a window of its
  own cell of the decoded image or that window mirrored; at the default crop scales each patch
  must be a straight (possibly mirrored) resampled window lying inside its cell.
The augmentation contract's statistics (shares, factor spreads, independence) are in
test_augment_contract.py.
"""

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from pirl_fast.data.config import DataConfig
from pirl_fast.data.loaders import build_loader
from pirl_fast.shard.cli import Options, run_shard

pytest.importorskip("nvidia.dali")

CELL, GRID, EDGE = 85, 3, 8  # EDGE: columns averaged at each side of a patch (JPEG-safe, < 21)
PALETTE = np.array([c for c in itertools.product([0, 128, 255], repeat=3)][:18], np.float32)  # (18, 3)
LEFT, RIGHT = PALETTE[:9], PALETTE[9:]  # colours of cell k's halves
CLASS_LAYOUT = [list(range(9)), [4, 8, 0, 7, 2, 6, 1, 5, 3]]  # class c: cell k shows colour pair LAYOUT[c][k]
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def grid_image(layout: list[int]) -> Image.Image:
    pixels = np.zeros((GRID * CELL, GRID * CELL, 3), np.uint8)
    for k, pair in enumerate(layout):
        row, col = divmod(k, GRID)
        y, x = row * CELL, col * CELL
        pixels[y:y + CELL, x:x + CELL // 2] = LEFT[pair]
        pixels[y:y + CELL, x + CELL // 2:x + CELL] = RIGHT[pair]
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def grid_shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("grid_data")
    for c, layout in enumerate(CLASS_LAYOUT):
        (root / "src" / f"class{c}").mkdir(parents=True)
        for i in range(3):  # baseline 4:4:4 JPEGs: the sharder copies them byte for byte
            grid_image(layout).save(root / "src" / f"class{c}" / f"{i}.jpg", quality=95, subsampling=0)
    run_shard(Options(src=str(root / "src"), dst=str(root / "shards"), samples_per_shard=4, seed=0))
    return str(root / "shards")


def nearest(colours: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(n, 3) colours -> index of the nearest palette entry, (n,)."""
    return np.argmin(((colours[:, None] - palette[None]) ** 2).sum(-1), axis=1)


def to_pixels(patches: torch.Tensor) -> np.ndarray:
    """(n, 3, P, P) normalised -> (n, P, P, 3) on the 0-255 scale."""
    return patches.permute(0, 2, 3, 1).numpy() * STD + MEAN


def geometry_config(shards: str, backend: str, flip_p: float) -> DataConfig:
    return DataConfig(shards=shards, backend=backend, batch_size=6, workers=1, color_aug=False, flip_p=flip_p,
                      patch_scale=[1.0, 1.0], shuffle_buffer=8)


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_each_patch_comes_from_its_own_cell(grid_shards, backend, flip_p):
    loader = build_loader(geometry_config(grid_shards, backend, flip_p))
    checked = 0
    for batch in loader:
        pixels = to_pixels(batch.patches).reshape(len(batch.index), 9, 64, 64, 3)
        for b in range(len(batch.index)):
            layout = CLASS_LAYOUT[int(batch.label[b])]
            left_edge = nearest(pixels[b, :, :, :EDGE].mean(axis=(1, 2)), PALETTE)  # (9,) palette ids
            right_edge = nearest(pixels[b, :, :, -EDGE:].mean(axis=(1, 2)), PALETTE)
            if flip_p == 1.0:  # mirrored patches show the right half on the left
                left_edge, right_edge = right_edge, left_edge
            cells = batch.perm[b].tolist()
            assert sorted(cells) == list(range(9))  # the nine patches cover all nine cells
            assert left_edge.tolist() == [layout[k] for k in cells], f"sample {int(batch.index[b])}"
            assert right_edge.tolist() == [9 + layout[k] for k in cells], f"sample {int(batch.index[b])}"
            checked += 1
    assert checked == 6


# ---------------------------------------------------------------------------------- coordinate images
SIDE = 255  # red = x, green = y exactly (before JPEG)
SLACK = CELL - 64  # 21: patch offsets lie in [0, SLACK]


def coordinate_image() -> np.ndarray:
    pixels = np.zeros((SIDE, SIDE, 3), np.uint8)
    pixels[..., 0] = np.arange(SIDE)[None, :]
    pixels[..., 1] = np.arange(SIDE)[:, None]
    pixels[..., 2] = 128
    return pixels


@pytest.fixture(scope="module")
def coordinate_shards(tmp_path_factory) -> tuple[str, np.ndarray]:
    """(shard dir of 12 identical coordinate images, the image as both backends decode it)."""
    root = tmp_path_factory.mktemp("coordinate_data")
    encoded = io.BytesIO()
    Image.fromarray(coordinate_image()).save(encoded, format="JPEG", quality=100, subsampling=0)
    for i in range(12):
        (root / "src" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / "src" / f"class{i % 2}" / f"{i}.jpg").write_bytes(encoded.getvalue())  # copied as-is by the sharder
    run_shard(Options(src=str(root / "src"), dst=str(root / "shards"), samples_per_shard=4, seed=0))
    decoded = decode_jpeg(torch.frombuffer(bytearray(encoded.getvalue()), dtype=torch.uint8)).permute(1, 2, 0)
    return str(root / "shards"), decoded.numpy().astype(np.float32)  # (255, 255, 3)


def exact_window(patch: np.ndarray, source: np.ndarray, cell: int) -> tuple[int, int, bool] | None:
    """(ox, oy, mirrored) if patch (P, P, 3) equals, within 0.5 levels, the P x P window of `source`
    at (ox, oy) inside grid cell `cell` (row-major) or that window mirrored; None otherwise."""
    p = patch.shape[0]
    row, col = divmod(cell, GRID)
    mirrored = patch[:, -1, 0].mean() < patch[:, 0, 0].mean()  # red = x falls from left to right
    left_x = patch[:, -1 if mirrored else 0, 0].mean()  # red (= x, JPEG-rounded) of the leftmost source column
    guess_x, guess_y = round(left_x) - col * CELL, round(patch[0, :, 1].mean()) - row * CELL
    for oy in range(max(0, guess_y - 3), min(SLACK, guess_y + 3) + 1):  # JPEG moves the guess by a few levels
        for ox in range(max(0, guess_x - 3), min(SLACK, guess_x + 3) + 1):
            y, x = row * CELL + oy, col * CELL + ox
            window = source[y:y + p, x:x + p]
            if np.abs((window[:, ::-1] if mirrored else window) - patch).max() <= 0.5:
                return ox, oy, bool(mirrored)
    return None


def coordinate_config(shards: str, backend: str, flip_p: float, whole: bool) -> DataConfig:
    crop = {"image_scale": [1.0, 1.0], "patch_scale": [1.0, 1.0]} if whole else {}
    return DataConfig(shards=shards, backend=backend, batch_size=6, workers=1, color_aug=False, flip_p=flip_p,
                      shuffle_buffer=8, **crop)


def near(share: float, p: float, n: int) -> bool:
    """share within 4 standard errors of p (n independent coins)."""
    return abs(share - p) <= 4 * (p * (1 - p) / n) ** 0.5 + 1e-9


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("flip_p", [0.0, 0.3, 0.5, 1.0])
def test_every_patch_is_an_exact_window_of_its_cell(coordinate_shards, backend, flip_p):
    """Whole-image crops, colour off: patch by patch, an exact (possibly mirrored) window of its own
    cell at an offset in [0, 21], mirrored on its own coin with probability flip_p; views too."""
    shards, source = coordinate_shards
    loader = build_loader(coordinate_config(shards, backend, flip_p, whole=True))
    patch_flips, view_flips, offsets = [], [], []
    for _ in range(4):  # epochs: fresh draws each time
        for batch in loader:
            pixels = to_pixels(batch.patches).reshape(len(batch.index), 9, 64, 64, 3)
            views = to_pixels(batch.images)  # (B, 224, 224, 3)
            for b in range(len(batch.index)):
                for j, cell in enumerate(batch.perm[b].tolist()):
                    found = exact_window(pixels[b, j], source, cell)
                    assert found is not None, f"sample {int(batch.index[b])}: patch {j} is no window of cell {cell}"
                    offsets += found[:2]
                    patch_flips.append(found[2])
                red = views[b, 112, :, 0]  # the middle row's red runs 0 -> 254, or back when mirrored
                view_flips.append(bool(red[-8:].mean() < red[:8].mean()))
    assert near(np.mean(patch_flips), flip_p, len(patch_flips)), f"mirrored patch share {np.mean(patch_flips):.3f}"
    assert near(np.mean(view_flips), flip_p, len(view_flips)), f"mirrored view share {np.mean(view_flips):.3f}"
    assert min(offsets) == 0 and max(offsets) == SLACK  # the whole [0, c - P] range is reached


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_patches_lie_inside_their_cells_at_the_defaults(coordinate_shards, backend):
    """Default sizes (224 / 255 / 85 / 64) and crop scales, colour off, flip_p 0.5: every patch is a
    straight resampled window (red linear along rows, green along columns, one scale for all nine),
    and the nine windows fit in their cells of one crop: their cell-relative offsets, in crop pixels,
    span at most c - P = 21."""
    shards, _ = coordinate_shards
    loader = build_loader(coordinate_config(shards, backend, 0.5, whole=False))
    flips = []
    for _ in range(2):
        for batch in loader:
            pixels = to_pixels(batch.patches).reshape(len(batch.index), 9, 64, 64, 3)
            for b in range(len(batch.index)):
                columns, rows = np.arange(64), np.arange(64)
                fits = [(np.polyfit(columns[1:-1], pixels[b, j, 1:-1, 1:-1, 0].mean(0), 1),  # red vs column
                         np.polyfit(rows[1:-1], pixels[b, j, 1:-1, 1:-1, 1].mean(1), 1)) for j in range(9)]
                sx, sy = np.median([abs(fx[0]) for fx, _ in fits]), np.median([fy[0] for _, fy in fits])
                u, v = [], []
                for j, cell in enumerate(batch.perm[b].tolist()):
                    (slope_x, x0), (slope_y, y0) = fits[j]
                    red = pixels[b, j, 1:-1, 1:-1, 0]
                    assert np.abs(red - np.polyval((slope_x, x0), columns[1:-1])).max() < 4, "not a straight window"
                    assert abs(abs(slope_x) - sx) < 0.02 * sx and abs(slope_y - sy) < 0.02 * sy, "scales differ"
                    flips.append(slope_x < 0)
                    left = x0 if slope_x > 0 else x0 + slope_x * 63  # source x of the leftmost patch column
                    row, col = divmod(cell, GRID)
                    u.append(left / sx - col * CELL)  # cell-relative offset in crop pixels, up to a common shift
                    v.append(y0 / sy - row * CELL)
                for name, offs in (("x", u), ("y", v)):
                    assert max(offs) - min(offs) <= SLACK + 1.5, f"{name} offsets {np.round(offs, 1)} leave their cells"
    assert near(np.mean(flips), 0.5, len(flips))


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_patch_offsets_vary_within_cells(grid_shards, backend):
    """The left/right boundary inside a patch sits at 42 - offset: offsets differ between patches."""
    loader = build_loader(geometry_config(grid_shards, backend, 0.0))
    boundaries = set()
    for batch in loader:
        pixels = to_pixels(batch.patches)  # (n, 64, 64, 3)
        step = np.abs(np.diff(pixels[:, 32], axis=1)).sum(-1)  # (n, 63) colour change along the middle row
        boundaries.update(np.argmax(step, axis=1).tolist())
    assert len(boundaries) >= 8  # 22 possible offsets, 54 patches
    assert min(boundaries) >= CELL // 2 - 1 - (CELL - 64) - 1 and max(boundaries) <= CELL // 2


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_greyscale_keeps_three_equal_channels(grid_shards, backend):
    cfg = geometry_config(grid_shards, backend, 0.5)
    cfg.color_aug, cfg.gray_p = True, 1.0
    batch = next(iter(build_loader(cfg)))
    for view in (batch.images, batch.patches):
        pixels = to_pixels(view)  # (n, H, W, 3)
        assert pixels.shape[-1] == 3
        spread = pixels.max(-1) - pixels.min(-1)  # channel disagreement per pixel
        assert np.percentile(spread, 99) < 3.0, "grey samples must have R = G = B"


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_colour_jitter_changes_colours_per_patch(grid_shards, backend):
    """With jitter on, the same cell colour comes out differently in different patches."""
    cfg = geometry_config(grid_shards, backend, 0.0)
    cfg.color_aug, cfg.gray_p = True, 0.0
    shifts = []
    for batch in build_loader(cfg):
        pixels = to_pixels(batch.patches).reshape(len(batch.index), 9, 64, 64, 3)
        for b in range(len(batch.index)):
            layout = CLASS_LAYOUT[int(batch.label[b])]
            for j, k in enumerate(batch.perm[b].tolist()):
                shifts.append(pixels[b, j, :, :EDGE].mean(axis=(0, 1)) - LEFT[layout[k]])  # (3,)
    shifts = np.array(shifts)
    assert np.abs(shifts).max() > 20  # jitter moves colours
    assert shifts.std(axis=0).min() > 5  # ... and differently per patch


def test_dali_outputs_are_channels_last_without_copy(grid_shards):
    """DALI's HWC / FHWC outputs are wrapped as NCHW views with channels_last strides."""
    from dali_pipelines.pirl import READER_NAME, pirl_pipeline
    from pirl_fast.shard.format import load_manifest

    manifest = load_manifest(grid_shards)
    cfg = geometry_config(grid_shards, "dali", 0.5)
    pipe = pirl_pipeline(manifest.tar_paths(), manifest.index_paths(), cfg, 0, 1, False,
                         batch_size=4, num_threads=1, device_id=None, seed=0)
    pipe.build()
    assert pipe.reader_meta(READER_NAME)["epoch_size"] == manifest.num_samples
    images, patches, index, label = pipe.run()
    assert images.layout() == "HWC" and patches.layout() == "FHWC"
    assert images.as_tensor().shape() == [4, 224, 224, 3] and patches.as_tensor().shape() == [4, 9, 64, 64, 3]
    assert index.as_tensor().shape() == [4, 1] and label.as_tensor().shape() == [4, 1]
    view = torch.from_dlpack(images.as_tensor()).permute(0, 3, 1, 2)  # (4, 3, 224, 224), no copy
    assert view.is_contiguous(memory_format=torch.channels_last)
