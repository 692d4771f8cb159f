"""OpenCLIP model configs with RePa image towers (JSON files in ``model_configs/``).

Registered on ``import repa_ssl``. Names (text towers identical to OpenCLIP's):

===============================  =====  ======================================
OpenCLIP name                    θ      image tower (timm name)
===============================  =====  ======================================
``RePa-ViT-B-16``                0.75   ``repa_vit_base_patch16_clip_224``
``RePa-ViT-B-16-idle50``         0.50   ``repa_vit_base_patch16_clip_224_idle50``
``RePa-ViT-B-32`` / ``-idle50``  ...    ``repa_vit_base_patch32_clip_224[_idle50]``
``RePa-ViT-L-14`` / ``-idle50``  ...    ``repa_vit_large_patch14_clip_224[_idle50]``
===============================  =====  ======================================

``RePa-ViT-Test`` is a tiny model (64 px, width 64) for tests and CPU demos.

Each has a ``-fused`` twin (e.g. ``RePa-ViT-B-16-fused``) whose image tower is built in
deploy form, so ``open_clip.create_model('RePa-ViT-B-16-fused', pretrained=<file>)``
loads a fused CLIP saved from ``repa_ssl.fuse_model(clip_model).state_dict()``.
"""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("model_configs")
FUSED_SUFFIX = "-fused"

__all__ = ["CONFIG_DIR", "register_open_clip_configs", "fused_model_name", "repa_clip_model_names"]


def repa_clip_model_names(include_fused: bool = True) -> list[str]:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    return names if include_fused else [n for n in names if not n.endswith(FUSED_SUFFIX)]


def register_open_clip_configs() -> None:
    """Make our configs visible to ``open_clip.create_model`` (idempotent)."""
    import open_clip
    from open_clip import factory

    if CONFIG_DIR not in factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(CONFIG_DIR)


def fused_model_name(model_name: str) -> str:
    """OpenCLIP name of the deploy form of ``model_name`` (``RePa-ViT-B-16`` -> ``RePa-ViT-B-16-fused``)."""
    if model_name.endswith(FUSED_SUFFIX):
        return model_name
    if model_name not in repa_clip_model_names():
        raise ValueError(
            f"{model_name!r} is not a RePa OpenCLIP model; choose one of {repa_clip_model_names(False)}.")
    return model_name + FUSED_SUFFIX
