"""Each colour step of the augmentation contract at forced parameters, against an independent
implementation: PIL's ImageOps / ImageEnhance (what the reference calls) for the photometric ops,
torchvision's functional ops for jitter, greyscale and blur. Both backends: the torch backend's
transforms (pirl_fast/data/torch_transforms.py) and the DALI graph's steps (dali_pipelines/pirl.py),
run on the CPU, per sample (HWC) and per frame (FHWC). The distributions of the draws are
tested in test_augment_contract.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms.v2 import functional as F

from pirl_fast.data.config import DataConfig, check_augmentation
from pirl_fast.data.torch_transforms import RandomGaussianBlur, RandomPhotometric
from pirl_fast.shard.sample_data import make_image

pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def  # noqa: E402

import dali_pipelines.pirl as pirl  # noqa: E402

SIZE = 40


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """(3, 40, 40, 3) uint8 textured images; each also holds a 0 and a 255 in every channel
    (autocontrast then leaves the unstretched ones alone)."""
    rng = np.random.default_rng(0)
    out = np.stack([np.asarray(make_image(k, rng).resize((SIZE, SIZE)).convert("RGB")) for k in range(3)])
    out[:, 0, 0], out[:, 0, 1] = 0, 255
    return out


def dali_step(step, images: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """step(images, frames=..., **kwargs) run by DALI on the first image as a sample (HWC) and on all
    of them as one sample's frames (FHWC): (out (40, 40, 3), out (3, 40, 40, 3))."""
    @pipeline_def(batch_size=1, num_threads=1, device_id=None, seed=0)
    def pipe():
        view = fn.external_source(source=lambda: [images[0]], batch=True, layout="HWC")
        frames = fn.external_source(source=lambda: [images], batch=True, layout="FHWC")
        return step(view, frames=None, **kwargs), step(frames, frames=len(images), **kwargs)

    p = pipe()
    p.build()
    view, frames = p.run()
    return view.as_array()[0], frames.as_array()[0]


def pil_photometric(image: np.ndarray, bits: int, factor: float, threshold: int) -> np.ndarray:
    """The reference's chain (vissl pil_photometric_transforms_lib.py) with PIL itself."""
    out = ImageOps.posterize(Image.fromarray(image), bits)
    out = ImageEnhance.Sharpness(out).enhance(factor)
    out = ImageOps.solarize(out, threshold)
    return np.asarray(ImageOps.autocontrast(out)).astype(int)


def photometric_config(bits: int, factor: float, threshold: int) -> DataConfig:
    return DataConfig(photometric_p=1.0, posterize_bits=[bits, bits], sharpness=[factor, factor],
                      solarize_threshold=[threshold, threshold])


CASES = [(8, 1.0, 256), (5, 1.0, 256), (8, 1.0, 100), (8, 0.4, 256), (8, 1.7, 256), (5, 0.5, 100), (4, 1.7, 0),
         (6, 0.1, 200)]


@pytest.mark.parametrize("bits,factor,threshold", CASES)
def test_torch_photometric_is_pils(images, bits, factor, threshold):
    cfg = photometric_config(bits, factor, threshold)
    for image in images:
        out = RandomPhotometric(cfg)(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        diff = np.abs(out.astype(int) - pil_photometric(image, bits, factor, threshold))
        assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())


@pytest.mark.parametrize("bits,factor,threshold", CASES)
def test_dali_photometric_is_pils(images, bits, factor, threshold):
    """Exact without sharpness; with it, DALI rounds the sharpened value once where PIL rounds the
    smoothed image and truncates the blend: 1 level apart before autocontrast stretches it, and a
    pixel that lands on the other side of the solarize threshold is inverted (or not)."""
    view, frames = dali_step(pirl.photometric, images, cfg=photometric_config(bits, factor, threshold), size=SIZE)
    for out, image in zip([view, *frames], [images[0], *images]):
        diff = np.abs(out.astype(int) - pil_photometric(image, bits, factor, threshold))
        if factor == 1.0:
            assert diff.max() == 0
        else:
            assert diff.mean() < 2.0 and (diff > 6).mean() < 0.02, (diff.mean(), (diff > 6).mean())


def test_photometric_not_applied_is_identity(images):
    cfg = DataConfig(photometric_p=0.0)  # the coin always 0: identity parameters in DALI, a skip in torch
    view, frames = dali_step(lambda x, frames: pirl.photometric(x, cfg, frames, SIZE, pirl.coin(0.0, frames)), images)
    assert np.array_equal(view, images[0]) and np.array_equal(frames, images)
    image = torch.from_numpy(images[0]).permute(2, 0, 1)
    assert RandomPhotometric(cfg)(image) is image


@pytest.mark.parametrize("brightness,contrast,saturation", [(1.25, 0.7, 1.2), (0.75, 1.3, 0.7), (1.0, 0.6, 1.0)])
def test_dali_jitter_is_torchvisions_without_hue(brightness, contrast, saturation):
    """Mid-range images (no clamping): DALI's hue/saturation map then contrast about the crop's mean
    grey then brightness equals torchvision's ops in any order, within rounding; both contrast
    formulations (CPU named argument, GPU arithmetic) alike."""
    rng = np.random.default_rng(1)
    image = (64 + np.asarray(make_image(2, rng).resize((SIZE, SIZE)).convert("RGB")) // 2).astype(np.uint8)  # 64..191
    images = np.stack([image] * 2)

    def step(x, frames, arithmetic):
        hsv = fn.hsv(x, saturation=saturation)
        b = pirl.uniform(brightness, brightness, frames)
        k = pirl.uniform(contrast, contrast, frames)
        return pirl.contrast_brightness(hsv, b, k, frames, arithmetic)

    t = torch.from_numpy(image).permute(2, 0, 1)
    expected = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(t, brightness), contrast), saturation)
    expected = expected.permute(1, 2, 0).numpy().astype(int)
    outputs = [dali_step(step, images, arithmetic=arithmetic) for arithmetic in (False, True)]
    for view, frames in outputs:
        for out in (view, *frames):
            diff = np.abs(out.astype(int) - expected)
            assert diff.max() <= 3 and diff.mean() < 1.5, (diff.max(), diff.mean())  # truncation vs rounding
    assert np.abs(outputs[0][0].astype(int) - outputs[1][0]).max() <= 1  # the two formulations


def test_dali_greyscale_is_torchvisions(images):
    view, frames = dali_step(pirl.greyscale, images)
    for out, image in zip([view, *frames], [images[0], *images]):
        expected = F.rgb_to_grayscale(torch.from_numpy(image).permute(2, 0, 1), num_output_channels=3)
        assert np.abs(out.astype(int) - expected.permute(1, 2, 0).numpy()).max() <= 1


@pytest.mark.parametrize("sigma", [0.3, 1.0, 1.9])
def test_blur_backends_agree(images, sigma):
    cfg = DataConfig(blur_p=1.0, blur_sigma=[sigma, sigma])
    view, frames = dali_step(pirl.gaussian_blur, images, cfg=cfg)
    for out, image in zip([view, *frames], [images[0], *images]):
        expected = RandomGaussianBlur(cfg)(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        assert np.abs(out.astype(int) - expected).max() <= 1


def test_augmentation_keys_are_checked():
    in_01 = r"is out of range: it must be in \[0, 1\]"
    for change, message in [({"gray_p": 1.2}, "data.gray_p=1.2 " + in_01),
                            ({"photometric_p": -0.1}, "data.photometric_p=-0.1 " + in_01),
                            ({"hue": 0.7}, r"data.hue=0.7 is out of range: it must be in \[0, 0.5\]"),
                            ({"brightness": -1.0}, "data.brightness=-1.0 must be >= 0"),
                            ({"posterize_bits": [4, 9]}, "data.posterize_bits=.4, 9. must be"),
                            ({"solarize_threshold": [10, 5]}, "data.solarize_threshold=.10, 5. must be"),
                            ({"blur_sigma": [0.0, 2.0]}, "data.blur_sigma=.0.0, 2.0. must be")]:
        with pytest.raises(ValueError, match=message):
            check_augmentation(DataConfig(**change))
    check_augmentation(DataConfig())
