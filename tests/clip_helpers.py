"""Tiny real-image data for the CLIP tests: scikit-learn digits as JPEGs with captions, and LAION-layout shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from repa_ssl.data import DIGIT_NAMES, load_digits_images
from repa_ssl.data.write_shards import samples_from_folder, write_shards

CORRUPT = 3        # index of the truncated JPEG
UNCAPTIONED = 12   # index of the image without caption

TRAIN_FLAGS = ["--model", "RePa-ViT-Test", "--batch-size", "4", "--workers", "0", "--warmup", "1",
               "--device", "cpu", "--seed", "0"]


def write_digit_images(folder: Path, n: int, corrupt: tuple[int, ...] = (), uncaptioned: tuple[int, ...] = ()) -> Path:
    """``n`` digit images (64 px JPEG) with ``.txt`` captions; some truncated or without caption on request."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_images(64)
    for i in range(n):
        path = folder / f"{i:03d}.jpg"
        Image.fromarray((images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path, quality=90)
        if i in corrupt:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 3])
        if i not in uncaptioned:
            path.with_suffix(".txt").write_text(f"a photo of the digit {DIGIT_NAMES[int(labels[i])]}")
    return folder


def write_test_shards(root: Path, n: int = 16, per_shard: int = 8) -> str:
    """Two shards ``00000.tar``, ``00001.tar`` in img2dataset layout, one corrupt JPEG, one sample without
    caption; returns the brace pattern open_clip_train takes as ``--train-data``."""
    folder = write_digit_images(root / "images", n, corrupt=(CORRUPT,), uncaptioned=(UNCAPTIONED,))
    shards = write_shards(samples_from_folder(folder), root / "shards", samples_per_shard=per_shard, progress=False)
    return f"{root / 'shards'}/{{00000..{len(shards) - 1:05d}}}.tar"
