"""The embedded default dataset: scikit-learn's handwritten digits (real 8x8 scans).

1,797 grey-level images in 10 classes ship with scikit-learn, so demos and tests run
on real images without downloading anything.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["load_digits_images", "DIGIT_NAMES"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digits_images(image_size: int = 224, split: str = "all", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as float RGB tensors in [0, 1] of shape (N, 3, image_size, image_size), plus labels.

    ``split`` is ``'all'``, ``'train'`` (80 %) or ``'val'`` (20 %), a fixed stratified split.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)  # pixel values are 0..16
    labels = torch.from_numpy(digits.target.astype(np.int64))
    if split != "all":
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}")
        rng = np.random.default_rng(seed)
        is_val = np.zeros(len(labels), dtype=bool)
        for c in range(10):
            idx = np.flatnonzero(digits.target == c)
            is_val[rng.permutation(idx)[: len(idx) // 5]] = True
        keep = torch.from_numpy(is_val if split == "val" else ~is_val)
        images, labels = images[keep], labels[keep]
    images = F.interpolate(images[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), labels
