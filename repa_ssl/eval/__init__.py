"""Evaluation of fused towers: k-NN, linear probe and zero-shot classification.

One loading step (``load_tower``), one fusion-and-verify step (``fuse_and_verify``) and one
feature extractor (``extract_features``) behind three functions, each taking a tower and its
options and returning a result with ``to_json()``::

    tower = load_tower("runs/dino/checkpoint.pth")
    result = evaluate_knn(tower, KNNOptions(data_path="/datasets/imagenet"))

and their commands ``python -m repa_ssl.eval.knn``, ``python -m repa_ssl.eval.linear``,
``python -m repa_ssl.eval.zeroshot``.
"""
from .features import Features, class_token, clip_image, extract_features, last_blocks
from .knn import KNNOptions, KNNResult, evaluate_knn
from .linear import LinearOptions, LinearResult, evaluate_linear
from .options import EvalOptions, EvalResult
from .towers import Tower, fuse_and_verify, load_tower
from .zeroshot import ZeroShotOptions, ZeroShotResult, evaluate_zeroshot

__all__ = [
    "EvalOptions",
    "EvalResult",
    "Features",
    "KNNOptions",
    "KNNResult",
    "LinearOptions",
    "LinearResult",
    "ZeroShotOptions",
    "ZeroShotResult",
    "evaluate_knn",
    "evaluate_linear",
    "evaluate_zeroshot",
    "Tower",
    "class_token",
    "clip_image",
    "extract_features",
    "fuse_and_verify",
    "last_blocks",
    "load_tower",
]
