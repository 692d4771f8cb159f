"""Build the DINO backbone: any timm ViT, with the channel-idle options for RePa models."""
from __future__ import annotations

from typing import Optional

import timm
from torch import nn

from repa_ssl import is_repa_name, repa_model_names  # importing repa_ssl registers the repa_vit_* models

__all__ = ["build_backbone", "is_repa_arch"]


def is_repa_arch(arch: str) -> bool:
    """True for the channel-idle RePa timm models (``repa_ssl.repa_model_names()``)."""
    if not timm.is_model(arch):
        raise ValueError(f"unknown --arch {arch!r}: not a timm model. RePa models: {', '.join(repa_model_names())}")
    return is_repa_name(arch)


def build_backbone(
        arch: str,
        idle_ratio: Optional[float] = None,
        idle_schedule: Optional[str] = None,
        patch_size: Optional[int] = None,
        drop_path_rate: float = 0.0,
        inference_mode: bool = False,
) -> nn.Module:
    """A headless timm model (CLS-token output) that takes global and local crop sizes.

    ``dynamic_img_size`` interpolates the position embedding for crops smaller than the
    model's native size (local crops), as DINO's ViT does; the stored position embedding
    keeps the native grid, so the teacher loads into a plain ``timm.create_model(arch)``.
    """
    kwargs = dict(num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path_rate)
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    if is_repa_arch(arch):
        kwargs.update(inference_mode=inference_mode)
        if idle_ratio is not None:
            kwargs["idle_ratio"] = idle_ratio
        if idle_schedule is not None:
            kwargs["idle_schedule"] = idle_schedule
    return timm.create_model(arch, **kwargs)
