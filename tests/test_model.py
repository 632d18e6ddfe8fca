"""PIRLModel: shapes, normalisation, memory layout, stems, torchvision keys, and the jigsaw head's use of
patch order."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from pirl_fast.eval.linear_probe import STAGES, stage_features
from pirl_fast.model.batchnorm import batchnorms
from pirl_fast.model.network import ModelConfig, PIRLModel, memory_format_for, weight_layout

B, P = 2, 9


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PIRLModel(ModelConfig(arch="resnet18")).eval()  # eval: BN uses fixed statistics, samples independent


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 32, 32, generator=gen), torch.randn(B * P, 3, 16, 16, generator=gen)


def test_shapes_dtype_and_unit_norm(model):
    images, patches = inputs()
    with torch.no_grad():
        f, g = model(images, patches)
    for out in (f, g):
        assert out.shape == (B, 128) and out.dtype == torch.float32
        assert torch.allclose(out.norm(dim=1), torch.ones(B), atol=1e-5)
    assert model.trunk_dim == 512 and model.features(images).shape == (B, 512)


def test_outputs_match_manual_computation(model):
    """f and g recomputed from the parts: trunk per patch, heads, concatenation in presented order."""
    images, patches = inputs(1)
    with torch.no_grad():
        f, g = model(images, patches)
        trunk = model.trunk
        f_ref = F.normalize(model.image_head(trunk(images)), dim=1)
        g_ref = []
        for b in range(B):
            parts = [model.patch_head(trunk(patches[P * b + i: P * b + i + 1]))[0] for i in range(P)]  # 9 x (128,)
            g_ref.append(F.normalize(model.jigsaw_head(torch.cat(parts)), dim=0))
    assert torch.allclose(f, f_ref, atol=1e-5)
    assert torch.allclose(g, torch.stack(g_ref), atol=1e-5)


def test_jigsaw_depends_on_patch_order(model):
    images, patches = inputs(2)
    perm = torch.tensor([3, 0, 8, 1, 5, 2, 7, 6, 4])
    shuffled = patches.clone()
    shuffled[:P] = patches[:P][perm]  # reorder sample 0's patches only
    with torch.no_grad():
        f, g = model(images, patches)
        f2, g2 = model(images, shuffled)
    assert torch.allclose(f, f2)  # the image branch does not see the patches
    assert torch.allclose(g[1], g2[1], atol=1e-6)  # sample 1 untouched
    assert (g[0] - g2[0]).abs().max() > 1e-3, "the jigsaw head must depend on the order the patches arrive in"


def test_memory_layout_follows_the_weights(model):
    """Built plain (NCHW); channels-last only where the caller moves it (the trainer: on CUDA), and
    `features` hands the convolutions its input in the weights' layout either way."""
    assert memory_format_for("cpu") == torch.contiguous_format and memory_format_for("cuda") == torch.channels_last
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous() for c in convs)
    assert weight_layout(model.trunk) == torch.contiguous_format
    images, _ = inputs(2)
    with torch.no_grad():
        plain = model.features(images.contiguous(memory_format=torch.channels_last))  # an NHWC batch, as loaders give
        nhwc = PIRLModel(ModelConfig(arch="resnet18")).eval()
        nhwc.load_state_dict(model.state_dict())
        nhwc.to(memory_format=torch.channels_last)
        assert weight_layout(nhwc.trunk) == torch.channels_last
        torch.testing.assert_close(nhwc.features(images), plain, rtol=1e-4, atol=1e-5)


def test_torchvision_keys(model):
    reference = torchvision.models.resnet18(weights=None).state_dict()
    assert set(model.trunk.state_dict()) == {k for k in reference if not k.startswith("fc.")}
    assert model.image_head.in_features == 512 and model.jigsaw_head.in_features == 9 * 128


def test_resnet50_default_dims():
    m = PIRLModel(ModelConfig())
    assert m.trunk_dim == 2048 and m.image_head.in_features == 2048 and m.patch_head.in_features == 2048


def test_bf16_autocast_and_backward():
    torch.manual_seed(1)
    model = PIRLModel(ModelConfig(arch="resnet18", embed_dim=16, num_patches=4))
    images, patches = torch.randn(2, 3, 32, 32), torch.randn(8, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f, g = model(images, patches)
    assert f.dtype == g.dtype == torch.float32 and f.shape == g.shape == (2, 16)
    (f.sum() + g.sum()).backward()
    assert model.jigsaw_head.weight.grad is not None and model.trunk.conv1.weight.grad is not None


def test_validation():
    with pytest.raises(ValueError, match="resnet18.*resnet50"):
        PIRLModel(ModelConfig(arch="vit_b_16"))
    model = PIRLModel(ModelConfig(arch="resnet18"))
    with pytest.raises(ValueError, match="9 patches per image"):
        model(torch.randn(2, 3, 32, 32), torch.randn(9, 3, 16, 16))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_small_stem_keeps_resolution_and_keys(arch):
    """stem=small: conv1 3x3 stride 1, no max-pool, so a 32 px image reaches res5 at 4 px (imagenet: 1 px)."""
    torch.manual_seed(0)
    small = PIRLModel(ModelConfig(arch=arch, stem="small")).eval()
    big = PIRLModel(ModelConfig(arch=arch)).eval()
    assert small.trunk.conv1.weight.shape == (64, 3, 3, 3) and small.trunk.conv1.stride == (1, 1)
    assert isinstance(small.trunk.maxpool, torch.nn.Identity)
    assert set(small.trunk.state_dict()) == set(big.trunk.state_dict())  # torchvision's keys either way
    sizes = {}
    for name, m in (("small", small), ("imagenet", big)):
        hooks = [getattr(m.trunk, layer).register_forward_hook(
            lambda mod, i, o, layer=layer, name=name: sizes.__setitem__((name, layer), o.shape[-1]))
            for layer in ("layer1", "layer4")]
        with torch.no_grad():
            m.features(torch.randn(2, 3, 32, 32))
        for h in hooks:
            h.remove()
    assert sizes == {("small", "layer1"): 32, ("small", "layer4"): 4, ("imagenet", "layer1"): 8,
                     ("imagenet", "layer4"): 1}
    feats = stage_features(small.trunk, torch.randn(2, 3, 32, 32))  # the probes' stages work with either stem
    assert set(feats) == set(STAGES) and feats["res5"].shape == (2, small.trunk_dim)
    with pytest.raises(ValueError, match="imagenet.*small"):
        PIRLModel(ModelConfig(arch=arch, stem="cifar"))


def test_patch_bn_stats_leave_what_the_reference_forward_leaves():
    """model.patch_bn_stats=true (experiment=pirl_in1k_r50): the running statistics are those of the reference's
    forward (vissl/models/base_ssl_model.py multi_input_with_head_mapping_forward: the trunk in train mode on
    the "patches" input, then on "images", MULTI_INPUT_HEAD_MAPPING's order), written here with a plain trunk."""
    torch.manual_seed(0)
    model = PIRLModel(ModelConfig(arch="resnet18", embed_dim=16, patch_bn_stats=True)).train()
    plain, swapped = copy.deepcopy(model.trunk).train(), copy.deepcopy(model.trunk).train()
    images, patches = inputs(3)
    model(images, patches)
    with torch.no_grad():
        plain(patches), plain(images)
        swapped(images), swapped(patches)
    for ours, ref in zip(batchnorms(model.trunk), batchnorms(plain)):
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=1e-6)
    last, other = batchnorms(model.trunk)[-1], batchnorms(swapped)[-1]
    assert not torch.allclose(last.running_var, other.running_var, rtol=0, atol=1e-6)  # the order is visible


@pytest.mark.parametrize("patch_bn_stats", [False, True])
def test_patch_forward_and_bn_running_stats(patch_bn_stats):
    """Default: only the image forward moves the BN running statistics (batchnorm.py); the patch
    forward still normalises with its own batch statistics, so f and g are what they always were."""
    torch.manual_seed(0)
    model = PIRLModel(ModelConfig(arch="resnet18", embed_dim=16, patch_bn_stats=patch_bn_stats)).train()
    reference = PIRLModel(ModelConfig(arch="resnet18", embed_dim=16, patch_bn_stats=True)).train()
    reference.load_state_dict(model.state_dict())
    images, patches = inputs(3)
    f, g = model(images, patches)
    images_only = PIRLModel(ModelConfig(arch="resnet18", embed_dim=16)).train()
    images_only.load_state_dict(reference.state_dict())
    images_only.embed_image(images)  # the running statistics an image-only forward leaves
    f_ref, g_ref = reference(images, patches)
    torch.testing.assert_close(f, f_ref, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    bn = model.trunk.layer4[1].bn2
    expected = (reference if patch_bn_stats else images_only).trunk.layer4[1].bn2
    torch.testing.assert_close(bn.running_mean, expected.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, expected.running_var, rtol=0, atol=0)
    assert not torch.equal(images_only.trunk.layer4[1].bn2.running_var, reference.trunk.layer4[1].bn2.running_var)
    assert bn.momentum == 0.1  # restored after the patch forward


def test_embed_bn_centres_the_embeddings():
    """model.embed_bn: in training the pre-normalisation f and g have zero batch mean per dimension
    (BatchNorm1d without affine parameters); off, a linear head leaves a large shared component."""
    torch.manual_seed(0)
    images, patches = inputs(4)
    for embed_bn in (False, True):
        model = PIRLModel(ModelConfig(arch="resnet18", embed_dim=16, embed_bn=embed_bn)).train()
        raw = {}
        model.image_bn.register_forward_hook(lambda m, i, o, raw=raw: raw.__setitem__("f", o))
        model.jigsaw_bn.register_forward_hook(lambda m, i, o, raw=raw: raw.__setitem__("g", o))
        f, g = model(images, patches)
        assert torch.allclose(f.norm(dim=1), torch.ones(B), atol=1e-5)
        for out in raw.values():
            centred = out.mean(0).abs().max() < 1e-5
            assert centred == embed_bn
    assert set(dict(model.named_buffers())) >= {"image_bn.running_mean", "jigsaw_bn.running_var"}


def test_mlp_heads_are_the_references():
    """head=mlp (vissl resnet50_mlphead.yaml): image head trunk-trunk-128 with a ReLU between, patch
    head the same with a ReLU after its last layer too, jigsaw head still one 1152 -> 128 Linear."""
    torch.manual_seed(0)
    model = PIRLModel(ModelConfig(arch="resnet18", head="mlp")).eval()
    linear_dims = lambda head: [(m.in_features, m.out_features) for m in head if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert linear_dims(model.image_head) == linear_dims(model.patch_head) == [(512, 512), (512, 128)]
    assert [type(m).__name__ for m in model.image_head] == ["Linear", "ReLU", "Linear"]
    assert [type(m).__name__ for m in model.patch_head] == ["Linear", "ReLU", "Linear", "ReLU"]
    assert (model.jigsaw_head.in_features, model.jigsaw_head.out_features) == (9 * 128, 128)
    images, patches = inputs(3)
    with torch.no_grad():
        f, g = model(images, patches)
        e = model.patch_head(model.trunk(patches))  # (B*9, 128)
    assert (e >= 0).all()  # the trailing ReLU
    assert f.shape == g.shape == (B, 128) and torch.allclose(g.norm(dim=1), torch.ones(B), atol=1e-5)
    with pytest.raises(ValueError, match="model.head='deep'.*linear.*mlp"):
        PIRLModel(ModelConfig(arch="resnet18", head="deep"))
