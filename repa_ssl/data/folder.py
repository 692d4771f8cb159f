"""ImageFolder datasets that skip and count unreadable images instead of crashing.

A bad image makes ``__getitem__`` return ``None``; ``collate_skipping`` drops those and
reports how many it dropped, so the count survives DataLoader worker processes and the
training or evaluation loop can log it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .images import BadImageError, load_rgb

_logger = logging.getLogger(__name__)

__all__ = ["RobustImageFolder", "SkippingBatch", "collate_skipping", "check_image_dir"]


def check_image_dir(root: str | Path, what: str = "dataset") -> Path:
    """Fail early, naming the path and the fix, when ``root`` is missing or holds no images."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{what} directory {root} does not exist: check the path you passed.")
    if not root.is_dir():
        raise NotADirectoryError(f"{what} path {root} is not a directory: give the folder that holds the "
                                 "class sub-folders (ImageFolder layout: root/<class>/<image>).")
    if not any(p.suffix.lower() in IMG_EXTENSIONS for p in root.rglob("*") if p.is_file()):
        raise FileNotFoundError(f"{what} directory {root} holds no images ({', '.join(IMG_EXTENSIONS)}): "
                                "expected root/<class>/<image> files.")
    return root


class RobustImageFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder`` whose unreadable samples come back as ``None``."""

    def __init__(self, root: str | Path, transform: Optional[Callable] = None, **kwargs: Any) -> None:
        root = check_image_dir(root)
        super().__init__(str(root), transform=transform, loader=load_rgb, **kwargs)  # torchvision's extensions

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except BadImageError as e:
            _logger.warning("skipping %s", e)
            return None
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


@dataclass
class SkippingBatch:
    """A collated batch plus the number of samples dropped from it as unreadable."""

    data: Any
    num_skipped: int


def collate_skipping(samples: Sequence[Any]) -> SkippingBatch:
    kept = [s for s in samples if s is not None]
    return SkippingBatch(default_collate(kept) if kept else None, len(samples) - len(kept))
