"""Pretraining data for DINO: an ImageFolder, webdataset shards, or the embedded digits.

``--data-source folder`` reads ``root/<class>/<image>`` (labels unused), ``wds`` reads
LAION/img2dataset shards image-only, ``digits`` the scikit-learn digits shipped with the
project. Unreadable images are skipped and counted (``SkippingBatch.num_skipped``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms.functional import to_pil_image

from repa_ssl.data import (
    ImageShards, RobustImageFolder, collate_skipping, count_shard_samples, expand_shards, load_digits_images)
from repa_ssl.data.shards import SHARD_STREAMS, SHUFFLE_BUFFER, SHUFFLE_INITIAL
from repa_ssl.distributed import DistEnv

_logger = logging.getLogger(__name__)

__all__ = ["DATA_SOURCES", "DigitsDataset", "ResumableSampler", "build_dataset", "build_loader"]

DATA_SOURCES = ("folder", "wds", "digits")


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 digit scans as RGB PIL images of ``image_size`` pixels, with labels."""

    def __init__(self, image_size: int, transform: Optional[Callable] = None, split: str = "all") -> None:
        self.images, self.labels = load_digits_images(image_size=image_size, split=split)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = to_pil_image(self.images[index])
        return (self.transform(image) if self.transform is not None else image), int(self.labels[index])


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start its next epoch part-way through (mid-epoch resume)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.skip:]
        self.skip = 0  # only the first epoch after a resume is partial
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.skip


def build_dataset(source: str, path: Optional[str], transform: Callable, image_size: int,
                  shuffle_buffer: int = SHUFFLE_BUFFER, allow_remote: bool = False,
                  shard_streams: int = SHARD_STREAMS) -> Dataset:
    """The dataset named by ``--data-source``, each sample ``(transform(image), label)`` or ``None``.

    ``allow_remote`` (``--allow-remote-shards``) lets ``wds`` read ``pipe:`` and URL shard specs; ``wds``
    shuffles in a buffer of ``shuffle_buffer`` samples (the first yielded once it holds
    ``min(shuffle_buffer, 1000)``) the samples of ``shard_streams`` shards read at once by each worker.
    """
    if source == "folder":
        if not path:
            raise ValueError("--data-source folder needs --data-path (root/<class>/<image> layout).")
        return RobustImageFolder(path, transform=transform)
    if source == "wds":
        if not path:
            raise ValueError("--data-source wds needs --data-path (a folder of .tar shards or a brace pattern).")
        return ImageShards(expand_shards(path, allow_remote), transform=transform, shuffle_buffer=shuffle_buffer,
                           shuffle_initial=min(shuffle_buffer, SHUFFLE_INITIAL), streams=shard_streams)
    if source == "digits":
        # 8x8 scans: stored at <= 64 px (1,797 x 64 x 64 RGB), the crops resize them to the crop size.
        return DigitsDataset(min(image_size, 64), transform=transform)
    raise ValueError(f"unknown --data-source {source!r}; choose one of {', '.join(DATA_SOURCES)}")


def build_loader(dataset: Dataset, env: DistEnv, batch_size: int, num_workers: int, seed: int,
                 num_samples: Optional[int] = None) -> tuple[DataLoader, Optional[ResumableSampler], int]:
    """DataLoader over this process's share, its sampler (None for shards), and iterations per epoch.

    Shards are endless streams, so their epoch is ``num_samples`` images (counted from the
    shards when not given); every process runs the same number of iterations.
    """
    # The loader's own generator seeds its workers, so that does not touch the global RNG;
    # the training loop reseeds it every epoch.
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=env.device.type == "cuda",
                  drop_last=True, collate_fn=collate_skipping, generator=torch.Generator())
    if isinstance(dataset, ImageShards):
        if num_samples is None:
            _logger.info("counting the images in %d shards (pass --train-num-samples to skip this)",
                         len(dataset.shards))
            num_samples = count_shard_samples(dataset.shards)
        niter = num_samples // (batch_size * env.world_size)
        loader, sampler = DataLoader(dataset, **common), None
    else:
        sampler = ResumableSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
        loader = DataLoader(dataset, sampler=sampler, **common)
        niter = len(loader)
        num_samples = len(dataset)
    if niter == 0:
        raise ValueError(f"{num_samples} images are fewer than one global batch ({batch_size} x "
                         f"{env.world_size} processes): lower --batch-size-per-gpu or add data.")
    return loader, sampler, niter
