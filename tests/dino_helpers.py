"""Tiny DINO runs for the tests: a 2-block RePa ViT on a few generated images, on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# 32 px global / 16 px local crops, 2 local crops, 64 prototypes, small head: about 1 s per epoch.
TINY = [
    "--arch", "test_repa_vit", "--epochs", "2", "--batch-size-per-gpu", "4", "--global-crop-size", "32",
    "--local-crop-size", "16", "--local-crops-number", "2", "--out-dim", "64", "--head-hidden-dim", "64",
    "--head-bottleneck-dim", "32", "--num-workers", "0", "--lr", "0.1", "--warmup-epochs", "0", "--device", "cpu",
]


def make_images(root: Path, n_per_class: int = 8, classes: int = 2, size: int = 40) -> Path:
    """Small JPEGs with some structure (a coloured half and noise) in ImageFolder layout."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            arr[:, : size // 2] = (200 * c, (37 * i) % 255, 100)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.jpg")
    return root


def epoch_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]
