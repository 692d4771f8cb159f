"""The one feature extractor behind k-NN, the linear probe and zero-shot.

A feature function maps a batch of images to one vector per image:

* ``class_token`` — the class token after the final norm (a timm tower with ``num_classes=0``);
* ``last_blocks`` — the linear probe's features: the class tokens of the last ``n`` blocks, each
  after the final norm, optionally with the average of the last block's patch tokens;
* ``clip_image`` — a CLIP model's L2-normalised image embedding (zero-shot).

``extract_features`` runs one over a loader (tqdm bar, corrupt images skipped and counted)
and, under torchrun, gathers every process's rows back into dataset order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import load_checkpoint, save_checkpoint
from ..distributed import DistEnv, all_gather_concat, all_reduce_sum

_logger = logging.getLogger(__name__)

__all__ = ["Features", "FeatureFn", "class_token", "last_blocks", "clip_image", "extract_features"]

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
_GATHER_ROWS = 8192  # rows per all_gather, so gathering never needs a second copy of all features on GPU


def class_token(model: nn.Module) -> FeatureFn:
    return model  # timm towers built with num_classes=0 return the (final-normed) class token


def last_blocks(model: nn.Module, n: int, avgpool: bool = False) -> FeatureFn:
    if not hasattr(model, "get_intermediate_layers"):
        raise ValueError(f"{type(model).__name__} has no get_intermediate_layers: the linear probe needs a timm ViT.")

    def forward(x: torch.Tensor) -> torch.Tensor:
        # timm drops the prefix tokens and skips the final norm unless asked.
        out = model.get_intermediate_layers(x, n, return_prefix_tokens=True, norm=True)
        feats = [prefix[:, 0] for _, prefix in out]
        if avgpool:
            feats.append(out[-1][0].mean(dim=1))
        return torch.cat(feats, dim=-1)

    return forward


def clip_image(model: nn.Module) -> FeatureFn:
    return lambda x: model.encode_image(x, normalize=True)


@dataclass
class Features:
    """Features in dataset order (rows of unreadable images left out) with their labels."""

    features: torch.Tensor  # (N, D) float32, CPU
    labels: torch.Tensor  # (N,) int64
    num_skipped: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Union[str, Path]) -> Path:
        return save_checkpoint(dict(features=self.features, labels=self.labels, num_skipped=self.num_skipped,
                                    meta=self.meta), path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Features":
        d = load_checkpoint(path)
        return cls(d["features"], d["labels"], d["num_skipped"], d.get("meta", {}))


def _gather(rows: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """All processes' ``rows``, concatenated, moved through the backend's device in bounded chunks."""
    n_max = torch.tensor([rows.shape[0]], device=env.device)
    dist.all_reduce(n_max, op=dist.ReduceOp.MAX)
    out = [all_gather_concat(rows[start:start + _GATHER_ROWS].to(env.device)).cpu()
           for start in range(0, int(n_max.item()), _GATHER_ROWS)]
    return torch.cat(out) if out else rows


@torch.no_grad()  # not inference_mode: cached features feed the linear probe's autograd
def extract_features(fn: FeatureFn, loader: DataLoader, env: DistEnv, desc: str = "features") -> Features:
    """Run ``fn`` on every readable image of ``loader``; gather all processes' rows in dataset order."""
    feats, labels, indices, skipped = [], [], [], 0
    for batch in tqdm(loader, desc=desc, disable=not env.is_main, dynamic_ncols=True):
        skipped += batch.num_skipped
        if batch.data is None:
            continue
        images, targets, index = batch.data
        feats.append(fn(images.to(env.device, non_blocking=True)).float().cpu())
        labels.append(targets)
        indices.append(index)
    if not feats:
        raise RuntimeError(f"{desc}: no readable image (skipped {skipped}); check the dataset.")
    feats, labels, indices = torch.cat(feats), torch.cat(labels).long(), torch.cat(indices).long()
    num_skipped = int(all_reduce_sum(torch.tensor([skipped], device=env.device)).item())
    if env.distributed:
        feats = _gather(feats, env)
        labels, indices = _gather(labels, env), _gather(indices, env)
        # DistributedSampler pads with repeated samples: keep one row per dataset index, in order.
        order = torch.argsort(indices, stable=True)
        indices, feats, labels = indices[order], feats[order], labels[order]
        keep = torch.ones_like(indices, dtype=torch.bool)
        keep[1:] = indices[1:] != indices[:-1]
        feats, labels = feats[keep], labels[keep]
    if num_skipped:
        _logger.warning("%s: skipped %d unreadable images", desc, num_skipped)
    return Features(feats, labels, num_skipped)
