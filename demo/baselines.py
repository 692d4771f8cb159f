"""The reference points the pretrained towers are compared with: raw pixels and a random tower."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torchvision import transforms as T

from repa_ssl.checkpoint import save_checkpoint
from repa_ssl.data import RobustImageFolder
from repa_ssl.distributed import DistEnv
from repa_ssl.eval.features import Features, extract_features
from repa_ssl.eval.data import make_loader
from repa_ssl.eval.knn import knn_classify
from repa_ssl.eval.linear import LinearClassifier, cached_batches, train_linear

__all__ = ["save_random_tower", "pixel_features", "linear_probe", "pixel_baselines"]


def save_random_tower(arch: str, idle_ratio: float, path: Path, seed: int = 0) -> Path:
    """A randomly initialised ``arch`` (train form, θ = ``idle_ratio``) as a plain timm state dict.

    The evaluations load it like any timm checkpoint (``--model arch --idle-ratio θ``), fuse it
    and check the fusion, exactly as for the pretrained tower.
    """
    torch.manual_seed(seed)
    return save_checkpoint(timm.create_model(arch, idle_ratio=idle_ratio).state_dict(), path)


def pixel_features(root: Path, split: str, size: int, env: DistEnv, num_workers: int = 0) -> Features:
    """Images of ``root/split`` resized to ``size`` px (grey), flattened: the "no model" features."""
    transform = T.Compose([T.Grayscale(), T.Resize((size, size), antialias=True), T.ToTensor(),
                           T.Lambda(lambda x: x.flatten())])
    loader = make_loader(RobustImageFolder(Path(root) / split, transform=transform), 256, num_workers, env)
    return extract_features(lambda x: x, loader, env, desc=f"pixels {split}")


def linear_probe(train: Features, val: Features, env: DistEnv, epochs: int, lr: float,
                 batch_size: int = 128) -> dict[str, Any]:
    """``repa_ssl.eval.linear``'s classifier and SGD schedule on cached features; ``lr`` per 256 images."""
    num_classes = int(train.labels.max()) + 1
    out = train_linear(LinearClassifier(train.features.shape[1], num_classes), cached_batches(train, batch_size, env),
                       val, env, epochs, lr * batch_size / 256)
    return dict(best=out["best"], last=out["last"], feature_dim=int(train.features.shape[1]))


def pixel_baselines(root: Path, size: int, env: DistEnv, ks: list[int], linear_epochs: int, linear_lr: float
                    ) -> dict[str, Any]:
    """k-NN and linear probe on raw pixels, with the same protocol as for the towers."""
    train, val = pixel_features(root, "train", size, env), pixel_features(root, "val", size, env)
    knn = knn_classify(train.features, train.labels, val.features, val.labels, ks,
                       num_classes=int(train.labels.max()) + 1)
    return dict(feature_dim=int(train.features.shape[1]), image_size=size,
                knn=knn,
                linear=linear_probe(train, val, env, linear_epochs, linear_lr))
