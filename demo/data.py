"""The demo's data on disk: digits as an ImageFolder (train/ and val/), captions, shards.

Everything downstream reads files, exactly as it would read a user's data: DINO and the
k-NN / linear probes read ``<root>/train`` and ``<root>/val`` (ImageFolder layout), CLIP
reads webdataset shards written from ``train/`` with one caption per image.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Optional, Sequence

from torchvision.transforms.functional import to_pil_image
from tqdm import tqdm

from repa_ssl.checkpoint import atomic_write
from repa_ssl.data import DIGIT_NAMES, check_image_dir, load_digits_images
from repa_ssl.data.write_shards import samples_from_folder

_logger = logging.getLogger(__name__)

__all__ = ["CAPTION_TEMPLATES", "write_digits_folder", "check_folder", "captioned_samples", "write_classnames",
           "write_templates", "shard_pattern"]

# Captions for CLIP training and the zero-shot prompt ensemble ("a photo of the number seven", ...).
CAPTION_TEMPLATES = (
    "a photo of the number {}.",
    "a handwritten {}.",
    "the digit {}.",
    "a scan of the number {}.",
    "a blurry photo of a handwritten {}.",
)


def write_digits_folder(root: Path, image_size: int) -> Path:
    """scikit-learn's digits, upscaled to ``image_size``, as ``root/{train,val}/<digit>/<n>.png``.

    The split is ``load_digits_images``'s fixed stratified 80/20 split; folders are named
    ``0`` … ``9`` so the ImageFolder label is the digit.
    """
    root = Path(root)
    for split in ("train", "val"):
        images, labels = load_digits_images(image_size, split)
        if (root / split).is_dir() and sum(1 for _ in (root / split).rglob("*.png")) == len(labels):
            continue  # already written by an earlier run with the same size
        for i, (img, label) in enumerate(tqdm(list(zip(images, labels)), desc=f"writing digits/{split}",
                                              leave=False)):
            path = root / split / str(int(label)) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            to_pil_image(img).convert("L").save(path)
    _logger.info("digits at %d px in %s (train/ and val/)", image_size, root)
    return root


def check_folder(root: Path) -> list[str]:
    """The class folders of ``root/train``, after checking ``root/val`` has the same ones."""
    train, val = (sorted(p.name for p in check_image_dir(Path(root) / split, f"{split}/").iterdir() if p.is_dir())
                  for split in ("train", "val"))
    if train != val:
        raise ValueError(f"{root}/train and {root}/val must hold the same class folders, got {train} and {val}.")
    return train


def captioned_samples(split_dir: Path, classnames: dict[str, str], seed: int = 0) -> list[tuple[Path, str]]:
    """``(image, caption)`` for every image under ``split_dir``: its own ``.txt`` caption if it has one,
    else a random template filled with its class name. Nothing is written into ``split_dir``."""
    rng = random.Random(seed)  # noqa: S311 (seeded caption choice, not cryptography)
    return [(path, caption if caption is not None
             else rng.choice(CAPTION_TEMPLATES).format(classnames[path.parent.name]))
            for path, caption in samples_from_folder(split_dir)]


def write_classnames(path: Path, folders: Sequence[str], names: Optional[dict[str, str]] = None) -> dict[str, str]:
    """``folder class name`` lines for the zero-shot classifier; digit folders get the digit's name."""
    mapping = {f: (names or {}).get(f) or (DIGIT_NAMES[int(f)] if f.isdigit() and int(f) < 10 else f)
               for f in folders}
    with atomic_write(path) as tmp:
        tmp.write_text("".join(f"{f} {n}\n" for f, n in mapping.items()))
    return mapping


def write_templates(path: Path) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(CAPTION_TEMPLATES) + "\n")
    return path


def shard_pattern(shards: Sequence[Path]) -> str:
    """Brace pattern (``dir/{00000..00001}.tar``) of shards written by ``write_shards``."""
    first, last = shards[0], shards[-1]
    return str(first) if len(shards) == 1 else f"{first.parent}/{{{first.stem}..{last.stem}}}.tar"
