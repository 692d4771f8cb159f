"""OpenCLIP model configs with RePa image towers (JSON files in ``model_configs/``).

Registered on ``import repa_ssl``. The names, their θ and image towers come from the table in
``models/names.py`` (``repa_clip_model_names()``): ``RePa-ViT-{B-16,B-32,L-14}`` at θ = 0.75 with
``-idle50`` twins at θ = 0.5, text towers identical to OpenCLIP's; ``RePa-ViT-Test`` (64 px, width 64)
for tests and ``RePa-ViT-Demo`` (32 px) for the CPU demo. The tests check the JSON files against it.

Each has a ``-fused`` twin (e.g. ``RePa-ViT-B-16-fused``) whose image tower is built in
deploy form, so ``open_clip.create_model('RePa-ViT-B-16-fused', pretrained=<file>)``
loads a fused CLIP saved from ``repa_ssl.fuse_model(clip_model).state_dict()``, and a ``-merged2`` twin
(e.g. ``RePa-ViT-B-16-merged2``, 12 -> 6 layers) for a CLIP whose image tower was depth-reparameterized
(``repa_ssl.branch_model(clip_model, 2)``, joined to s = 0) and then fused.
"""
from __future__ import annotations

from pathlib import Path

from .models.names import find_repa_name, repa_model_names, repa_variant_name

CONFIG_DIR = Path(__file__).with_name("model_configs")  # one JSON file a name of models/names.py's table

__all__ = ["CONFIG_DIR", "register_open_clip_configs", "fused_model_name", "repa_clip_model_names"]


def repa_clip_model_names(include_fused: bool = True) -> list[str]:
    return repa_model_names("open_clip", include_fused)


def register_open_clip_configs() -> None:
    """Make our configs visible to ``open_clip.create_model`` (idempotent)."""
    import open_clip
    from open_clip import factory

    if CONFIG_DIR not in factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(CONFIG_DIR)


def fused_model_name(model_name: str) -> str:
    """OpenCLIP name of the deploy form of ``model_name`` (``RePa-ViT-B-16`` -> ``RePa-ViT-B-16-fused``)."""
    entry = find_repa_name(model_name)
    if entry is None or entry.clip_name != model_name:
        raise ValueError(
            f"{model_name!r} is not a RePa OpenCLIP model; choose one of {repa_clip_model_names(False)}.")
    return repa_variant_name(model_name, fused=True)
