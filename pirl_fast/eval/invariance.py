"""Is the representation invariant to the jigsaw transformation? (PIRL, Sec. 5.1 / Fig. 3)

For each image I, t is a uniformly random non-identity permutation of the 3x3 cells (the same t
for every checkpoint compared: drawn from `seed` in dataset order). Views, all deterministic:

    v_I      the evaluation view: resize + centre crop image_size              (3, S, S)
    crop     resize + centre crop patch_crop_size, cut into grid x grid cells  (3, C, C)
    v_It     one centre patch_size crop per cell, presented in the order t     (9, 3, p, p)
    crop_t   the crop re-assembled with its cells in the order t               (3, C, C)

Distances, all between L2-normalised vectors, so each lies in [0, 2] (0: identical
direction, sqrt(2): orthogonal):

    "pirl_head"  ||f(v_I) - g(v_It)||          PIRL checkpoints only. Exactly the quantity of the
                                               paper's Fig. 3 and the one PIRL's loss pulls together
                                               (through the memory bank): f = image head on res5,
                                               g = patch head, concatenation in the order t, jigsaw head.
    "pirl_head_other"  ||f(v_I) - g(v_Jt)||    the same with J another image of the batch (the next
                                               one): the baseline that says whether a small pirl_head
                                               distance is invariance (matched << other) or collapse
                                               (everything close to everything).
    "trunk"      ||n(φ(crop)) - n(φ(crop_t))||  every checkpoint (PIRL, Jigsaw, random init): φ = res5
                                               average-pooled, n = L2 normalisation. The same function
                                               on both inputs, so it compares models with different
                                               heads fairly: a Jigsaw model, whose task is to *tell the
                                               shuffles apart*, should map crop_t far from crop; a
                                               PIRL model, trained to ignore the shuffle, near it.
    "trunk_other"  ||n(φ(crop)) - n(φ(crop'_t))||  the same with crop' the next image's crop: the
                                               baseline of "trunk" (a representation that maps every
                                               input close together has a small "trunk" distance too).

The gap (other - own; `gaps`) is what tells invariance: near 0, the shuffled version of an image is
no closer to it than any other image's; large, the representation keeps the image's identity
through the shuffle. It is the comparison the learning benchmark makes (PIRL against Jigsaw, the
paper's Sec. 5.1.1 in miniature), on "trunk" for every model and on "pirl_head" for PIRL.

The Jigsaw model has no image head and its patch path ends in a permutation classifier, so it
has no counterpart of f(v_I) - g(v_It); "trunk" is the comparison made for it. Means, standard
deviations, quantiles and a histogram of each distance per checkpoint go to invariance.json /
invariance.png.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms as T

from dali_pipelines import IMAGENET_MEAN, IMAGENET_STD  # no DALI import
from pirl_fast.eval.features import RESIZE_RATIO, eval_transform
from pirl_fast.runtime.progress import progress

METRICS = ("pirl_head", "pirl_head_other", "trunk", "trunk_other")
GAPS = {"pirl_head": "pirl_head_other", "trunk": "trunk_other"}  # own-image metric -> its other-image baseline


@dataclass(frozen=True)
class ViewConfig:
    image_size: int = 224
    patch_crop_size: int = 255  # cut into grid x grid cells (must divide)
    grid: int = 3
    patch_size: int = 64  # the centre patch_size crop of each cell

    @classmethod
    def from_run_config(cls, config: dict) -> ViewConfig:
        data = config.get("data", {})
        return cls(**{k: int(data[k]) for k in ("image_size", "patch_crop_size", "grid", "patch_size") if k in data})

    def check(self) -> None:
        cell = self.patch_crop_size // self.grid
        if self.patch_crop_size % self.grid or self.patch_size > cell:
            raise ValueError(f"invariance views: patch_crop_size={self.patch_crop_size} must be divisible by grid="
                             f"{self.grid} and patch_size={self.patch_size} must fit in a {cell} px cell")


class InvarianceViews:
    """PIL image -> (v_I (3,S,S), patches in cell order (9,3,p,p), crop (3,C,C)), all normalised."""

    def __init__(self, views: ViewConfig):
        views.check()
        self.views = views
        self.image = eval_transform(views.image_size)
        self.crop = T.Compose([
            T.Resize(round(views.patch_crop_size * RESIZE_RATIO)),
            T.CenterCrop(views.patch_crop_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __call__(self, image: Image.Image) -> tuple[Tensor, Tensor, Tensor]:
        crop = self.crop(image)  # (3, C, C)
        cells = split_cells(crop[None], self.views.grid)[0]  # (9, 3, c, c)
        c, p = cells.shape[-1], self.views.patch_size
        o = (c - p) // 2
        return self.image(image), cells[:, :, o:o + p, o:o + p].contiguous(), crop


def split_cells(x: Tensor, grid: int) -> Tensor:
    """(B, 3, C, C) -> (B, grid*grid, 3, C/grid, C/grid), cells row-major."""
    B, ch, H, W = x.shape
    c = H // grid
    x = x.reshape(B, ch, grid, c, grid, c).permute(0, 2, 4, 1, 3, 5)  # (B, gy, gx, 3, c, c)
    return x.reshape(B, grid * grid, ch, c, c)


def join_cells(cells: Tensor, grid: int) -> Tensor:
    """Inverse of split_cells: (B, grid*grid, 3, c, c) -> (B, 3, grid*c, grid*c)."""
    B, _, ch, c, _ = cells.shape
    x = cells.reshape(B, grid, grid, ch, c, c).permute(0, 3, 1, 4, 2, 5)  # (B, 3, gy, c, gx, c)
    return x.reshape(B, ch, grid * c, grid * c)


def apply_perm(cells: Tensor, perm: Tensor) -> Tensor:
    """Position j shows cell perm[b, j]: (B, 9, ...) , (B, 9) -> (B, 9, ...)."""
    rows = torch.arange(cells.shape[0], device=cells.device)[:, None]
    return cells[rows, perm]


def non_identity_permutations(n: int, num_cells: int, generator: torch.Generator) -> Tensor:
    """(n, num_cells) uniform permutations, each redrawn until it is not the identity."""
    perm = torch.argsort(torch.rand(n, num_cells, generator=generator), dim=1)
    identity = torch.arange(num_cells)
    while (bad := (perm == identity).all(dim=1)).any():
        perm[bad] = torch.argsort(torch.rand(int(bad.sum()), num_cells, generator=generator), dim=1)
    return perm


def unit_distance(a: Tensor, b: Tensor) -> Tensor:
    """||a/|a| - b/|b||| per row: (N, D), (N, D) -> (N,)."""
    return (F.normalize(a.float(), dim=1) - F.normalize(b.float(), dim=1)).norm(dim=1)


@torch.no_grad()
def invariance_distances(model: nn.Module, method: str, loader, grid: int, device, seed: int = 0,
                         identity: bool = False) -> dict[str, Tensor]:
    """Per-image distances {"trunk", "trunk_other": (N,)}, plus "pirl_head" and "pirl_head_other" for PIRL.
    `identity=True` presents the cells unshuffled (a check: every distance of "trunk" is then 0)."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, list[Tensor]] = {m: [] for m in METRICS}
    for (images, patches, crops), _, _ in progress(loader, desc=f"invariance ({method})", unit="batch"):
        B = images.shape[0]
        num_cells = grid * grid
        perm = (torch.arange(num_cells).expand(B, num_cells) if identity
                else non_identity_permutations(B, num_cells, generator))  # (B, 9)
        crops = crops.to(device)
        crops_t = join_cells(apply_perm(split_cells(crops, grid), perm.to(device)), grid)  # (B, 3, C, C)
        own, shuffled = model.features(crops), model.features(crops_t)  # (B, trunk_dim) each
        out["trunk"].append(unit_distance(own, shuffled).cpu())
        if B > 1:  # each crop against the next image's shuffled crop
            out["trunk_other"].append(unit_distance(own, shuffled.roll(1, dims=0)).cpu())
        if method == "pirl":
            shuffled = apply_perm(patches.to(device), perm.to(device)).flatten(0, 1)  # (B*9, 3, p, p)
            f, g = model(images.to(device), shuffled)  # both already unit rows
            out["pirl_head"].append(unit_distance(f, g).cpu())
            if B > 1:  # pair each image with the next one's patches
                out["pirl_head_other"].append(unit_distance(f, g.roll(1, dims=0)).cpu())
    return {k: torch.cat(v) for k, v in out.items() if v}


def gaps(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """{metric: mean other-image distance - mean own-image distance} for the metrics `summary` has both of."""
    return {own: summary[other]["mean"] - summary[own]["mean"] for own, other in GAPS.items()
            if own in summary and other in summary}


def summarise(d: Tensor) -> dict[str, float]:
    q = torch.quantile(d.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"mean": d.mean().item(), "std": d.std().item() if d.numel() > 1 else 0.0,
            "p10": q[0], "median": q[1], "p90": q[2], "n": d.numel()}


def plot_histograms(results: dict[str, dict[str, Tensor]], path, bins: int = 40) -> None:
    """One panel per metric, one histogram per checkpoint label, on the common range [0, 2]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("pirl_head", "trunk") if any(m in r for r in results.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    titles = {"pirl_head": "PIRL heads: ||f(v_I) - g(v_It)||", "trunk": "trunk: ||n(res5(I)) - n(res5(I_t))||"}
    for ax, metric in zip(axes[0], metrics):
        for label, dists in results.items():
            if metric in dists:
                d = dists[metric].numpy()
                ax.hist(d, bins=bins, range=(0.0, 2.0), alpha=0.55, label=f"{label} (mean {d.mean():.3f})")
            if GAPS[metric] in dists:
                d = dists[GAPS[metric]].numpy()
                ax.hist(d, bins=bins, range=(0.0, 2.0), histtype="step", linewidth=1.5,
                        label=f"{label}, other image (mean {d.mean():.3f})")
        ax.set_title(titles[metric])
        ax.set_xlabel("L2 distance between unit vectors")
        ax.set_ylabel("images")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
