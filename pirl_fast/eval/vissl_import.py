"""python -m pirl_fast.eval import-vissl CKPT --out DIR: the reference's checkpoints as ours.

The reference implementation (facebookresearch/vissl) publishes its PIRL and Jigsaw models as
checkpoints of its own trainer (vissl/hooks/log_hooks.py, CheckpointHook):

    {"phase_idx": int, "iteration": int, "iteration_num": int, "train_phase_idx": int,
     "loss": {...loss state, e.g. the memory bank...},
     "classy_state_dict": {"base_model": {"model": {"trunk": {...}, "heads": {...}},
                                          "meta": {"trunk": {}, "heads": []}},
                           "optimizer": {...}, "phase_idx": ..., "losses": [...], ...}}

(vissl/models/base_ssl_model.py, get_classy_state). Key names:

    trunk   "_feature_blocks.<torchvision name>": the ResNeXt trunk (vissl/models/trunks/resnext.py)
            keeps torchvision's modules in a ModuleDict _feature_blocks (conv1, bn1, layer1..4);
            a trunk saved by a feature-extraction run carries "base_model." in front.
    heads   "<head index>.<module index>.clf.<layer index>.<param>": heads is an nn.ModuleList; a
            head of several modules is an nn.Sequential; an "mlp" keeps its layers in .clf.

Heads we map (each exactly one known layout of the reference's configs; anything else is refused):

    PIRL, configs/config/pretrain/pirl/pirl_jigsaw_4node_resnet50.yaml (head 0 on patches, 1 on images)
        0.0.clf.0.{weight,bias}  (D, 2048)    -> patch_head     mlp [2048, 128]
        0.2.clf.0.{weight,bias}  (D, 9*D)     -> jigsaw_head    mlp [1152, 128] after siamese_concat_view 9
        1.clf.0.{weight,bias}    (D, 2048)    -> image_head     mlp [2048, 128]
    Jigsaw, configs/config/pretrain/jigsaw/jigsaw_8gpu_resnet.yaml -> JigsawModel(jigsaw_head=reference)
        0.0.clf.0.{weight,bias}  (1000, 2048) -> patch_head.0   mlp [2048, 1000] use_bn use_relu
        0.0.clf.1.{weight,bias,running_mean,running_var,num_batches_tracked} -> patch_head.1 (BatchNorm1d)
        0.2.clf.0.{weight,bias}  (P, 9000)    -> classifier     mlp [9000, P]

The MLP-head PIRL models (pirl/models/resnet50_mlphead.yaml, 2048-2048-128) have no counterpart in
this project's PIRLModel: they are refused unless --trunk-only, which keeps the trunk alone (the
heads get a seeded initialisation and the checkpoint's config says `imported.heads: false`, so
commands that need the heads refuse it). Every linear, kNN, SVM and fine-tuning evaluation needs
only the trunk.

Loading is `torch.load(weights_only=True)`: no code from the file runs. Reference checkpoints also
hold non-tensor data (ints, floats, lists, dicts: allowed as they are) and, in some (those
converted from Caffe2, and numpy scalars in logged state), numpy arrays. Unpickling a numpy array
needs four numpy globals (multiarray._reconstruct, multiarray.scalar, ndarray, dtype and its
per-type dtype classes); they only rebuild arrays from bytes, so we allow exactly those (by name,
in a torch.serialization.safe_globals block) and turn arrays into tensors. Any other global in the
file is refused with its name; nothing is ever loaded with weights_only=False.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from omegaconf import OmegaConf
from torch import Tensor

from pirl_fast.model.network import ARCHS
from pirl_fast.runtime.atomic import atomic_write
from pirl_fast.train.checkpoint import save_atomic


class ImportRefused(ValueError):
    """The checkpoint cannot be mapped (or loaded safely); the message says what and why."""


def _numpy_globals() -> dict[str, object]:
    """The numpy names a pickled array or scalar needs, under both numpy 1 and numpy 2 module paths."""
    core = np._core if hasattr(np, "_core") else np.core
    out: dict[str, object] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{module}._reconstruct"] = core.multiarray._reconstruct
        out[f"{module}.scalar"] = core.multiarray.scalar
    for name in dir(getattr(np, "dtypes", object())):
        if name.endswith("DType"):
            out[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return out


def load_reference(path: str | Path) -> tuple[dict, list[str]]:
    """(the checkpoint dict, the numpy globals that were needed); weights_only=True throughout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a reference checkpoint file (*.torch / *.pth)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError:
        pass  # a global outside torch's allow-list: numpy arrays are the expected case, handled below
    except Exception as e:  # truncated download, not a torch file at all
        raise ImportRefused(f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {e})") from e
    allowed = _numpy_globals()
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (torch < 1.6 format): try the numpy allow-list directly
        needed = None
    if needed is not None:
        refused = [g for g in needed if g not in allowed]
        if refused:
            raise ImportRefused(
                f"{path} needs these Python objects to be unpickled: {refused}. Loading them can run code, so "
                "import-vissl refuses (it loads with weights_only=True and allows only numpy arrays). If you "
                "trust the file, keep only its weights in a trusted environment: python -c \"import torch; "
                f"c = torch.load('{path}', weights_only=False); torch.save({{'classy_state_dict': "
                "{'base_model': c['classy_state_dict']['base_model']}}, 'weights_only.torch')\" and import that.")
    names = needed if needed is not None else list(allowed)
    # numpy.dtype(...) rebuilds per-type dtype classes (Float32DType, ...) that BUILD then checks.
    dtype_classes = [v for k, v in allowed.items() if k.startswith("numpy.dtypes.")]
    try:
        with torch.serialization.safe_globals([(allowed[n], n) for n in names] + dtype_classes):
            return torch.load(path, map_location="cpu", weights_only=True), sorted(set(names))
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        reason = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[-1])[:300]
        raise ImportRefused(f"{path} cannot be loaded with weights_only=True ({reason}); import-vissl loads "
                            "nothing that needs arbitrary Python objects") from e


def _tensor(value, key: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ImportRefused(f"{key} holds a {type(value).__name__}, not a tensor or array")


def model_state(ckpt: dict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(trunk state, heads state) under the reference's own names, from either of its layouts:
    classy_state_dict (what its trainer writes) or a flat model_state_dict with trunk./heads. keys."""
    if not isinstance(ckpt, dict):
        raise ImportRefused(f"the file holds a {type(ckpt).__name__}, not a checkpoint dict")
    if "classy_state_dict" in ckpt:
        try:
            model = ckpt["classy_state_dict"]["base_model"]["model"]
            trunk, heads = model["trunk"], model.get("heads", {})
        except (KeyError, TypeError) as e:
            raise ImportRefused(f"classy_state_dict has no base_model.model.trunk ({e}): not a reference "
                                "checkpoint of a ResNet model") from e
    elif "model_state_dict" in ckpt or any(str(k).startswith("trunk.") for k in ckpt):
        flat = ckpt.get("model_state_dict", ckpt)
        trunk = {k[len("trunk."):]: v for k, v in flat.items() if k.startswith("trunk.")}
        heads = {k[len("heads."):]: v for k, v in flat.items() if k.startswith("heads.")}
    else:
        raise ImportRefused(f"no classy_state_dict or model_state_dict in the checkpoint (top-level keys "
                            f"{sorted(map(str, ckpt))[:12]}): is it a reference (vissl) checkpoint? A torchvision "
                            "state dict needs no import: torchvision.models.resnet50().load_state_dict(...)")
    if isinstance(heads, list):  # FSDP-era checkpoints keep one dict per head
        heads = {f"{i}.{k}": v for i, h in enumerate(heads) for k, v in h.items()}
    return ({k: _tensor(v, f"trunk.{k}") for k, v in trunk.items()},
            {k: _tensor(v, f"heads.{k}") for k, v in heads.items()})


def trunk_to_torchvision(trunk: dict[str, Tensor]) -> tuple[str, dict[str, Tensor]]:
    """(arch, state dict under torchvision's keys without fc); refuses keys or shapes that do not map."""
    out = {}
    for key, value in trunk.items():
        name = key[len("base_model."):] if key.startswith("base_model.") else key
        if not name.startswith("_feature_blocks."):
            raise ImportRefused(f"trunk key {key!r} is not under _feature_blocks: not the reference's ResNe(X)t "
                                "trunk (vissl/models/trunks/resnext.py); other trunks have no counterpart here")
        out[name[len("_feature_blocks."):]] = value
    for arch, (builder, _) in ARCHS.items():
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            reference = getattr(torchvision.models, builder)(weights=None).state_dict()
        reference = {k: v for k, v in reference.items() if not k.startswith("fc.")}
        if set(reference) == set(out) and all(reference[k].shape == out[k].shape for k in out):
            return arch, out
    widths = {k: tuple(v.shape) for k, v in out.items() if k in ("conv1.weight", "fc.weight")}
    raise ImportRefused(f"the trunk ({len(out)} tensors, e.g. {widths}) matches none of this project's "
                        f"architectures ({', '.join(ARCHS)}) key for key and shape: wider (RN50-w2/w4), deeper "
                        "or ResNeXt reference models cannot be evaluated here")


@dataclass
class HeadLayout:
    method: str  # pirl | jigsaw
    mapping: dict[str, str]  # our key -> the reference's key
    model: dict = field(default_factory=dict)  # ModelConfig fields implied by the shapes
    data: dict = field(default_factory=dict)  # DataConfig fields implied (num_permutations)


_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def match_heads(heads: dict[str, Tensor], trunk_dim: int) -> HeadLayout | None:
    """The known layout `heads` is exactly (same keys, consistent shapes), or None."""
    keys = set(heads)
    pirl = {"patch_head.weight": "0.0.clf.0.weight", "patch_head.bias": "0.0.clf.0.bias",
            "jigsaw_head.weight": "0.2.clf.0.weight", "jigsaw_head.bias": "0.2.clf.0.bias",
            "image_head.weight": "1.clf.0.weight", "image_head.bias": "1.clf.0.bias"}
    if keys == set(pirl.values()):
        d = heads["1.clf.0.weight"].shape[0]
        concat = heads["0.2.clf.0.weight"].shape[1]
        if (heads["1.clf.0.weight"].shape == (d, trunk_dim) and heads["0.0.clf.0.weight"].shape == (d, trunk_dim)
                and heads["0.2.clf.0.weight"].shape[0] == d and concat % d == 0):
            return HeadLayout("pirl", pirl, model={"embed_dim": d, "num_patches": concat // d})
    jigsaw = {"patch_head.0.weight": "0.0.clf.0.weight", "patch_head.0.bias": "0.0.clf.0.bias",
              **{f"patch_head.1.{p}": f"0.0.clf.1.{p}" for p in _BN},
              "classifier.weight": "0.2.clf.0.weight", "classifier.bias": "0.2.clf.0.bias"}
    if keys == set(jigsaw.values()):
        width, in_dim = heads["0.0.clf.0.weight"].shape
        perms, concat = heads["0.2.clf.0.weight"].shape
        if in_dim == trunk_dim and width == 1000 and concat % width == 0:
            return HeadLayout("jigsaw", jigsaw, model={"jigsaw_head": "reference", "num_patches": concat // width},
                              data={"num_permutations": perms})
    return None


def convert(ckpt: dict, *, trunk_only: bool = False) -> tuple[dict[str, Tensor], dict, dict]:
    """(our model state dict, resolved config for it, a report of what was mapped)."""
    trunk, heads = model_state(ckpt)
    arch, tv = trunk_to_torchvision(trunk)
    layout = match_heads(heads, ARCHS[arch][1])
    report = {"arch": arch, "trunk_tensors": len(tv), "reference_head_keys": sorted(heads)}
    if layout is None and not trunk_only:
        shapes = {k: list(v.shape) for k, v in sorted(heads.items())}
        raise ImportRefused(f"the heads match neither the reference's PIRL linear heads nor its Jigsaw head (see "
                            f"`python -m pirl_fast.eval import-vissl --help`): {shapes}. Pass --trunk-only to "
                            "import the trunk alone (enough for linear, kNN, SVM and fine-tuning)")
    config = {"method": layout.method if layout else "pirl",
              "model": {"arch": arch, **(layout.model if layout else {})},
              "data": {"image_size": 224, **(layout.data if layout else {})}}
    state = {f"trunk.{k}": v.clone() for k, v in tv.items()}
    if layout is not None:
        state.update({ours: heads[ref].clone() for ours, ref in layout.mapping.items()})
    report["heads"] = sorted(layout.mapping) if layout else False
    config["imported"] = {"heads": bool(layout), "method": config["method"]}
    return state, config, report


def import_checkpoint(src: str | Path, out_dir: str | Path, *, trunk_only: bool = False) -> Path:
    """Convert the reference checkpoint `src` into out_dir/checkpoints/step_<iteration>.pt (our layout,
    loadable by every `python -m pirl_fast.eval` command) and out_dir/config.yaml; returns the file."""
    from pirl_fast.eval.features import build_model  # evaluation plumbing; imported here to keep this module light

    ckpt, numpy_globals = load_reference(src)
    state, config, report = convert(ckpt, trunk_only=trunk_only)
    model = build_model(config["method"], config)
    ours = model.state_dict()
    heads_missing = sorted(k for k in ours if k not in state)
    if heads_missing:  # --trunk-only: the heads keep their seeded initialisation, and the config says so
        if not trunk_only:
            raise ImportRefused(f"mapped checkpoint lacks {heads_missing}")
        state.update({k: ours[k] for k in heads_missing})
    model.load_state_dict(state, strict=True)  # every shape checked against the network we will evaluate
    step = int(ckpt.get("iteration", 0) or 0) if isinstance(ckpt, dict) else 0
    config["imported"].update({"from": str(Path(src).resolve()), "numpy_globals": numpy_globals,
                               "phase_idx": ckpt.get("phase_idx") if isinstance(ckpt, dict) else None})
    out_dir = Path(out_dir)
    path = out_dir / "checkpoints" / f"step_{step:09d}.pt"
    yaml = OmegaConf.to_yaml(OmegaConf.create(config))
    save_atomic({"model": state, "config_yaml": yaml, "step": step, "import_report": report}, path)
    with atomic_write(out_dir / "config.yaml", "w") as f:
        f.write(yaml)
    return path
