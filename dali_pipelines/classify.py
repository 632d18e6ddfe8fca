"""Labelled images for supervised fine-tuning in DALI: WebDataset shards -> (image, label).

The same reader as the PIRL pipeline (dali_pipelines/pirl.py), without the patch view: the
semi-supervised benchmark trains on (RandomResizedCrop 224 + flip) and tests on (resize 256,
centre crop 224), ImageNet-normalised (vissl configs/config/benchmark/semi_supervised/imagenet1k/
eval_resnet_8gpu_transfer_in1k_semi_sup_fulltune.yaml, TRANSFORMS). One definition builds both
graphs: device_id an int decodes with nvJPEG (device="mixed") and crops on the GPU; device_id=None
runs everything on the CPU.

A subset of the shards (1% / 10% of the labels) is read through *subset index files*: DALI index
files (v1.2) listing only the chosen samples of each tar, at their byte offsets in the original
tar, so nothing is copied and the reader seeks straight to the chosen samples.

    train=True:  random_resized_crop(size, scale 0.08-1, ratio 3/4-4/3) -> flip p=0.5 -> normalise
    train=False: resize shorter side to size*256/224 -> centre crop size -> normalise
Returns (images (B, size, size, 3) float32 HWC, label (B, 1) int64).
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from dali_pipelines import ASPECT_RATIO
from dali_pipelines.pirl import MEAN_255, READER_NAME, STD_255


@pipeline_def(enable_conditionals=False)
def classify_pipeline(tar_paths: list[str], index_paths: list[str], size: int, train: bool, shuffle_buffer: int,
                      seed_epoch: int, gpu: bool):
    """Build with classify_pipeline(tars, indices, size, train, shuffle_buffer, seed, gpu, batch_size=B,
    num_threads=T, device_id=(cuda index | None), seed=S)."""
    jpegs, label = fn.readers.webdataset(
        paths=tar_paths, index_paths=index_paths, ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT64],
        missing_component_behavior="error", random_shuffle=train, initial_fill=shuffle_buffer,
        shuffle_after_epoch=train, shuffle_after_epoch_seed=seed_epoch, pad_last_batch=not train, name=READER_NAME)
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    if train:
        images = fn.random_resized_crop(images, size=[size, size], random_area=[0.08, 1.0],
                                        random_aspect_ratio=list(ASPECT_RATIO))
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        images = fn.resize(images, resize_shorter=round(size * 256 / 224))
        images = fn.crop(images, crop=[size, size])  # centre crop (crop_pos 0.5)
        mirror = 0
    images = fn.crop_mirror_normalize(images, mirror=mirror, mean=MEAN_255, std=STD_255,
                                      dtype=types.FLOAT, output_layout="HWC")
    return images, label
