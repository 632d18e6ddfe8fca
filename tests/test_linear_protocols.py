"""The Goyal et al. 2019 linear benchmark as the reference configures it (vissl
configs/config/benchmark/linear_image_classification/imagenet1k/eval_resnet_8gpu_transfer_in1k_linear.yaml):
pooled shapes and head widths from the yaml's own numbers, the exact AvgPool2d at 224 px, adaptive
pooling at other sizes against a block-mean written out by hand, and the optimiser's groups."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pirl_fast.eval import linear_probe as lp

# The yaml's HEAD.PARAMS: eval_mlp in_channels and dims[0] per head, in order.
REFERENCE_HEADS = {"conv1": (64, 9216), "res2": (256, 9216), "res3": (512, 8192), "res4": (1024, 9216),
                   "res5": (2048, 8192), "res5avg": (2048, 2048), "res5avg_fc": (2048, 2048)}


def resnet(name: str) -> nn.Module:
    torch.manual_seed(0)
    trunk = getattr(torchvision.models, name)(weights=None)
    trunk.fc = nn.Identity()
    return trunk.eval()


def test_goyal_shapes_match_the_reference_at_224():
    trunk = resnet("resnet50")
    feats = lp.goyal_features(trunk, torch.randn(2, 3, 224, 224))
    assert {s: tuple(f.shape[1:]) for s, f in feats.items()} == {
        "conv1": (64, 12, 12), "res2": (256, 6, 6), "res3": (512, 4, 4), "res4": (1024, 3, 3), "res5": (2048, 2, 2),
        "res5avg": (2048, 1, 1)}
    probes = lp.build_probes("goyal", lp.stage_widths(trunk), num_classes=1000)
    assert lp.head_in_features(probes) == {h: dims for h, (_, dims) in REFERENCE_HEADS.items()}
    bns = {h: head[0].num_features for h, head in probes.heads.items() if isinstance(head[0], nn.BatchNorm2d)}
    assert bns == {h: c for h, (c, _) in REFERENCE_HEADS.items() if h != "res5avg_fc"}
    logits = probes(feats)
    assert {h: tuple(v.shape) for h, v in logits.items()} == {h: (2, 1000) for h in lp.GOYAL_HEADS}


def test_goyal_pool_at_224_is_the_reference_avgpool():
    maps = lp.stage_maps(resnet("resnet18"), torch.randn(2, 3, 224, 224))
    for stage, (kernel, stride, padding) in lp.GOYAL_POOL.items():
        want = nn.AvgPool2d(kernel, stride, padding)(maps[stage].float())  # vissl builds nn.AvgPool2d(*args)
        torch.testing.assert_close(lp.goyal_pool(stage, maps[stage].float()), want)


@pytest.mark.parametrize("size", [32, 48, 64])
def test_goyal_pool_small_images_keep_the_reference_widths(size):
    trunk = resnet("resnet18")
    feats = lp.goyal_features(trunk, torch.randn(3, 3, size, size))
    for stage in lp.STAGES:
        assert feats[stage].shape[2:] == (lp.GOYAL_GRID[stage],) * 2
    probes = lp.build_probes("goyal", lp.stage_widths(trunk), num_classes=5)
    assert set(probes(feats)) == set(lp.GOYAL_HEADS)


def test_adaptive_pool_is_a_block_mean_when_the_grid_divides():
    x = torch.randn(2, 8, 24, 24)  # res2's grid is 6: blocks of 4 x 4
    want = x.reshape(2, 8, 6, 4, 6, 4).mean(dim=(3, 5))
    torch.testing.assert_close(lp.goyal_pool("res2", x), want)


def test_goyal_optimiser_groups_and_lr_scaling():
    probes = lp.build_probes("goyal", {"conv1": 4, "res2": 4, "res3": 4, "res4": 4, "res5": 4}, num_classes=3)
    groups = lp.param_groups(probes, 5e-4)
    bn_params = {id(p) for m in probes.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert groups[0]["weight_decay"] == 5e-4 and not bn_params & {id(p) for p in groups[0]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and {id(p) for p in groups[1]["params"]} == bn_params
    linear_biases = [m.bias for m in probes.modules() if isinstance(m, nn.Linear)]
    assert all(any(b is p for p in groups[0]["params"]) for b in linear_biases)  # regularize_bias: True
    cfg = lp.ProbeConfig(lr=0.01, batch_size=512)
    assert [lp.lr_at(e / 28, cfg) for e in (0, 8, 16, 24)] == pytest.approx([0.02, 0.002, 2e-4, 2e-5])
