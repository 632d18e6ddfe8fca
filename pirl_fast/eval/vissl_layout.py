"""The reference's head layouts: which of its HEAD.PARAMS each of our heads is, and the key names it saves.

The reference (facebookresearch/vissl) builds its heads from the config's MODEL.HEAD.PARAMS
(vissl/models/base_ssl_model.py, `_get_heads`): `heads` is an nn.ModuleList with one entry per
element of PARAMS; an element that is itself a list of head modules becomes an nn.Sequential of
them, an element that is one module ["name", {kwargs}] is that module. An "mlp"
(vissl/models/heads/mlp.py, `create_layers`) keeps its layers in `.clf`: per step of `dims` a
Linear, then (unless it is the last step and skip_last_layer_relu_bn, the default True)
BatchNorm1d if use_bn, ReLU if use_relu. "siamese_concat_view" has no parameters. So the saved
keys are

    <head>.<module>.clf.<layer>.<param>   an element that is a list of modules
    <head>.clf.<layer>.<param>            an element that is a single module

Our networks correspond to three of the reference's configs (the parameterised layers of each,
in the reference's order, beside ours):

    pirl, model.head=linear   configs/config/pretrain/pirl/pirl_jigsaw_4node_resnet50.yaml
        [[mlp [W, D], siamese_concat_view P, mlp [P*D, D]], [[mlp [W, D]]]]
        0.0.clf.0 patch_head   0.2.clf.0 jigsaw_head   1.0.clf.0 image_head
    pirl, model.head=mlp      configs/config/pretrain/pirl/models/resnet50_mlphead.yaml
        [[mlp [W, W, D] relu, keep last relu, siamese_concat_view P, mlp [P*D, D]], [[mlp [W, W, D] relu]]]
        0.0.clf.0 patch_head.0   0.0.clf.2 patch_head.2   0.2.clf.0 jigsaw_head
        1.0.clf.0 image_head.0   1.0.clf.2 image_head.2
    jigsaw, model.jigsaw_head=reference   configs/config/pretrain/jigsaw/jigsaw_8gpu_resnet.yaml
        [mlp [W, 1000] bn relu keep last, siamese_concat_view P, mlp [P*1000, N]]   (flat: three heads)
        0.clf.0 patch_head.0   0.clf.1 patch_head.1 (BatchNorm1d)   2.clf.0 classifier

(W: the trunk's width, 2048 for ResNet-50; D: model.embed_dim, 128; P: model.num_patches, 9;
N: data.num_permutations, 2000 there.) Import and export both go through `LAYOUTS`; the tests
build their checkpoints with nn modules following `_get_heads` instead, never from this table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pirl_fast.model.network import ModelConfig

LINEAR = ("weight", "bias")
BATCHNORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
JIGSAW_WIDTH = 1000  # jigsaw_8gpu_resnet.yaml: ["mlp", {"dims": [2048, 1000], ...}] per patch


@dataclass(frozen=True)
class Layer:
    ours: str  # our module, e.g. "patch_head.0"
    ref: str  # the reference's module, e.g. "0.0.clf.0"
    kind: str  # linear | batchnorm
    shape: tuple[str, str] | str  # linear (out, in) / batchnorm width, in the symbols W, D, P*D, ...


@dataclass(frozen=True)
class Layout:
    name: str  # what the user is told
    method: str  # pirl | jigsaw
    model: dict  # our ModelConfig fields this layout fixes (head, jigsaw_head)
    source: str  # the reference config it comes from
    layers: tuple[Layer, ...]

    def keys(self) -> dict[str, str]:
        """our state-dict key -> the reference's heads key."""
        out = {}
        for layer in self.layers:
            for p in LINEAR if layer.kind == "linear" else BATCHNORM:
                out[f"{layer.ours}.{p}"] = f"{layer.ref}.{p}"
        return out

    def shapes(self, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """The reference's heads key -> shape, for W, D, P, N given in `dims`."""
        def size(symbol: str) -> int:
            n = 1
            for factor in symbol.split("*"):
                n *= dims[factor] if factor in dims else int(factor)
            return n

        out = {}
        for layer in self.layers:
            if layer.kind == "linear":
                rows, cols = (size(s) for s in layer.shape)
                out.update({f"{layer.ref}.weight": (rows, cols), f"{layer.ref}.bias": (rows,)})
            else:
                width = size(layer.shape)
                out.update({f"{layer.ref}.{p}": (width,) for p in BATCHNORM[:4]})
                out[f"{layer.ref}.num_batches_tracked"] = ()
        return out


LAYOUTS = (
    Layout("PIRL, linear heads", "pirl", {"head": "linear"},
           "configs/config/pretrain/pirl/pirl_jigsaw_4node_resnet50.yaml", (
               Layer("patch_head", "0.0.clf.0", "linear", ("D", "W")),
               Layer("jigsaw_head", "0.2.clf.0", "linear", ("D", "P*D")),
               Layer("image_head", "1.0.clf.0", "linear", ("D", "W")))),
    Layout("PIRL, MLP heads", "pirl", {"head": "mlp"},
           "configs/config/pretrain/pirl/models/resnet50_mlphead.yaml", (
               Layer("patch_head.0", "0.0.clf.0", "linear", ("W", "W")),
               Layer("patch_head.2", "0.0.clf.2", "linear", ("D", "W")),
               Layer("jigsaw_head", "0.2.clf.0", "linear", ("D", "P*D")),
               Layer("image_head.0", "1.0.clf.0", "linear", ("W", "W")),
               Layer("image_head.2", "1.0.clf.2", "linear", ("D", "W")))),
    Layout("Jigsaw, the reference's head", "jigsaw", {"jigsaw_head": "reference"},
           "configs/config/pretrain/jigsaw/jigsaw_8gpu_resnet.yaml", (
               Layer("patch_head.0", "0.clf.0", "linear", (str(JIGSAW_WIDTH), "W")),
               Layer("patch_head.1", "0.clf.1", "batchnorm", str(JIGSAW_WIDTH)),
               Layer("classifier", "2.clf.0", "linear", ("N", f"P*{JIGSAW_WIDTH}")))),
)


def infer_dims(layout: Layout, heads: dict[str, Tensor], trunk_dim: int) -> dict[str, int] | None:
    """W, D, P, N that make `heads` exactly `layout` (same keys, every shape), or None."""
    if set(heads) != set(layout.keys().values()):
        return None
    dims = {"W": trunk_dim}
    if layout.method == "pirl":
        dims["D"] = heads[f"{layout.layers[-1].ref}.weight"].shape[0]  # the image head's output
        concat = heads["0.2.clf.0.weight"].shape[1]
        if dims["D"] < 1 or concat % dims["D"]:
            return None
        dims["P"] = concat // dims["D"]
    else:
        n, concat = heads["2.clf.0.weight"].shape
        if concat % JIGSAW_WIDTH:
            return None
        dims.update(N=n, P=concat // JIGSAW_WIDTH)
    expected = layout.shapes(dims)
    if any(tuple(heads[k].shape) != shape for k, shape in expected.items()):
        return None
    return dims


def match(heads: dict[str, Tensor], trunk_dim: int) -> tuple[Layout, dict[str, int]] | None:
    """The layout `heads` is, with its dimensions; None when it is none of them."""
    for layout in LAYOUTS:
        dims = infer_dims(layout, heads, trunk_dim)
        if dims is not None:
            return layout, dims
    return None


def layout_of(method: str, model: dict) -> Layout | None:
    """The reference layout of our network (method, resolved model config), or None if it has none."""
    if model.get("stem", "imagenet") != "imagenet" or model.get("embed_bn", False):
        return None  # the reference's ResNe(X)t trunk has the ImageNet stem; it has no embedding BatchNorm
    for layout in LAYOUTS:
        if layout.method == method and all(model.get(k, getattr(ModelConfig, k)) == v for k, v in layout.model.items()):
            return layout
    return None


def to_reference(layout: Layout, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our heads' state (keys as in our model) -> the reference's heads dict."""
    return {ref: state[ours] for ours, ref in layout.keys().items()}


def from_reference(layout: Layout, heads: dict[str, Tensor]) -> dict[str, Tensor]:
    """The reference's heads dict -> our heads' state (cloned)."""
    return {ours: heads[ref].clone() for ours, ref in layout.keys().items()}


class NoReferenceLayout(ValueError):
    """Our network has no counterpart among the reference's configs; the message says why."""


def reference_checkpoint(method: str, config: dict, model: dict[str, Tensor], step: int,
                         bank: Tensor | None = None, z: float | None = None) -> dict:
    """Our model's state (and PIRL's bank) as the reference's trainer saves a checkpoint (vissl/hooks/log_hooks.py,
    CheckpointHook: classy_state_dict.base_model.model.{trunk, heads}, the loss state under "loss"). Its
    benchmark configs load it with MODEL.WEIGHTS_INIT.PARAMS_FILE (STATE_DICT_KEY_NAME classy_state_dict).
    The loss state holds the bank as NCELossWithMemory keeps it (nce_average.memory, nce_average.params =
    [num_negatives, temperature, Z, momentum], Z -1 when not estimated); the alias sampler's tables are not
    written (the reference rebuilds them from N)."""
    model_cfg = config.get("model", {})
    layout = layout_of(method, model_cfg)
    if layout is None:
        raise NoReferenceLayout(
            f"method={method} with model {model_cfg} has no counterpart in the reference's configs: export --format "
            "vissl needs method=pirl (model.head=linear|mlp) or method=jigsaw with model.jigsaw_head=reference, "
            "model.stem=imagenet and model.embed_bn=false; `export` without --format writes its trunk for torchvision")
    trunk = {f"_feature_blocks.{k[len('trunk.'):]}": v.contiguous() for k, v in model.items() if k.startswith("trunk.")}
    heads = {k: v.contiguous() for k, v in to_reference(layout, model).items()}
    extra = sorted(k for k in model if not k.startswith("trunk.") and k not in layout.keys())
    if extra:
        raise NoReferenceLayout(f"the model holds {extra}, which the reference's {layout.source} has no place for")
    out = {"phase_idx": 0, "iteration": step, "iteration_num": step, "train_phase_idx": 0,
           "classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads},
                                                "meta": {"trunk": {}, "heads": []}}}}
    if bank is not None:
        loss, bank_cfg = config.get("loss", {}), config.get("bank", {})
        params = [float(bank_cfg.get("num_negatives", 32000)), float(loss.get("temperature", 0.07)),
                  float(z) if z is not None and z == z else -1.0, float(bank_cfg.get("momentum", 0.5))]
        out["loss"] = {"nce_average.params": torch.tensor(params), "nce_average.memory": bank.float().contiguous()}
    return out
