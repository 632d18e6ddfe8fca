"""import-vissl: a checkpoint built here in the reference's layout (modules named as in
facebookresearch/vissl: vissl/models/trunks/resnext.py's _feature_blocks ModuleDict, heads an
nn.ModuleList of "mlp" modules keeping their layers in .clf, Sequential for chained head modules;
saved as its CheckpointHook does) converts exactly: every tensor bit for bit, the same features
and head outputs, and every eval command then runs on it. Unmappable input is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from pirl_fast.eval import cli as ev
from pirl_fast.eval.features import load_pretrained
from pirl_fast.eval.vissl_import import ImportRefused, import_checkpoint, load_reference


class RefTrunk(nn.Module):
    """The reference ResNeXt trunk's module tree (resnext.py): torchvision blocks in _feature_blocks."""

    def __init__(self, arch: str):
        super().__init__()
        tv = getattr(torchvision.models, arch)(weights=None)
        self._feature_blocks = nn.ModuleDict([
            ("conv1", tv.conv1), ("bn1", tv.bn1), ("conv1_relu", tv.relu), ("maxpool", tv.maxpool),
            ("layer1", tv.layer1), ("layer2", tv.layer2), ("layer3", tv.layer3), ("layer4", tv.layer4),
            ("avgpool", tv.avgpool), ("flatten", nn.Flatten(1))])

    def forward(self, x):
        for block in self._feature_blocks.values():
            x = block(x)
        return x


class RefMLP(nn.Module):
    """vissl/models/heads/mlp.py, MLP.create_layers: per step of dims a Linear, then (unless it is the last
    step and skip_last_layer_relu_bn) BatchNorm1d if use_bn, ReLU if use_relu; the layers in self.clf."""

    def __init__(self, dims, use_bn=False, use_relu=False, skip_last_layer_relu_bn=True):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i == len(dims) - 2 and skip_last_layer_relu_bn:
                break
            layers += ([nn.BatchNorm1d(b)] if use_bn else []) + ([nn.ReLU()] if use_relu else [])
        self.clf = nn.Sequential(*layers)

    def forward(self, x):
        return self.clf(x)


class RefConcat(nn.Module):  # siamese_concat_view: (N*towers, C) -> (N, towers*C); no parameters
    def __init__(self, num_towers):
        super().__init__()
        self.num_towers = num_towers

    def forward(self, x):
        return x.reshape(x.shape[0] // self.num_towers, -1)


def get_heads(head_params: list) -> nn.ModuleList:
    """vissl/models/base_ssl_model.py, _get_heads: one head per entry of HEAD.PARAMS; an entry that is a list
    of modules ([["mlp", {...}], ...]) becomes an nn.Sequential of them, one module ["mlp", {...}] is itself."""
    def build(param):  # _build_head_module: get_model_head(name)(model_config, **kwargs)
        name, kwargs = param
        return RefMLP(**kwargs) if name == "mlp" else RefConcat(**kwargs)

    heads = nn.ModuleList()
    for head_param in head_params:
        if isinstance(head_param[0], list):
            heads.append(nn.Sequential(*[build(p) for p in head_param]))
        else:
            heads.append(build(head_param))
    return heads


# HEAD.PARAMS as the reference's configs write them, with the sizes scaled for a ResNet-18 test
# (2048 -> W = 512, 128 -> D = 16, 1152 -> 9 * D, 2000 permutations -> 7); everything else verbatim.
W, D, PERMS = 512, 16, 7
HEAD_PARAMS = {
    "pirl_linear": [  # configs/config/pretrain/pirl/pirl_jigsaw_4node_resnet50.yaml
        [["mlp", {"dims": [W, D], "use_bn": False, "use_relu": False}],
         ["siamese_concat_view", {"num_towers": 9}],
         ["mlp", {"dims": [9 * D, D]}]],
        [["mlp", {"dims": [W, D]}]],
    ],
    "pirl_mlp": [  # configs/config/pretrain/pirl/models/resnet50_mlphead.yaml
        [["mlp", {"dims": [W, W, D], "use_bn": False, "use_relu": True, "skip_last_layer_relu_bn": False}],
         ["siamese_concat_view", {"num_towers": 9}],
         ["mlp", {"dims": [9 * D, D]}]],
        [["mlp", {"dims": [W, W, D], "use_relu": True}]],
    ],
    "jigsaw": [  # configs/config/pretrain/jigsaw/jigsaw_8gpu_resnet.yaml
        ["mlp", {"dims": [W, 1000], "use_bn": True, "use_relu": True, "skip_last_layer_relu_bn": False}],
        ["siamese_concat_view", {"num_towers": 9}],
        ["mlp", {"dims": [9000, PERMS]}],
    ],
}


def reference_outputs(trunk: nn.Module, heads: nn.ModuleList, images, patches) -> dict:
    """The reference's forward (base_ssl_model.py): PIRL maps input i to head i (MULTI_INPUT_HEAD_MAPPING:
    patches -> head 0, images -> head 1); one input with several heads runs them in sequence (heads_forward)."""
    with torch.no_grad():
        if len(heads) == 2:
            return {"g": heads[0](trunk(patches)), "f": heads[1](trunk(images))}
        x = trunk(patches)
        for head in heads:
            x = head(x)
        return {"logits": x}


def our_outputs(net, images, patches) -> dict:
    m = net.model
    with torch.no_grad():
        if net.method == "jigsaw":
            return {"logits": m(patches)}
        g = m.jigsaw_head(m.patch_head(m.features(patches)).reshape(patches.shape[0] // 9, -1))
        return {"g": g, "f": m.image_head(m.features(images))}


def randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                scale, shift = (1.0, 0.5) if "var" in name else (0.2, -0.1)  # variances stay positive
                t.copy_(torch.rand(t.shape, generator=g) * scale + shift)


def reference_checkpoint(path: Path, arch: str, heads: nn.ModuleList, extra: dict | None = None,
                         numpy_conv1: bool = False, loss: dict | None = None) -> tuple:
    trunk = RefTrunk(arch)
    randomise(trunk, 1)
    randomise(heads, 2)
    model = {"trunk": trunk.state_dict(), "heads": heads.state_dict()}
    stored = dict(model["trunk"])
    if numpy_conv1:  # as in the reference's checkpoints converted from Caffe2
        stored["_feature_blocks.conv1.weight"] = stored["_feature_blocks.conv1.weight"].numpy()
    # vissl/hooks/log_hooks.py CheckpointHook: {phase_idx, iteration, loss, iteration_num, train_phase_idx,
    # classy_state_dict = task.get_classy_state()}; base_model from base_ssl_model.py get_classy_state
    classy = {"train": True, "base_model": {"model": {**model, "trunk": stored}, "meta": {"trunk": {}, "heads": []}},
              "optimizer": {"optim": {"state": {}, "param_groups": [{"lr": 0.12, "momentum": 0.9}]}},
              "phase_idx": 4, "train_phase_idx": 4, "num_updates": 5004, "losses": [6.5, 6.25], "hooks": {},
              "loss": {}}
    ckpt = {"phase_idx": 4, "iteration": 5004, "iteration_num": 5004, "train_phase_idx": 4,
            "loss": {} if loss is None else loss, "classy_state_dict": classy, **(extra or {})}
    torch.save(ckpt, path)
    return trunk.eval(), heads.eval(), model


def pirl_heads() -> nn.ModuleList:
    return get_heads(HEAD_PARAMS["pirl_linear"])


def nce_loss_state(n: int = 10, z: float = 1234.5) -> dict:
    """NCELossWithMemory.state_dict() (vissl/losses/nce_loss.py): NCEAverage's buffers params = [K, T, Z,
    momentum] and memory (N, D), and its AliasMethod sampler's prob and alias (N each)."""
    return {"nce_average.params": torch.tensor([32000.0, 0.07, z, 0.5]),
            "nce_average.memory": torch.nn.functional.normalize(torch.randn(n, D), dim=1),
            "nce_average.multinomial.prob": torch.ones(n), "nce_average.multinomial.alias": torch.zeros(n).long()}


@pytest.mark.parametrize("config", ["pirl_linear", "pirl_mlp", "jigsaw"])
def test_reference_layouts_import_exactly(tmp_path, config):
    src = tmp_path / "model_final_checkpoint_phase4.torch"
    trunk, heads, saved = reference_checkpoint(src, "resnet18", get_heads(HEAD_PARAMS[config]))
    path = import_checkpoint(src, tmp_path / "run")
    assert path == tmp_path / "run" / "checkpoints" / "step_000005004.pt"
    net = load_pretrained(tmp_path / "run")
    want = {"pirl_linear": ("pirl", {"head": "linear", "embed_dim": D}), "pirl_mlp": ("pirl", {"head": "mlp"}),
            "jigsaw": ("jigsaw", {"jigsaw_head": "reference"})}[config]
    assert net.method == want[0] and all(net.config["model"][k] == v for k, v in want[1].items())
    assert net.config["imported"]["heads"] is True
    ours = net.model.state_dict()
    for key, value in saved["trunk"].items():  # bit for bit, every trunk tensor
        assert torch.equal(ours["trunk." + key.removeprefix("_feature_blocks.")], value), key
    # every head tensor arrives unchanged: each of the reference's is equal to exactly one of ours, and
    # ours has no other head tensors (the values are random, so equality pins the correspondence)
    our_heads = {k: v for k, v in ours.items() if not k.startswith("trunk.")}
    assert len(our_heads) == len(saved["heads"])
    for key, value in saved["heads"].items():
        same = [k for k, v in our_heads.items() if v.shape == value.shape and torch.equal(v, value)]
        assert len(same) == 1, (key, same)
    images, patches = torch.randn(3, 3, 64, 64), torch.randn(18, 3, 32, 32)
    ref, got = reference_outputs(trunk, heads, images, patches), our_outputs(net, images, patches)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-4)


def test_bank_is_imported_and_the_rest_ignored_with_a_line(tmp_path, capsys):
    src = tmp_path / "ref.torch"
    loss = nce_loss_state()
    reference_checkpoint(src, "resnet18", pirl_heads(), loss=loss)
    run = tmp_path / "run"
    assert ev.main(["import-vissl", str(src), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "memory bank imported: 10 rows of 16" in out
    ignored = next(line for line in out.splitlines() if "ignored" in line)
    assert "classy_state_dict.optimizer" in ignored and "loss.nce_average.multinomial.prob" in ignored
    ckpt = torch.load(next((run / "checkpoints").glob("*.pt")), weights_only=True)
    assert torch.equal(ckpt["bank"]["bank"], loss["nce_average.memory"]) and bool(ckpt["bank"]["seen"].all())
    assert float(ckpt["criterion"]["z_jigsaw"]) == float(ckpt["criterion"]["z_image"]) == 1234.5
    from pirl_fast.model.memory_bank import BankConfig, MemoryBank
    bank = MemoryBank(10, D, BankConfig(dtype="float32"))
    bank.load_state_dict(ckpt["bank"])  # our bank takes it as a resumed run's
    assert torch.equal(bank.bank, loss["nce_average.memory"])


def test_a_file_without_heads_imports_as_its_trunk(tmp_path, capsys):
    src = tmp_path / "trunk.torch"
    reference_checkpoint(src, "resnet18", nn.ModuleList())
    assert ev.main(["import-vissl", str(src), "--out", str(tmp_path / "run")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "no heads" in line]
    assert len(notes) == 1 and "imported as its trunk" in notes[0]
    assert load_pretrained(tmp_path / "run").config["imported"]["heads"] is False


def test_numpy_arrays_load_without_unsafe_pickle(tmp_path):
    src = tmp_path / "np.torch"
    _, _, saved = reference_checkpoint(src, "resnet18", pirl_heads(), extra={"meters": [np.float64(0.5)]},
                                       numpy_conv1=True)
    loaded, needed = load_reference(src)
    assert "numpy.ndarray" in needed
    net = load_pretrained(import_checkpoint(src, tmp_path / "run"))
    assert torch.equal(net.model.trunk.conv1.weight, saved["trunk"]["_feature_blocks.conv1.weight"])


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_refusals_are_clear(tmp_path, capsys):
    src = tmp_path / "evil.torch"
    reference_checkpoint(src, "resnet18", pirl_heads(), extra={"hooks": Evil()})
    with pytest.raises(ImportRefused, match="builtins.print"):
        load_reference(src)
    assert "this must never run" not in capsys.readouterr().out
    mlp = tmp_path / "mlp.torch"  # one MLP head alone: no config of the reference's we map
    reference_checkpoint(mlp, "resnet18", nn.ModuleList([RefMLP([512, 512, 16], use_relu=True)]))
    with pytest.raises(SystemExit, match="--trunk-only"):
        ev.main(["import-vissl", str(mlp), "--out", str(tmp_path / "mlp_run")])
    assert ev.main(["import-vissl", str(mlp), "--out", str(tmp_path / "mlp_run"), "--trunk-only"]) == 0
    report = json.loads((tmp_path / "mlp_run" / "import.json").read_text())
    assert report["heads"] is False and report["arch"] == "resnet18"
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        ev.main(["import-vissl", str(mlp), "--out", str(tmp_path / "mlp_run"), "--trunk-only"])
    with pytest.raises(SystemExit, match="trunk-only"):
        ev.main(["invariance", str(tmp_path / "mlp_run"), "--shards", str(tmp_path)])
    wide = tmp_path / "wide.torch"
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": {"_feature_blocks.conv1.weight":
                torch.zeros(128, 3, 7, 7)}, "heads": {}}}}}, wide)
    with pytest.raises(SystemExit, match="matches none of this project's architectures"):
        ev.main(["import-vissl", str(wide), "--out", str(tmp_path / "wide_run")])
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    with pytest.raises(SystemExit, match="needs no import"):
        ev.main(["import-vissl", str(tmp_path / "tv.pth"), "--out", str(tmp_path / "tv_run")])


def test_every_eval_command_runs_on_an_imported_checkpoint(tmp_path, sample_shards):
    src = tmp_path / "ref.torch"
    reference_checkpoint(src, "resnet18", pirl_heads())
    run = tmp_path / "run"
    assert ev.main(["import-vissl", str(src), "--out", str(run)]) == 0
    common = ["--train-shards", str(sample_shards), "--val-shards", str(sample_shards), "--workers", "0",
              "--image-size", "32", "--limit", "24"]
    assert ev.main(["knn", str(run), *common, "--k", "5"]) == 0
    assert ev.main(["linear", str(run), *common, "--epochs", "1", "--no-augment", "--probe-batch-size", "8"]) == 0
    assert ev.main(["export", str(run)]) == 0
    assert ev.main(["invariance", str(run), "--shards", str(sample_shards), "--workers", "0", "--image-size", "32",
                    "--limit", "12"]) == 0
    assert ev.main(["finetune", str(run), *common, "--fraction", "0.5", "--epochs", "1", "--ft-batch-size", "8",
                    "--backend", "torch"]) == 0
    assert {p.name for p in run.iterdir()} >= {"knn.json", "linear.json", "export.json", "import.json",
                                               "finetune_50pct.json", "invariance.json"}


def test_a_broken_file_is_refused_with_its_name(tmp_path):
    (tmp_path / "half.torch").write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(SystemExit, match="cannot read .*half.torch"):
        ev.main(["import-vissl", str(tmp_path / "half.torch"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("config", ["pirl_mlp", "jigsaw"])  # pirl_linear: the test above
def test_knn_and_invariance_run_on_imported_models(tmp_path, sample_shards, config):
    src = tmp_path / "ref.torch"
    reference_checkpoint(src, "resnet18", get_heads(HEAD_PARAMS[config]))
    run = tmp_path / "run"
    assert ev.main(["import-vissl", str(src), "--out", str(run)]) == 0
    common = ["--workers", "0", "--image-size", "32", "--limit", "12", "--batch-size", "12"]
    assert ev.main(["knn", str(run), "--train-shards", str(sample_shards), "--val-shards", str(sample_shards),
                    *common, "--k", "5"]) == 0
    assert ev.main(["invariance", str(run), "--shards", str(sample_shards), *common]) == 0
    assert json.loads((run / "knn.json").read_text())["method"] == ("jigsaw" if config == "jigsaw" else "pirl")
    assert (run / "invariance.json").exists()


@pytest.mark.parametrize("config", ["pirl_linear", "pirl_mlp", "jigsaw"])
def test_export_writes_the_reference_layout_and_imports_back_identically(tmp_path, config):
    src = tmp_path / "ref.torch"
    loss = nce_loss_state() if config.startswith("pirl") else None
    _, _, saved = reference_checkpoint(src, "resnet18", get_heads(HEAD_PARAMS[config]), loss=loss)
    run = tmp_path / "run"
    assert ev.main(["import-vissl", str(src), "--out", str(run)]) == 0
    assert ev.main(["export", str(run), "--format", "vissl", "--out", str(tmp_path / "exported")]) == 0
    exported = next((tmp_path / "exported").glob("*.torch"))
    ref = torch.load(exported, weights_only=True)
    model = ref["classy_state_dict"]["base_model"]["model"]
    # the layout the reference's own rule builds for the same config, key for key and shape for shape
    rule = {"trunk": RefTrunk("resnet18").state_dict(), "heads": get_heads(HEAD_PARAMS[config]).state_dict()}
    for part in ("trunk", "heads"):
        assert {k: v.shape for k, v in model[part].items()} == {k: v.shape for k, v in rule[part].items()}, part
        for key, value in saved[part].items():  # export(import(reference)) is the reference, bit for bit
            assert torch.equal(model[part][key], value), key
    if loss is not None:
        assert torch.equal(ref["loss"]["nce_average.memory"], loss["nce_average.memory"])
        assert float(ref["loss"]["nce_average.params"][2]) == 1234.5
    # import(export(x)) is x on every tensor of our checkpoint
    assert ev.main(["import-vissl", str(exported), "--out", str(tmp_path / "again")]) == 0
    first = torch.load(next((run / "checkpoints").glob("*.pt")), weights_only=True)
    second = torch.load(next((tmp_path / "again" / "checkpoints").glob("*.pt")), weights_only=True)
    assert first["model"].keys() == second["model"].keys()
    for key in first["model"]:
        assert torch.equal(first["model"][key], second["model"][key]), key
    if loss is not None:
        assert torch.equal(first["bank"]["bank"], second["bank"]["bank"])
        assert torch.equal(first["criterion"]["z_image"], second["criterion"]["z_image"])


def test_export_refuses_a_network_the_reference_has_no_config_for(tmp_path):
    src = tmp_path / "trunk.torch"
    reference_checkpoint(src, "resnet18", nn.ModuleList())
    assert ev.main(["import-vissl", str(src), "--out", str(tmp_path / "run")]) == 0
    with pytest.raises(SystemExit, match="imported without the reference's heads"):
        ev.main(["export", str(tmp_path / "run"), "--format", "vissl"])
