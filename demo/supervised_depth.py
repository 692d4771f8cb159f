"""Supervised accuracy of depth merging: a ViT-Tiny-sized vanilla ViT on the digits, 12 layers → 6 and → 3.

    python -m demo.supervised_depth --output outputs/supervised_depth.json            # a few minutes, 2 threads
    python -m demo.supervised_depth --seeds 0 1 --threads 2

A vanilla timm ViT (ViT-Tiny's width, depth and heads) is trained supervised on the digits' train split
(``repa_ssl.data.load_digits_images``, the demo's fixed 80/20 split) and its top-1 measured on the val
split. Then, for each K, a copy becomes a K-branch model (``repa_ssl.branch_model``), is fine-tuned under
the join schedule (``repa_ssl.join_schedule.JoinSchedule``: s from 1 to 0, then s = 0), merged into
depth / K standard blocks (``repa_ssl.fuse_model``, checked against the s = 0 model with
``verify_fusion``), and the MERGED model's top-1 is measured. The control is the deep model fine-tuned
for the same iterations with the same batches and learning rate, unbranched, so a change of top-1 is the
merge's, not the extra training's.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm import tqdm

import repa_ssl
from repa_ssl.checkpoint import atomic_write
from repa_ssl.cli import HelpFormatter, positive_int
from repa_ssl.data import load_digits_images
from repa_ssl.fusion import verify_fusion
from repa_ssl.join_schedule import JOIN_SCHEDULES, JoinSchedule

_logger = logging.getLogger(__name__)

__all__ = ["SupervisedDepthConfig", "MergedResult", "SupervisedDepthResult", "create_vit", "fit", "top1",
           "run", "format_table", "main"]


@dataclass(frozen=True)
class SupervisedDepthConfig:
    """The experiment: the model, its supervised training, and the fine-tuning every variant gets."""

    depth: int = 12
    embed_dim: int = 192  # ViT-Tiny
    num_heads: int = 3
    image_size: int = 8  # the digits' own resolution: 8 x 8 px, 4 x 4 patches -> 4 tokens (+ class token)
    patch_size: int = 4
    branches: tuple[int, ...] = (2, 4)  # 12 -> 6 and 12 -> 3
    epochs: int = 8
    finetune_epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3
    finetune_lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_iterations: int = 20
    join_fraction: float = 0.5
    join_schedule: str = "cosine"
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [k for k in self.branches if k < 2 or self.depth % k]
        if bad:
            raise ValueError(f"every K in --branches must be at least 2 and divide --depth {self.depth}; got {bad}")
        JoinSchedule(1, self.join_fraction, self.join_schedule)  # the schedule's own checks


@dataclass
class MergedResult:
    """One K: the merged model's top-1, the s = 0 branch model's (the same when the merge is exact), the check."""

    branches: int
    merged_depth: int
    top1: float
    s0_top1: float
    fusion_max_rel_err: float


@dataclass
class SupervisedDepthResult:
    config: SupervisedDepthConfig
    deep_top1: float
    control_top1: float  # the deep model after the same fine-tuning, unbranched
    merged: list[MergedResult] = field(default_factory=list)
    seconds: float = 0.0


def create_vit(cfg: SupervisedDepthConfig, num_classes: int = 10) -> nn.Module:
    """A vanilla timm ``VisionTransformer`` with ViT-Tiny's blocks at the digits' resolution."""
    return timm.create_model("vit_tiny_patch16_224", img_size=cfg.image_size, patch_size=cfg.patch_size,
                             embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                             num_classes=num_classes)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of full batches from successive seeded permutations of ``n`` samples (epochs without tails)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def fit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, iterations: int, lr: float,
        cfg: SupervisedDepthConfig, seed: int, join: Optional[JoinSchedule] = None, desc: str = "train") -> float:
    """AdamW with warm-up and cosine decay for ``iterations`` batches; returns the last loss.

    ``seed`` fixes the batches, so runs given the same seed see the same data in the same order. With
    ``join``, the branch join s of iteration ``i`` is set to ``join(i)`` before it, as ``dino.train`` does.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=iterations, warmup_t=min(cfg.warmup_iterations, iterations // 2),
                                  warmup_lr_init=lr / 100, t_in_epochs=False)
    batches = _batches(len(labels), min(cfg.batch_size, len(labels)), generator)
    model.train()
    loss = torch.tensor(float("nan"))
    with tqdm(range(iterations), desc=desc, leave=False) as bar:
        for it in bar:
            scheduler.step_update(it)
            if join is not None:
                repa_ssl.set_branch_join(model, join(it))
            idx = next(batches)
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    _logger.info("%s: %d iterations, last loss %.4f", desc, iterations, loss.item())
    return loss.item()


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent, in eval mode."""
    model.eval()
    correct = sum((model(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(labels), batch_size))
    return 100.0 * correct / len(labels)


def run(cfg: SupervisedDepthConfig) -> SupervisedDepthResult:
    """Train the deep model, then fine-tune the control and each K-branch model; merge and measure."""
    start = time.perf_counter()
    train_x, train_y = load_digits_images(cfg.image_size, "train")
    val_x, val_y = load_digits_images(cfg.image_size, "val")
    steps = len(train_y) // min(cfg.batch_size, len(train_y))
    torch.manual_seed(cfg.seed)
    deep = create_vit(cfg)
    fit(deep, train_x, train_y, cfg.epochs * steps, cfg.lr, cfg, cfg.seed, desc=f"deep ({cfg.depth} layers)")
    result = SupervisedDepthResult(cfg, deep_top1=top1(deep, val_x, val_y), control_top1=float("nan"))
    _logger.info("deep model (%d layers): top-1 %.2f %%", cfg.depth, result.deep_top1)

    iterations = cfg.finetune_epochs * steps
    control = copy.deepcopy(deep)
    fit(control, train_x, train_y, iterations, cfg.finetune_lr, cfg, cfg.seed + 1, desc="control (unbranched)")
    result.control_top1 = top1(control, val_x, val_y)
    _logger.info("control (%d layers, fine-tuned unbranched): top-1 %.2f %%", cfg.depth, result.control_top1)

    for k in cfg.branches:
        branched = repa_ssl.branch_model(copy.deepcopy(deep), k)
        join = JoinSchedule(iterations, cfg.join_fraction, cfg.join_schedule)
        fit(branched, train_x, train_y, iterations, cfg.finetune_lr, cfg, cfg.seed + 1, join=join,
            desc=f"K = {k} ({cfg.depth} -> {cfg.depth // k})")
        merged = repa_ssl.fuse_model(branched)  # FusionError unless the schedule ended at s = 0
        report = verify_fusion(branched, merged, val_x).check(f"the {cfg.depth // k}-layer merged model")
        result.merged.append(MergedResult(k, len(merged.blocks), top1(merged, val_x, val_y),
                                          top1(branched, val_x, val_y), report.max_rel_err))
        _logger.info("K = %d: merged %d layers, top-1 %.2f %% (s = 0 branch model %.2f %%, max rel err %.2g)",
                     k, len(merged.blocks), result.merged[-1].top1, result.merged[-1].s0_top1, report.max_rel_err)
    result.seconds = time.perf_counter() - start
    return result


def format_table(results: Sequence[SupervisedDepthResult]) -> str:
    """A Markdown table, one row per seed: each merged model's top-1 (its change from the deep model / the control)."""
    depth, ks = results[0].config.depth, results[0].config.branches
    head = ["seed", f"deep ({depth})", "control"] + [f"merged {depth} → {depth // k}" for k in ks]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [str(r.config.seed), f"{r.deep_top1:.2f}", f"{r.control_top1:.2f}"] + [
            f"{m.top1:.2f} ({m.top1 - r.deep_top1:+.2f} / {m.top1 - r.control_top1:+.2f})" for m in r.merged]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    d = SupervisedDepthConfig()
    p = argparse.ArgumentParser("python -m demo.supervised_depth", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[d.seed], help="one run per seed")
    p.add_argument("--branches", type=positive_int, nargs="+", default=list(d.branches),
                   help="the K to merge with (depth -> depth / K each)")
    p.add_argument("--depth", type=positive_int, default=d.depth)
    p.add_argument("--embed-dim", type=positive_int, default=d.embed_dim)
    p.add_argument("--num-heads", type=positive_int, default=d.num_heads)
    p.add_argument("--image-size", type=positive_int, default=d.image_size, help="digits are 8 x 8 px, upscaled")
    p.add_argument("--patch-size", type=positive_int, default=d.patch_size)
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="supervised training of the deep model")
    p.add_argument("--finetune-epochs", type=positive_int, default=d.finetune_epochs,
                   help="fine-tuning of the control and of each branch model")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-iterations", type=int, default=d.warmup_iterations)
    p.add_argument("--join-fraction", type=float, default=d.join_fraction,
                   help="share of the fine-tuning over which s falls from 1 to 0 (then s = 0)")
    p.add_argument("--join-schedule", choices=JOIN_SCHEDULES, default=d.join_schedule)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[SupervisedDepthResult]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {k: v for k, v in vars(args).items() if k not in ("seeds", "threads", "output")}
    try:
        configs = [SupervisedDepthConfig(**dict(options, branches=tuple(args.branches), seed=s)) for s in args.seeds]
    except ValueError as e:
        raise SystemExit(f"python -m demo.supervised_depth: {e}") from None
    results = [run(cfg) for cfg in configs]
    _logger.info("top-1 (%%) on the digits' val split, %d threads:\n%s", torch.get_num_threads(), format_table(results))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.output) as tmp:
            tmp.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
        _logger.info("results in %s", args.output)
    return results


if __name__ == "__main__":
    main()
