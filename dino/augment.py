"""DINO's multi-crop augmentation: 2 global crops and N local crops, each augmented independently."""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

__all__ = ["DataAugmentationDINO"]

BICUBIC = transforms.InterpolationMode.BICUBIC
# PIL's GaussianBlur radius is the standard deviation; sigma in [0.1, 2] with a kernel
# covering +-3 sigma reproduces it.
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL = 13


def _blur(p: float) -> transforms.RandomApply:
    return transforms.RandomApply([transforms.GaussianBlur(BLUR_KERNEL, sigma=BLUR_SIGMA)], p=p)


class DataAugmentationDINO:
    """PIL image -> ``[global_1, global_2, local_1, ..., local_N]`` normalised tensors.

    Every crop: flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2.
    Global 1: blur p=1.0. Global 2: blur p=0.1, solarize(128) p=0.2. Local: blur p=0.5.
    Crops are bicubic ``RandomResizedCrop`` with the given scales and sizes.
    """

    def __init__(
            self,
            global_crops_scale: Sequence[float] = (0.4, 1.0),
            local_crops_scale: Sequence[float] = (0.05, 0.4),
            local_crops_number: int = 8,
            global_crop_size: int = 224,
            local_crop_size: int = 96,
    ) -> None:
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ])
        global_crop = transforms.RandomResizedCrop(global_crop_size, scale=tuple(global_crops_scale),
                                                   interpolation=BICUBIC)
        self.global_transfo1 = transforms.Compose([global_crop, flip_and_color_jitter, _blur(1.0), normalize])
        self.global_transfo2 = transforms.Compose([
            global_crop, flip_and_color_jitter, _blur(0.1), transforms.RandomSolarize(128, p=0.2), normalize])
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(local_crop_size, scale=tuple(local_crops_scale), interpolation=BICUBIC),
            flip_and_color_jitter,
            _blur(0.5),
            normalize,
        ])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops.extend(self.local_transfo(image) for _ in range(self.local_crops_number))
        return crops
