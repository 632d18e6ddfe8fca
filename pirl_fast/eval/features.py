"""Frozen-network evaluation plumbing: labelled images from shards, trained models from checkpoints,
and batched feature extraction with a progress bar.

The labelled images and the deterministic evaluation view (`ShardImageDataset`, `eval_transform`:
resize the shorter side to image_size * 256/224, centre-crop image_size) live in
pirl_fast/data/labelled_shards.py, below the trainer, whose kNN monitor reads them too; image_size
defaults to the size the checkpoint was pre-trained at, `data.image_size`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from dali_pipelines import IMAGENET_MEAN, IMAGENET_STD  # no DALI import
from pirl_fast.data.labelled_shards import RESIZE_RATIO, ShardImageDataset, eval_transform  # noqa: F401 (re-exported)
from pirl_fast.model.jigsaw import JigsawModel
from pirl_fast.model.network import ModelConfig, PIRLModel, memory_format_for
from pirl_fast.model.supervised import SupervisedModel
from pirl_fast.runtime.progress import progress
from pirl_fast.shard.format import ShardError
from pirl_fast.train.checkpoint import list_checkpoints, load_latest


def train_transform(image_size: int) -> Callable[[Image.Image], Tensor]:
    """The linear-probe training view (Goyal et al. 2019): random resized crop + horizontal flip."""
    return T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def svm_transform(image_size: int) -> Callable[[Image.Image], Tensor]:
    """The reference's SVM view (eval_resnet_8gpu_transfer_voc07_svm.yaml): resize the shorter side to
    256, then squash to 224 x 224, no crop (scaled to image_size)."""
    return T.Compose([
        T.Resize(round(image_size * RESIZE_RATIO)),
        T.Resize((image_size, image_size)),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def make_loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


# ---- models ------------------------------------------------------------------------------------

@dataclass
class Pretrained:
    model: nn.Module  # PIRLModel or JigsawModel, eval mode, frozen
    method: str  # "pirl" | "jigsaw" | "random-init"
    config: dict  # the run's resolved config (plain dict); {} for a random-init network
    path: Path | None  # the checkpoint file, None for a random-init network


def build_model(method: str, config: dict) -> nn.Module:
    """The network a run of `method` trains, from its resolved config dict."""
    model_cfg = ModelConfig(**config.get("model", {}))
    if method == "pirl":
        return PIRLModel(model_cfg)
    if method == "jigsaw":
        return JigsawModel(model_cfg, int(config.get("data", {}).get("num_permutations", 0)))
    if method == "supervised":
        return SupervisedModel(model_cfg, model_cfg.num_classes)
    raise ValueError(f"checkpoint config has method={method!r}; evaluation knows 'pirl', 'jigsaw' and 'supervised'")


def read_checkpoint(path: str | os.PathLike) -> tuple[Path, dict, dict]:
    """(checkpoint file, its dict, the run's resolved config as a plain dict); weights_only load.

    `path` may be a checkpoint file or a run directory: then its newest checkpoint that loads, chosen
    as the trainer chooses where to resume (checkpoint.load_latest: a corrupt newest file is skipped
    with a warning naming it). The trainer stores the resolved config as YAML text under
    "config_yaml" (pirl_fast/train/loop.py `save_checkpoint`).
    """
    path = Path(path)
    run_dir = next((d for d in (path, path.parent) if list_checkpoints(d)), None) if path.is_dir() else None
    if run_dir is not None:  # a run directory, or its checkpoints/ folder
        path, ckpt = load_latest(run_dir, load_weights)
    else:
        path = resolve_checkpoint(path)
        ckpt = load_weights(path)
    if "config_yaml" in ckpt:
        config = OmegaConf.to_container(OmegaConf.create(ckpt["config_yaml"]), resolve=True)
    else:
        config = dict(ckpt["config"])
    return path, ckpt, config


def load_weights(path: Path) -> dict:
    """A training checkpoint's dict (weights_only); ValueError unless it holds 'model' and its config."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or not ({"config_yaml", "config"} & set(ckpt)):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a pirl_fast training checkpoint (needs 'model' and 'config_yaml'; has "
                         f"{keys}); pass a file written by `python -m pirl_fast.train`")
    return ckpt


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file as is; for a folder without checkpoints/step_*.pt, its newest *.pt."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a checkpoint file or a run directory")
    found = sorted(path.rglob("*.pt"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1]
    raise FileNotFoundError(f"no checkpoint (checkpoints/step_*.pt) under {path}: train first (`python -m "
                            f"pirl_fast.train ... hydra.run.dir={path}`) or pass the checkpoint file")


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> Pretrained:
    """The trained network of a checkpoint (PIRL or Jigsaw), in eval mode with gradients off."""
    ckpt_path, ckpt, config = read_checkpoint(path)
    method = str(config.get("method", "pirl"))
    model = build_model(method, config)
    state = {_strip_prefixes(k): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state, strict=True)
    return Pretrained(_freeze(model, device), method, config, ckpt_path)


def random_init(arch: str, seed: int = 0, device: str | torch.device = "cpu", model_config: dict | None = None
                ) -> Pretrained:
    """The network at its seeded initialisation: the baseline any learning must beat.

    With seed = the run's trainer.seed the trunk is bit for bit the one that run started from (the
    trainer seeds torch, builds the loader, which draws nothing from torch's global generator, then
    builds the model, trunk first): "the same network, untrained". Other seeds show the spread.
    """
    torch.manual_seed(seed)
    model = PIRLModel(ModelConfig(**{**(model_config or {}), "arch": arch}))
    return Pretrained(_freeze(model, device), "random-init", {"model": {"arch": arch}}, None)


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers, if a trainer saved them
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _freeze(model: nn.Module, device) -> nn.Module:
    # Channels-last weights suit cuDNN; CPU convolutions with them run 5-20x slower on small
    # inputs (ResNet-18, 8-64 px, torch 2.14), so evaluation on the CPU uses plain NCHW weights.
    model.eval().to(device, memory_format=memory_format_for(device))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def extract(fn: Callable[[Tensor], Tensor], loader: DataLoader, device, desc: str) -> tuple[Tensor, Tensor, Tensor]:
    """Run `fn` over every batch: (features (N, D) float32 on CPU, labels (N,), global index (N,))."""
    feats, labels, index = [], [], []
    for images, y, idx in progress(loader, desc=desc, unit="batch"):
        feats.append(fn(images.to(device, non_blocking=True)).float().cpu())
        labels.append(y)
        index.append(idx)
    if not feats:
        raise ShardError(f"{desc}: the loader yielded no samples (empty shard directory?)")
    return torch.cat(feats), torch.cat(labels).long(), torch.cat(index).long()

