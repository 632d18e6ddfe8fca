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
    """vissl/models/heads/mlp.py: layers in self.clf."""

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


class RefConcat(nn.Module):  # siamese_concat_view: (N*9, C) -> (N, 9C); no parameters
    def forward(self, x):
        return x.reshape(x.shape[0] // 9, -1)


def randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                scale, shift = (1.0, 0.5) if "var" in name else (0.2, -0.1)  # variances stay positive
                t.copy_(torch.rand(t.shape, generator=g) * scale + shift)


def reference_checkpoint(path: Path, arch: str, heads: nn.ModuleList, extra: dict | None = None,
                         numpy_conv1: bool = False) -> tuple:
    trunk = RefTrunk(arch)
    randomise(trunk, 1)
    randomise(heads, 2)
    model = {"trunk": trunk.state_dict(), "heads": heads.state_dict()}
    stored = dict(model["trunk"])
    if numpy_conv1:  # as in the reference's checkpoints converted from Caffe2
        stored["_feature_blocks.conv1.weight"] = stored["_feature_blocks.conv1.weight"].numpy()
    classy = {"train": True, "base_model": {"model": {**model, "trunk": stored}, "meta": {"trunk": {}, "heads": []}},
              "optimizer": {"optim": {"state": {}, "param_groups": [{"lr": 0.12, "momentum": 0.9}]}},
              "phase_idx": 4, "train_phase_idx": 4, "num_updates": 5004, "losses": [6.5, 6.25], "hooks": {},
              "loss": {}}
    ckpt = {"phase_idx": 4, "iteration": 5004, "iteration_num": 5004, "train_phase_idx": 4,
            "loss": {"memory": torch.randn(10, 16)}, "classy_state_dict": classy, **(extra or {})}
    torch.save(ckpt, path)
    return trunk.eval(), heads.eval(), model


def pirl_heads(d: int = 16, width: int = 512) -> nn.ModuleList:
    # pirl_jigsaw_4node_resnet50.yaml HEAD.PARAMS (with 128 -> d and 2048 -> width for a small test)
    return nn.ModuleList([nn.Sequential(RefMLP([width, d]), RefConcat(), RefMLP([9 * d, d])), RefMLP([width, d])])


def test_pirl_round_trip_is_exact(tmp_path):
    src = tmp_path / "model_final_checkpoint_phase4.torch"
    trunk, heads, saved = reference_checkpoint(src, "resnet18", pirl_heads())
    path = import_checkpoint(src, tmp_path / "run")
    assert path == tmp_path / "run" / "checkpoints" / "step_000005004.pt"
    net = load_pretrained(tmp_path / "run")
    assert net.method == "pirl" and net.config["model"] == {"arch": "resnet18", "embed_dim": 16, "num_patches": 9}
    ours = net.model.state_dict()
    for key, value in saved["trunk"].items():  # bit for bit, every tensor
        assert torch.equal(ours["trunk." + key.removeprefix("_feature_blocks.")], value), key
    pairs = {"image_head": "1.clf.0", "patch_head": "0.0.clf.0", "jigsaw_head": "0.2.clf.0"}
    for ours_name, ref_name in pairs.items():
        for p in ("weight", "bias"):
            assert torch.equal(ours[f"{ours_name}.{p}"], saved["heads"][f"{ref_name}.{p}"])
    x = torch.randn(3, 3, 64, 64)
    patches = torch.randn(18, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.model.features(x), trunk(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(net.model.image_head(net.model.features(x)), heads[1](trunk(x)), rtol=0, atol=1e-5)
        ref_g = heads[0](trunk(patches))
        ours_g = net.model.jigsaw_head(net.model.patch_head(net.model.features(patches)).reshape(2, -1))
        torch.testing.assert_close(ours_g, ref_g, rtol=0, atol=1e-5)


def test_jigsaw_reference_head_round_trip(tmp_path):
    src = tmp_path / "jigsaw.torch"
    # jigsaw_8gpu_resnet.yaml: mlp [2048, 1000] use_bn use_relu (keep last), concat 9, mlp [9000, P]
    heads = nn.ModuleList([nn.Sequential(RefMLP([512, 1000], use_bn=True, use_relu=True,
                                                skip_last_layer_relu_bn=False), RefConcat(), RefMLP([9000, 7]))])
    trunk, heads, _ = reference_checkpoint(src, "resnet18", heads)
    net = load_pretrained(import_checkpoint(src, tmp_path / "run"))
    assert net.method == "jigsaw" and net.model.cfg.jigsaw_head == "reference" and net.model.num_permutations == 7
    patches = torch.randn(18, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.model(patches), heads[0](trunk(patches)), rtol=0, atol=1e-4)


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
    mlp = tmp_path / "mlp.torch"  # resnet50_mlphead.yaml: images head 2048-2048-128 with ReLU
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
    assert ev.main(["finetune", str(run), *common, "--fraction", "0.5", "--epochs", "1", "--ft-batch-size", "8",
                    "--backend", "torch"]) == 0
    assert {p.name for p in run.iterdir()} >= {"knn.json", "linear.json", "export.json", "import.json",
                                               "finetune_50pct.json"}


def test_a_broken_file_is_refused_with_its_name(tmp_path):
    (tmp_path / "half.torch").write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(SystemExit, match="cannot read .*half.torch"):
        ev.main(["import-vissl", str(tmp_path / "half.torch"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoints").exists()
