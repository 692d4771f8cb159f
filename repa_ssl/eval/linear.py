"""Linear probe on a frozen, fused tower (the DINO protocol).

    python -m repa_ssl.eval.linear outputs/dino/checkpoint.pth --data-path /datasets/imagenet \\
        --output-dir outputs/linear [--mode cached]
    torchrun --nproc_per_node 8 -m repa_ssl.eval.linear ...

Features: the class tokens (after the final norm) of the last n blocks, n = 4 for models
narrower than ViT-B, n = 1 plus the average of the last block's patch tokens from ViT-B on
(``--n-last-blocks``, ``--avgpool-patchtokens``). Linear layer N(0, 0.01) / zero bias, SGD
momentum 0.9, weight decay 0, lr 0.001 × global batch / 256, cosine over 100 epochs.

``--mode augment`` (the reference) runs the frozen tower on RandomResizedCrop + flip images
every epoch; ``--mode cached`` extracts the center-crop training features once and trains on
them (no augmentation, far faster). Validation features
are always extracted once. Reports the best and the last top-1 / top-5.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..data import RobustImageFolder
from ..distributed import DistEnv, all_reduce_sum
from .cli import add_common_args, common_options, prepare_tower, run_evaluation
from .data import eval_transform, make_loader, train_transform
from .features import FeatureFn, Features, extract_features, last_blocks
from .options import EvalOptions, EvalResult, default_env, fuse_on_first_batch
from .results import topk_correct
from .towers import Tower

_logger = logging.getLogger("repa_ssl.eval.linear")

__all__ = ["LinearOptions", "LinearResult", "evaluate_linear", "LinearClassifier", "train_linear", "evaluate",
           "main"]

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch -> (features, labels) batches


class LinearClassifier(nn.Module):
    """A linear layer on frozen features, initialised N(0, 0.01) with zero bias."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


@torch.no_grad()
def evaluate(classifier: nn.Module, val: Features, device: torch.device, batch_size: int = 4096) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of ``classifier`` on precomputed validation features."""
    classifier.eval()
    top1 = top5 = 0
    for start in range(0, len(val.labels), batch_size):
        n1, n5 = topk_correct(classifier(val.features[start:start + batch_size].to(device)),
                              val.labels[start:start + batch_size])
        top1, top5 = top1 + n1, top5 + n5
    classifier.train()
    n = max(len(val.labels), 1)
    return dict(top1=100.0 * top1 / n, top5=100.0 * top5 / n)


def train_linear(classifier: nn.Module, batches: Batches, val: Features, env: DistEnv, epochs: int = 100,
                 lr: float = 0.001, val_freq: int = 1) -> dict[str, Any]:
    """SGD (momentum 0.9, no weight decay) with a per-epoch cosine schedule; ``lr`` already scaled.

    Returns the per-epoch history, the best epoch (highest top-1) and the last evaluation.
    """
    classifier.to(env.device).train()
    model = classifier
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        model = DistributedDataParallel(classifier, device_ids=device_ids)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    history, best = [], None
    for epoch in range(epochs):
        total, count = 0.0, 0
        for feats, labels in tqdm(batches(epoch), desc=f"linear epoch {epoch}", disable=not env.is_main,
                                  dynamic_ncols=True, leave=False):
            loss = F.cross_entropy(model(feats), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(labels), count + len(labels)
        scheduler.step()
        if (epoch + 1) % val_freq == 0 or epoch == epochs - 1:
            acc = evaluate(classifier, val, env.device)
            history.append(dict(epoch=epoch, train_loss=total / max(count, 1), **acc))
            if best is None or acc["top1"] > best["top1"]:
                best = history[-1]
            _logger.info("epoch %d: loss %.4f, val top-1 %.2f top-5 %.2f (best %.2f)", epoch, total / max(count, 1),
                         acc["top1"], acc["top5"], best["top1"])
    return dict(history=history, best=best, last=history[-1])


def cached_batches(train: Features, batch_size: int, env: DistEnv, seed: int = 0) -> Batches:
    dataset = TensorDataset(train.features, train.labels)
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed) if env.distributed else None
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=sampler is None, generator=generator)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for feats, labels in loader:
            yield feats.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)

    return batches


def augmented_batches(fn: FeatureFn, loader: DataLoader, env: DistEnv, skipped: list[int]) -> Batches:
    """Features of freshly augmented images each epoch; unreadable images are counted in ``skipped``."""

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            skipped[0] += batch.num_skipped
            if batch.data is None:
                continue
            images, targets, _ = batch.data
            with torch.no_grad():
                feats = fn(images.to(env.device, non_blocking=True))
            yield feats.float(), targets.to(env.device, non_blocking=True)

    return batches


@dataclass(kw_only=True)
class LinearOptions(EvalOptions):
    """The data, features and training of a linear probe."""

    data_path: str | Path  # folder with train/ and val/ in ImageFolder layout
    mode: str = "augment"  # augment: the reference's RandomResizedCrop + flip each epoch; cached: centre crops once
    n_last_blocks: Optional[int] = None  # default: 4 below ViT-B width, else 1
    avgpool_patchtokens: Optional[bool] = None  # default: below ViT-B width no, else yes
    epochs: int = 100
    lr: float = 0.001  # per 256 images (scaled by the global batch)
    val_freq: int = 1
    num_labels: Optional[int] = None  # default: the number of class folders
    save_classifier: Optional[str | Path] = None  # write the trained classifier here


@dataclass
class LinearResult(EvalResult):
    """Best and last top-1 / top-5 (%) of the probe, and its per-epoch history."""

    mode: str
    n_last_blocks: int
    avgpool_patchtokens: bool
    feature_dim: int
    lr: float  # as scaled for the global batch
    num_train: int
    num_val: int
    history: list[dict[str, float]]
    best: dict[str, float]
    last: dict[str, float]

    evaluation: ClassVar[str] = "linear probe"
    stem: ClassVar[str] = "linear_results"

    def title(self) -> str:
        return f"Linear probe ({self.mode}), {self.tower['name']}"

    def table(self) -> tuple[list[str], list[list[Any]]]:
        return ["", "top-1 (%)", "top-5 (%)"], [[f"{which} (epoch {r['epoch']})", r["top1"], r["top5"]]
                                                for which, r in (("best", self.best), ("last", self.last))]


def evaluate_linear(tower: Tower, options: LinearOptions, env: Optional[DistEnv] = None) -> Optional[LinearResult]:
    """Fuse ``tower`` (checked on the first val batch) and train a linear classifier on its frozen features.

    Under torchrun the classifier trains with DDP; the result comes back on rank 0 (None elsewhere).
    """
    env = default_env(tower, env)
    tower.model.to(env.device)
    wide = tower.model.num_features >= 768
    n = options.n_last_blocks or min(1 if wide else 4, len(getattr(tower.model, "blocks", [None])))
    avgpool = bool(wide if options.avgpool_patchtokens is None else options.avgpool_patchtokens)
    evaluation = eval_transform(tower.image_size, tower.mean, tower.std, options.resize_size)
    augment = options.mode == "augment"
    train_set = RobustImageFolder(Path(options.data_path) / "train", transform=(
        train_transform(tower.image_size, tower.mean, tower.std) if augment else evaluation))
    val_set = RobustImageFolder(Path(options.data_path) / "val", transform=evaluation)
    if train_set.classes != val_set.classes:
        raise ValueError(f"train/ and val/ under {options.data_path} have different class folders.")
    train_loader = make_loader(train_set, options.batch_size, options.num_workers, env, shuffle=augment,
                               drop_last=False)
    val_loader = make_loader(val_set, options.batch_size, options.num_workers, env)
    fn, costs = fuse_on_first_batch(tower, val_loader, env, options, lambda m: last_blocks(m, n, avgpool))
    val = extract_features(fn, val_loader, env, desc="val features")
    skipped = [0]
    if augment:
        batches = augmented_batches(fn, train_loader, env, skipped)
    else:
        train = extract_features(fn, train_loader, env, desc="train features")
        skipped[0] = train.num_skipped
        batches = cached_batches(train, options.batch_size, env, options.seed)
    lr = options.lr * options.batch_size * env.world_size / 256
    classifier = LinearClassifier(val.features.shape[1], options.num_labels or len(train_set.classes))
    _logger.info("linear probe on %d-d features (last %d blocks%s), %s mode, lr %.2e", val.features.shape[1], n,
                 " + avgpool" if avgpool else "", options.mode, lr)
    out = train_linear(classifier, batches, val, env, options.epochs, lr, options.val_freq)
    if augment:  # counted on each process, every epoch: report the total per pass over the training set
        skipped[0] = int(all_reduce_sum(torch.tensor([skipped[0]], device=env.device)).item()) // options.epochs
    if not env.is_main:
        return None
    if options.save_classifier:
        save_checkpoint(dict(state_dict=classifier.state_dict(), n_last_blocks=n, avgpool=avgpool,
                             classes=train_set.classes), Path(options.save_classifier))
    return LinearResult(tower=tower.summary(), costs=costs, num_skipped=val.num_skipped + skipped[0],
                        mode=options.mode, n_last_blocks=n, avgpool_patchtokens=avgpool,
                        feature_dim=val.features.shape[1], lr=lr, num_train=len(train_set), num_val=len(val.labels),
                        **out)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser("python -m repa_ssl.eval.linear", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--data-path", required=True, help="folder with train/ and val/ in ImageFolder layout")
    p.add_argument("--mode", choices=("augment", "cached"), default="augment")
    p.add_argument("--n-last-blocks", type=int, default=None, help="default: 4 below ViT-B width, else 1")
    p.add_argument("--avgpool-patchtokens", type=int, choices=(0, 1), default=None,
                   help="append the last block's mean patch token (default: 0 below ViT-B width, else 1)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.001, help="learning rate per 256 images (scaled by global batch)")
    p.add_argument("--val-freq", type=int, default=1)
    p.add_argument("--num-labels", type=int, default=None, help="default: the number of class folders")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict[str, Any]]:
    args = parse_args(argv)
    options = LinearOptions(
        data_path=args.data_path, mode=args.mode, n_last_blocks=args.n_last_blocks,
        avgpool_patchtokens=None if args.avgpool_patchtokens is None else bool(args.avgpool_patchtokens),
        epochs=args.epochs, lr=args.lr, val_freq=args.val_freq, num_labels=args.num_labels,
        save_classifier=Path(args.output_dir) / "linear_classifier.pth", **common_options(args))
    return run_evaluation(args, lambda env: evaluate_linear(prepare_tower(args, env), options, env))


if __name__ == "__main__":
    main()
