"""Evaluation of fused towers: k-NN, linear probe and zero-shot classification.

One loading step (``load_tower``), one fusion-and-verify step (``fuse_and_verify``) and one
feature extractor (``extract_features``) behind three entry points:
``python -m repa_ssl.eval.knn``, ``python -m repa_ssl.eval.linear``, ``python -m repa_ssl.eval.zeroshot``.
"""
from .features import Features, class_token, clip_image, extract_features, last_blocks
from .towers import Tower, fuse_and_verify, load_tower

__all__ = [
    "Features",
    "Tower",
    "class_token",
    "clip_image",
    "extract_features",
    "fuse_and_verify",
    "last_blocks",
    "load_tower",
]
