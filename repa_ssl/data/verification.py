"""The small batch of real images that the fused-vs-train-form check runs on."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch.utils.data import Dataset, IterableDataset

__all__ = ["verification_batch"]


def verification_batch(
        samples: Union[Dataset, Iterable[Any]],
        size: int = 16,
        source: str = "the dataset",
        max_samples: Optional[int] = None,
) -> torch.Tensor:
    """The first ``size`` readable images of ``samples``, stacked.

    ``samples`` is a map-style dataset, an iterable dataset (e.g. the endless ``ImageShards``)
    or any iterable of ``(image, label)`` pairs, with ``None`` for an unreadable sample. At most
    ``max_samples`` (default ``100 * size``) are looked at, so a stream of bad samples cannot
    loop forever.
    """
    if isinstance(samples, Dataset) and not isinstance(samples, IterableDataset):
        dataset = samples
        samples = (dataset[i] for i in range(len(dataset)))
    limit = max_samples or 100 * size
    images = []
    for seen, sample in enumerate(samples, start=1):
        if sample is not None:
            images.append(sample[0])
        if len(images) == size or seen >= limit:
            break
    if not images:
        raise ValueError(f"no decodable images in {source} to verify the fused model with")
    return torch.stack(images)
