"""experiment=jigsaw_in1k_r50 and experiment=pirl_in1k_r50 compose the reference's values.

The tables below state the reference's values (facebookresearch/vissl, commit 09270ed) with the file each
comes from, written from those files, not from our yaml: a change to an experiment or to a default that
moves a value away from the reference fails here, naming the file. What the keys do with the values is
tested elsewhere (tests/test_jigsaw_view.py: the Jigsaw patch geometry; tests/test_permutations.py: the
permutation rule; tests/test_augment_contract.py: the PIRL draws; tests/test_loss.py, tests/test_model.py:
Z and the BN statistics).
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

JIGSAW = "configs/config/pretrain/jigsaw/jigsaw_8gpu_resnet.yaml"
PIRL = "configs/config/pretrain/pirl/pirl_jigsaw_4node_resnet50.yaml"
PATCHES = "vissl/data/ssl_transforms/img_patches_tensor.py"
PHOTOMETRIC = "vissl/data/ssl_transforms/img_pil_random_photometric.py"
PERMS = "extra_scripts/generate_jigsaw_permutations.py"

# key -> (the reference's value, where it is said)
JIGSAW_REFERENCE = {
    "method": ("jigsaw", f"{JIGSAW}: LOSS cross_entropy_multiple_output_single_target over the permutation ids"),
    "data.patch_view": ("jigsaw", f"{JIGSAW}: TRANSFORMS Resize, RandomHorizontalFlip, RandomCrop, RandomGrayscale "
                                  "on the whole image, then ImgPatchesFromTensor"),
    "data.patch_resize": (256, f"{JIGSAW}: Resize size 256"),
    "data.patch_crop_size": (255, f"{JIGSAW}: RandomCrop size 255"),
    "data.flip_p": (0.5, f"{JIGSAW}: RandomHorizontalFlip without p (torchvision's 0.5)"),
    "data.gray_p": (0.66, f"{JIGSAW}: RandomGrayscale p 0.66"),
    "data.brightness": (0.0, f"{JIGSAW}: no ColorJitter"),
    "data.contrast": (0.0, f"{JIGSAW}: no ColorJitter"),
    "data.saturation": (0.0, f"{JIGSAW}: no ColorJitter"),
    "data.hue": (0.0, f"{JIGSAW}: no ColorJitter"),
    "data.photometric_p": (0.0, f"{JIGSAW}: no ImgPilRandomPhotometric"),
    "data.blur_p": (0.0, f"{JIGSAW}: no ImgPilGaussianBlur"),
    "data.grid": (3, f"{JIGSAW}: ImgPatchesFromTensor num_patches 9 ({PATCHES}: grid side sqrt(9))"),
    "data.patch_size": (64, f"{PATCHES}: int(255 / 3) - patch_jitter 21 ({JIGSAW})"),
    "data.patch_offsets": ("reference", f"{PATCHES}: np.random.randint(0, patch_jitter), U{{0..20}}"),
    "data.num_permutations": (2000, f"{JIGSAW}: ShuffleImgPatches perm_file hamming_perms_2000_patches_9_max_avg.npy"),
    "data.permutation_set": ("max_avg", f"{JIGSAW}: the file's _max_avg, written by {PERMS} --method max_avg"),
    "data.batch_size": (256, f"{JIGSAW}: BATCHSIZE_PER_REPLICA 32 x NUM_PROC_PER_NODE 8 x NUM_NODES 1"),
    "model.arch": ("resnet50", f"{JIGSAW}: TRUNK resnet DEPTH 50"),
    "model.jigsaw_head": ("reference", f"{JIGSAW}: HEAD.PARAMS mlp [2048, 1000] use_bn use_relu; "
                                       "siamese_concat_view 9; mlp [9000, 2000]"),
    "optim.name": ("sgd", f"{JIGSAW}: OPTIMIZER name sgd"),
    "optim.momentum": (0.9, f"{JIGSAW}: OPTIMIZER momentum 0.9"),
    "optim.nesterov": (False, f"{JIGSAW}: OPTIMIZER nesterov False"),
    "optim.weight_decay": (0.0001, f"{JIGSAW}: OPTIMIZER weight_decay 0.0001"),
    "optim.lr": (0.1, f"{JIGSAW}: auto_lr_scaling base_value 0.1 ..."),
    "optim.reference_batch": (256, f"{JIGSAW}: ... at base_lr_batch_size 256"),
    "optim.schedule": ("multistep", f"{JIGSAW}: composite linear, then multistep values x0.1 each"),
    "optim.milestones": ([30, 60, 90, 100], f"{JIGSAW}: multistep milestones [30, 60, 90, 100]"),
    "optim.warmup_epochs": (5.0, f"{JIGSAW}: lengths [0.047619, ...] of num_epochs 105 = 5 epochs"),
    "optim.warmup_start_ratio": (0.25, f"{JIGSAW}: linear start_value 0.025 / end_value 0.1"),
    "trainer.epochs": (105, f"{JIGSAW}: OPTIMIZER num_epochs 105"),
}

PIRL_REFERENCE = {
    "method": ("pirl", f"{PIRL}: LOSS nce_loss_with_memory"),
    "data.patch_view": ("pirl", f"{PIRL}: TRANSFORMS ImgPilToPatchesAndImage, then the colour steps per crop"),
    "data.image_size": (224, f"{PIRL}: crop_size_image 224"),
    "data.image_scale": ([0.08, 1.0], f"{PIRL}: crop_scale_image [0.08, 1.0]"),
    "data.patch_crop_size": (255, f"{PIRL}: crop_size_patches 255"),
    "data.patch_scale": ([0.6, 1.0], f"{PIRL}: crop_scale_patches [0.6, 1.0]"),
    "data.grid": (3, f"{PIRL}: num_patches 9"),
    "data.patch_size": (64, f"{PATCHES}: int(255 / 3) - patch_jitter 21 (its default: "
                            "ImgPilToPatchesAndImage passes num_patches only)"),
    "data.patch_offsets": ("reference", f"{PATCHES}: np.random.randint(0, patch_jitter), U{{0..20}}"),
    "data.brightness": (0.4, f"{PIRL}: ColorJitter brightness 0.4"),
    "data.contrast": (0.4, f"{PIRL}: ColorJitter contrast 0.4"),
    "data.saturation": (0.4, f"{PIRL}: ColorJitter saturation 0.4"),
    "data.hue": (0.2, f"{PIRL}: ColorJitter hue 0.2"),
    "data.jitter_p": (1.0, f"{PIRL}: ColorJitter not in a RandomApply"),
    "data.photometric_p": (0.66, f"{PIRL}: ImgPilRandomPhotometric without p; {PHOTOMETRIC} from_config: 0.66"),
    "data.gray_p": (0.2, f"{PIRL}: RandomGrayscale p 0.2"),
    "data.blur_p": (0.0, f"{PIRL}: no ImgPilGaussianBlur"),
    "data.flip_p": (0.5, f"{PIRL}: RandomHorizontalFlip without p (torchvision's 0.5)"),
    "data.num_permutations": (0, "vissl/data/ssl_transforms/img_pil_to_patches_and_image.py: "
                                 "np.random.permutation(num_patches), any of 9!"),
    "data.batch_size": (1024, f"{PIRL}: BATCHSIZE_PER_REPLICA 32 x NUM_PROC_PER_NODE 8 x NUM_NODES 4"),
    "model.arch": ("resnet50", f"{PIRL}: TRUNK resnet DEPTH 50"),
    "model.head": ("linear", f"{PIRL}: HEAD.PARAMS mlp [2048, 128] (patches: then concat 9, mlp [1152, 128])"),
    "model.embed_dim": (128, f"{PIRL}: memory_params embedding_dim 128"),
    "model.patch_bn_stats": (True, "vissl/models/base_ssl_model.py: the trunk in train mode on the patches too"),
    "loss.kind": ("nce", f"{PIRL}: nce_loss_with_memory"),
    "loss.temperature": (0.07, f"{PIRL}: temperature 0.07"),
    "loss.lam": (0.5, f"{PIRL}: loss_weights [0.5, 0.5]"),
    "loss.z": ("shared", "vissl/losses/nce_loss.py: one NCEAverage Z, set by the patch term (first in "
                         "MULTI_INPUT_HEAD_MAPPING)"),
    "bank.num_negatives": (32000, f"{PIRL}: negative_sampling_params num_negatives 32000"),
    "bank.momentum": (0.5, f"{PIRL}: memory_params momentum 0.5"),
    "optim.name": ("sgd", f"{PIRL}: OPTIMIZER name sgd"),
    "optim.momentum": (0.9, f"{PIRL}: OPTIMIZER momentum 0.9"),
    "optim.nesterov": (False, f"{PIRL}: OPTIMIZER nesterov False"),
    "optim.weight_decay": (0.0001, f"{PIRL}: OPTIMIZER weight_decay 0.0001"),
    "optim.lr": (0.12, f"{PIRL}: cosine start_value 0.12 (base_value 0.03 per 256 x 4) ..."),
    "optim.reference_batch": (1024, f"{PIRL}: ... for batch 256 * 4"),
    "optim.schedule": ("cosine", f"{PIRL}: name cosine"),
    "optim.final_lr_ratio": (0.001, f"{PIRL}: end_value 0.00012 / start_value 0.12"),
    "optim.warmup_epochs": (0.0, f"{PIRL}: no warm-up"),
    "trainer.epochs": (800, f"{PIRL}: OPTIMIZER num_epochs 800"),
}


def composed(experiment: str) -> dict:
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=[f"experiment={experiment}"]))


def value_at(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("experiment,table", [("jigsaw_in1k_r50", JIGSAW_REFERENCE), ("pirl_in1k_r50", PIRL_REFERENCE)])
def test_experiment_composes_the_reference_values(experiment, table):
    cfg = composed(experiment)
    wrong = [f"{key}={value_at(cfg, key)!r}, the reference's {value!r} ({source})"
             for key, (value, source) in table.items() if value_at(cfg, key) != value]
    assert not wrong, f"experiment={experiment} departs from the reference:\n  " + "\n  ".join(wrong)
