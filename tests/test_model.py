"""PIRLModel: shapes, normalisation, channels-last, torchvision keys, and the jigsaw head's use of patch order."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from pirl_fast.model import ModelConfig, PIRLModel

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


def test_channels_last_and_torchvision_keys(model):
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
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
