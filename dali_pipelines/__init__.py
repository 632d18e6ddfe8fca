"""DALI pipeline definitions. Importing pirl.py or classify.py imports DALI: keep them behind a guard
(pirl_fast.data.loader_dali imports them only when the `dali` backend is asked for). This file does not:
the torch backend and evaluation read the constants below without DALI installed."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics every torchvision ResNet recipe normalises with (0-1 scale)
IMAGENET_STD = (0.229, 0.224, 0.225)
ASPECT_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default aspect-ratio range
