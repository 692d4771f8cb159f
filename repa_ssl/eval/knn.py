"""Weighted k-NN classification on frozen, fused class-token features (the DINO protocol).

    python -m repa_ssl.eval.knn outputs/dino/checkpoint.pth --data-path /datasets/imagenet \\
        --output-dir outputs/knn [--save-features outputs/knn/features]
    torchrun --nproc_per_node 8 -m repa_ssl.eval.knn ...      # features gathered across processes

Resize 256 / center crop 224 (bicubic), L2-normalised features, each test image votes with
its k nearest training images weighted by exp(similarity / T), T = 0.07, for k in 10, 20,
100, 200. Similarities are computed for a chunk of test images at a time, so memory stays
bounded (a chunk × N_train matrix).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import RobustImageFolder
from ..distributed import DistEnv
from .cli import add_common_args, common_options, prepare_tower, run_evaluation
from .data import eval_transform, make_loader
from .features import Features, class_token, extract_features
from .options import EvalOptions, EvalResult, default_env, fuse_on_first_batch
from .towers import Tower

_logger = logging.getLogger("repa_ssl.eval.knn")

__all__ = ["KNNOptions", "KNNResult", "evaluate_knn", "extract_knn_features", "knn_on_features", "knn_classify",
           "main"]


@torch.no_grad()
def knn_classify(
        train_features: torch.Tensor,
        train_labels: torch.Tensor,
        test_features: torch.Tensor,
        test_labels: torch.Tensor,
        ks: Sequence[int] = (10, 20, 100, 200),
        temperature: float = 0.07,
        num_classes: Optional[int] = None,
        chunk_size: int = 256,
        progress: bool = False,
) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy (%) of weighted k-NN voting for each k in ``ks``.

    Features are L2-normalised here; computation happens on ``train_features``' device.
    """
    device = train_features.device
    num_classes = num_classes or int(train_labels.max().item()) + 1
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device)
    max_k = min(max(ks), train.shape[0])
    top1 = {k: 0 for k in ks}
    top5 = {k: 0 for k in ks}
    num_test = test_features.shape[0]
    for start in tqdm(range(0, num_test, chunk_size), desc="k-NN", disable=not progress, dynamic_ncols=True):
        test = F.normalize(test_features[start:start + chunk_size].to(device).float(), dim=1)
        targets = test_labels[start:start + chunk_size].to(device)
        sims, idx = (test @ train.T).topk(max_k, dim=1)  # sorted, most similar first
        neighbour_labels = train_labels[idx]
        weights = (sims / temperature).exp()
        for k in ks:
            k_eff = min(k, max_k)
            scores = torch.zeros(test.shape[0], num_classes, device=device)
            scores.scatter_add_(1, neighbour_labels[:, :k_eff], weights[:, :k_eff])
            # DINO's ranking (eval_knn: probs.sort(1, True)): tied classes, such as those without a vote,
            # in class-index order on every device, and top-5 out of the first min(5, k) classes
            ranked = scores.sort(dim=1, descending=True, stable=True).indices[:, :min(5, k_eff)]
            correct = ranked == targets[:, None]
            top1[k] += int(correct[:, 0].sum())
            top5[k] += int(correct.any(dim=1).sum())
    return {k: dict(top1=100.0 * top1[k] / num_test, top5=100.0 * top5[k] / num_test) for k in ks}


@dataclass(kw_only=True)
class KNNOptions(EvalOptions):
    """The data and the voting of a k-NN evaluation."""

    data_path: str | Path  # folder with train/ and val/ in ImageFolder layout
    ks: Sequence[int] = (10, 20, 100, 200)
    temperature: float = 0.07
    chunk_size: int = 256  # test images per similarity chunk
    save_features: Optional[str | Path] = None  # write train/val features to this folder


@dataclass
class KNNResult(EvalResult):
    """Top-1 / top-5 accuracy (%) for each k."""

    num_train: int
    num_val: int
    temperature: float
    accuracy: dict[int, dict[str, float]]

    evaluation: ClassVar[str] = "k-NN"
    stem: ClassVar[str] = "knn_results"

    def to_json(self) -> dict[str, Any]:
        return dict(super().to_json(), accuracy={str(k): v for k, v in self.accuracy.items()})

    def table(self) -> tuple[list[str], list[list[Any]]]:
        return ["k", "top-1 (%)", "top-5 (%)"], [[k, v["top1"], v["top5"]] for k, v in self.accuracy.items()]


def extract_knn_features(tower: Tower, options: KNNOptions, env: DistEnv) -> tuple[Features, Features]:
    """Fused class-token features of ``train/`` and ``val/``; their ``meta`` holds the tower, its costs, classes."""
    tower.model.to(env.device)
    transform = eval_transform(tower.image_size, tower.mean, tower.std, options.resize_size)
    train_set = RobustImageFolder(Path(options.data_path) / "train", transform=transform)
    val_set = RobustImageFolder(Path(options.data_path) / "val", transform=transform)
    if train_set.classes != val_set.classes:
        raise ValueError(f"train/ and val/ under {options.data_path} have different class folders; k-NN needs the "
                         "same.")
    train_loader = make_loader(train_set, options.batch_size, options.num_workers, env)
    val_loader = make_loader(val_set, options.batch_size, options.num_workers, env)
    fn, costs = fuse_on_first_batch(tower, val_loader, env, options, class_token)
    meta = dict(tower=tower.summary(), costs=costs, classes=train_set.classes)
    train = extract_features(fn, train_loader, env, desc="train features")
    val = extract_features(fn, val_loader, env, desc="val features")
    train.meta = val.meta = meta
    if options.save_features and env.is_main:
        train.save(Path(options.save_features) / "train_features.pth")
        val.save(Path(options.save_features) / "val_features.pth")
    return train, val


def knn_on_features(train: Features, val: Features, options: KNNOptions, device: torch.device) -> KNNResult:
    """k-NN of ``val`` against ``train``, features from ``extract_knn_features`` (or ``--save-features``)."""
    acc = knn_classify(train.features.to(device), train.labels, val.features, val.labels, options.ks,
                       options.temperature, num_classes=len(train.meta["classes"]), chunk_size=options.chunk_size,
                       progress=True)
    return KNNResult(tower=train.meta["tower"], costs=train.meta["costs"],
                     num_skipped=train.num_skipped + val.num_skipped, num_train=len(train.labels),
                     num_val=len(val.labels), temperature=options.temperature, accuracy=acc)


def evaluate_knn(tower: Tower, options: KNNOptions, env: Optional[DistEnv] = None) -> Optional[KNNResult]:
    """Fuse ``tower`` (checked on the first val batch), extract features, classify ``val/`` by k-NN.

    Under torchrun every process extracts its share; the result comes back on rank 0 (None elsewhere).
    """
    env = default_env(tower, env)
    train, val = extract_knn_features(tower, options, env)
    return knn_on_features(train, val, options, env.device) if env.is_main else None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser("python -m repa_ssl.eval.knn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, checkpoint_required=False)
    p.add_argument("--data-path", default=None, help="folder with train/ and val/ in ImageFolder layout")
    p.add_argument("--nb-knn", type=int, nargs="+", default=[10, 20, 100, 200], help="values of k")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--chunk-size", type=int, default=256, help="test images per similarity chunk")
    p.add_argument("--save-features", default=None, help="write train/val features to this folder")
    p.add_argument("--load-features", default=None, help="read features saved by --save-features; no model needed")
    args = p.parse_args(argv)
    if args.load_features is None and (args.checkpoint is None or args.data_path is None):
        p.error("give a CHECKPOINT and --data-path (or --load-features DIR)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict[str, Any]]:
    args = parse_args(argv)
    options = KNNOptions(data_path=args.data_path, ks=args.nb_knn, temperature=args.temperature,
                         chunk_size=args.chunk_size, save_features=args.save_features, **common_options(args))

    def evaluate(env: DistEnv) -> Optional[KNNResult]:
        if args.load_features:
            train, val = (Features.load(Path(args.load_features) / f"{split}_features.pth")
                          for split in ("train", "val"))
            return knn_on_features(train, val, options, env.device) if env.is_main else None
        return evaluate_knn(prepare_tower(args, env), options, env)

    return run_evaluation(args, evaluate)


if __name__ == "__main__":
    main()
