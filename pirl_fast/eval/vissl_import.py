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

Heads: the three layouts of pirl_fast/eval/vissl_layout.py (PIRL with linear heads, PIRL with MLP
heads -> model.head=mlp, Jigsaw -> model.jigsaw_head=reference), matched exactly (same keys, every
shape consistent). A file whose heads are empty (a trunk saved alone, or a feature-extraction run)
imports as its trunk; heads of any other layout are refused unless --trunk-only. With no heads the
network's heads keep a seeded initialisation and the config says `imported.heads: false`, so the
commands that need heads (invariance) refuse it; linear, kNN, SVM and fine-tuning need only the trunk.

Loss state (the checkpoint's top-level "loss", NCELossWithMemory.state_dict() in
vissl/losses/nce_loss.py): its memory bank `nce_average.memory` (N, D) and `nce_average.params`
= [num_negatives, temperature, Z, momentum] are kept: the bank as our MemoryBank's state ("bank":
rows, all marked seen) and Z (when the reference had estimated it, > 0) as the criterion's two
normalisers ("criterion"), the parameters in the config under `imported.nce_params`. The rest
(optimizer state, meters, the alias sampler's tables, which are rebuilt from N) is ignored, and
the import says so in one line.

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
from pathlib import Path

import numpy as np
import torch
import torchvision
from omegaconf import OmegaConf
from torch import Tensor

from pirl_fast.eval import vissl_layout
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
    classy_state_dict (what its trainer writes, and its consolidated checkpoints: vissl/utils/checkpoint.py)
    or a flat model_state_dict with trunk./heads. keys."""
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


def loss_state(ckpt: dict) -> tuple[dict, list[str]]:
    """(what we keep of the reference's loss state: memory, nce_params; the names of what we ignore)."""
    loss = ckpt.get("loss") if isinstance(ckpt, dict) else None
    kept: dict = {}
    ignored: list[str] = []
    if isinstance(loss, dict) and "nce_average.memory" in loss:
        kept["memory"] = _tensor(loss["nce_average.memory"], "loss.nce_average.memory").float()
        if "nce_average.params" in loss:
            k, t, z, m = (float(v) for v in _tensor(loss["nce_average.params"], "loss.nce_average.params"))
            kept["nce_params"] = {"num_negatives": int(k), "temperature": t, "z": z, "momentum": m}
        ignored += [f"loss.{k}" for k in sorted(loss) if k not in ("nce_average.memory", "nce_average.params")]
    elif isinstance(loss, dict) and loss:
        ignored += [f"loss.{k}" for k in sorted(loss)]
    classy = ckpt.get("classy_state_dict", {}) if isinstance(ckpt, dict) else {}
    if isinstance(classy, dict):
        ignored += [f"classy_state_dict.{k}" for k in sorted(classy) if k != "base_model"
                    and isinstance(classy[k], (dict, list, Tensor)) and len(classy[k])]
    return kept, ignored


def convert(ckpt: dict, *, trunk_only: bool = False) -> tuple[dict[str, Tensor], dict, dict]:
    """(our model state dict, resolved config for it, a report of what was mapped and what was left)."""
    trunk, heads = model_state(ckpt)
    arch, tv = trunk_to_torchvision(trunk)
    found = vissl_layout.match(heads, ARCHS[arch][1]) if heads else None
    if heads and found is None and not trunk_only:
        shapes = {k: list(v.shape) for k, v in sorted(heads.items())}
        names = "; ".join(f"{layout.name} ({layout.source})" for layout in vissl_layout.LAYOUTS)
        raise ImportRefused(f"the heads match none of the reference's layouts we map ({names}): {shapes}. Pass "
                            "--trunk-only to import the trunk alone (enough for linear, kNN, SVM and fine-tuning)")
    report: dict = {"arch": arch, "trunk_tensors": len(tv), "reference_head_keys": sorted(heads), "notes": []}
    config: dict = {"method": "pirl", "model": {"arch": arch}, "data": {"image_size": 224}}
    state = {f"trunk.{k}": v.clone() for k, v in tv.items()}
    if found is not None:
        layout, dims = found
        config["method"] = layout.method
        config["model"].update(layout.model, num_patches=dims["P"])
        if layout.method == "pirl":
            config["model"]["embed_dim"] = dims["D"]
        else:
            config["data"]["num_permutations"] = dims["N"]
        state.update(vissl_layout.from_reference(layout, heads))
        report["layout"] = f"{layout.name} ({layout.source})"
    elif not heads:
        report["notes"].append("the file holds no heads (a trunk saved alone): imported as its trunk; the heads "
                               "keep a seeded initialisation (imported.heads=false)")
    else:
        report["notes"].append(f"--trunk-only: {len(heads)} head tensors of an unknown layout left out")
    report["heads"] = sorted(vissl_layout.from_reference(found[0], heads)) if found else False
    config["imported"] = {"heads": found is not None, "method": config["method"]}
    return state, config, report


def import_checkpoint(src: str | Path, out_dir: str | Path, *, trunk_only: bool = False) -> Path:
    """Convert the reference checkpoint `src` into out_dir/checkpoints/step_<iteration>.pt (our layout,
    loadable by every `python -m pirl_fast.eval` command) and out_dir/config.yaml; returns the file.
    The file's "import_report" holds what was mapped and `notes`: one line for each thing left out."""
    from pirl_fast.eval.features import build_model  # evaluation plumbing; imported here to keep this module light

    ckpt, numpy_globals = load_reference(src)
    state, config, report = convert(ckpt, trunk_only=trunk_only)
    model = build_model(config["method"], config)
    ours = model.state_dict()
    heads_missing = sorted(k for k in ours if k not in state)
    if heads_missing:  # no heads mapped: they keep their seeded initialisation, and the config says so
        if config["imported"]["heads"]:
            raise ImportRefused(f"mapped checkpoint lacks {heads_missing}")
        state.update({k: ours[k] for k in heads_missing})
    model.load_state_dict(state, strict=True)  # every shape checked against the network we will evaluate
    saved = {"model": state}
    kept, ignored = loss_state(ckpt)
    if "memory" in kept:  # PIRL's memory bank (NPID's): our MemoryBank's state, every row counted as written
        memory = kept["memory"]
        saved["bank"] = {"bank": memory, "seen": torch.ones(memory.shape[0], dtype=torch.bool),
                         "_extra_state": {"draws": 0, "seed": 0}}
        z = kept.get("nce_params", {}).get("z", -1.0)
        z = torch.tensor(z if z > 0 else float("nan"))  # -1: the reference had not estimated it yet
        saved["criterion"] = {"z_jigsaw": z.clone(), "z_image": z.clone()}  # one Z for both terms, as there
        config["imported"]["nce_params"] = kept.get("nce_params", {})
        report["bank"] = list(memory.shape)
        report["notes"].append(f"memory bank imported: {memory.shape[0]} rows of {memory.shape[1]} (checkpoint "
                               f"keys bank, criterion); nce params {kept.get('nce_params', 'absent')}")
    if ignored:
        report["notes"].append(f"ignored (training state that has no counterpart here): {', '.join(ignored)}")
    step = int(ckpt.get("iteration", 0) or 0) if isinstance(ckpt, dict) else 0
    config["imported"].update({"from": str(Path(src).resolve()), "numpy_globals": numpy_globals,
                               "phase_idx": ckpt.get("phase_idx") if isinstance(ckpt, dict) else None})
    out_dir = Path(out_dir)
    path = out_dir / "checkpoints" / f"step_{step:09d}.pt"
    yaml = OmegaConf.to_yaml(OmegaConf.create(config))
    save_atomic({**saved, "config_yaml": yaml, "step": step, "import_report": report}, path)
    with atomic_write(out_dir / "config.yaml", "w") as f:
        f.write(yaml)
    return path
