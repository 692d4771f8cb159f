"""Evaluation transforms and loaders (DINO protocol), robust to corrupt images and torchrun."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from ..data import collate_skipping
from ..distributed import DistEnv

__all__ = ["eval_transform", "train_transform", "IndexedDataset", "make_loader", "first_batch"]

_BICUBIC = T.InterpolationMode.BICUBIC


def eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                   std: Sequence[float] = IMAGENET_DEFAULT_STD, resize_size: Optional[int] = None) -> Callable:
    """DINO's evaluation view: resize (bicubic) then center crop, 256 -> 224 by default; ``resize_size`` for small
    images. The evaluations and ``dino.export``'s fusion check both use it."""
    resize_size = resize_size or round(image_size * 256 / 224)
    return T.Compose([T.Resize(resize_size, interpolation=_BICUBIC), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(mean, std)])


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """The linear probe's training augmentation: RandomResizedCrop + horizontal flip."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(mean, std)])


class IndexedDataset(Dataset):
    """Adds the sample index, so features gathered from several processes land in dataset order."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Optional[tuple[Any, Any, int]]:
        sample = self.dataset[index]
        return None if sample is None else (*sample, index)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, env: DistEnv, shuffle: bool = False,
                drop_last: bool = False) -> DataLoader:
    """Batches of ``(images, targets, indices)`` wrapped in ``SkippingBatch`` (bad images dropped, counted)."""
    dataset = IndexedDataset(dataset)
    sampler = DistributedSampler(dataset, shuffle=shuffle, drop_last=drop_last) if env.distributed else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle and sampler is None,
                      num_workers=num_workers, pin_memory=env.device.type == "cuda", drop_last=drop_last,
                      collate_fn=collate_skipping, persistent_workers=False)


def first_batch(loader: DataLoader, device: torch.device) -> torch.Tensor:
    """The first batch of readable images of ``loader`` (the fusion check runs on it)."""
    for batch in loader:
        if batch.data is not None:
            return batch.data[0].to(device)
    raise RuntimeError("no readable image in the evaluation set: every image failed to decode.")
