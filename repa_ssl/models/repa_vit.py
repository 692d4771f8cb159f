"""RePaViT: vision transformers with channel-idle, structurally reparameterizable FFNs.

`RePaViT: Scalable Vision Transformer Acceleration via Structural Reparameterization on
Feedforward Network Layers` (ICML 2025).

One family, timm style: the model is timm's ``VisionTransformer`` with ``RepaBlock``
blocks, so pooling, heads, ``forward_intermediates``, gradient checkpointing and the
feature API are timm's own. ``inference_mode=True`` builds the fused (deploy) form
directly; ``timm.utils.reparameterize_model`` turns a train-form model into it.

Model names:
  * ``repa_vit_{tiny,small,base,large}_patch16_224``, ``repa_vit_huge_patch14_224``:
    the authors' layout (pre-norm, LayerNorm eps 1e-5 in attention, 1e-6 elsewhere),
    so their released supervised checkpoints load through ``checkpoint_filter_fn``.
    ``repa_vit_huge_patch16_224`` is the paper's "RePa-ViT-Huge" (its numbers are patch 16).
  * ``repa_vit_{base_patch16,base_patch32,large_patch14}_clip_224``: OpenCLIP-style
    image towers (pre-norm, LayerNorm eps 1e-5, no patch-embed bias, token pooling);
    suffix ``_idle50`` for θ = 0.5, ``_fused`` for the deploy form, ``_merged2`` for the deploy form of
    the depth-reparameterized tower (``depth_branches=2``: depth / 2 layers) (OpenCLIP's timm
    adapter passes no extra kwargs, so each variant needs its own name). Those names are
    registered from the table in ``names.py``, which also says which names are RePa models.
  * ``test_repa_vit``, ``test_repa_vit_clip[_fused]``: tiny models for tests.
  * ``demo_repa_vit``, ``demo_repa_vit_clip[_fused]``: small 32 px models for the CPU demo
    (``python -m demo``), average-pooled: at initialisation a tiny ViT's class token is almost
    the same for every image, and DINO / CLIP then sit at their uniform-output saddle for long.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Dict, Literal, Optional

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import LayerNorm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter_fn

from ..depth import branch_model, branch_state_dict
from ..layers import ChannelIdleMlp, RepaBlock, resolve_idle_ratios
from ..layers.branch_group import merged_repa_block
from ..layers.idle_ratio import IdleRatio
from .names import DEFAULT_IDLE_RATIO, REPA_NAMES, RepaName

__all__ = ["RepaVisionTransformer", "checkpoint_filter_fn", "TEST_VIT_ARGS", "DEMO_VIT_ARGS"]


class RepaVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose blocks carry channel-idle FFNs.

    Args (beyond timm's ``VisionTransformer``):
        idle_ratio: θ, the fraction of FFN hidden channels left without activation: a
            float in [0, 1] or one value per block.
        idle_schedule: ``'uniform'`` (θ everywhere) or ``'linear'``, the authors' per-layer
            heuristic around θ (last block fully active).
        inference_mode: build the fused deploy form directly (load fused checkpoints
            without building the train form).
        attn_norm_layer: norm before attention if it differs from ``norm_layer`` (the
            authors' layout uses eps 1e-5 there and 1e-6 for the pre/final norms).
        depth_branches: K > 1 builds the depth-reparameterized forms (``repa_ssl.depth``): the train
            form groups the ``depth`` blocks into ``depth / K`` branch groups at join s = 1, i.e. the
            deep model itself, so training from scratch runs the same join schedule as converting a
            trained deep model; with ``inference_mode`` the ``depth / K`` merged, fused blocks
            (``idle_ratio`` stays the deep model's, one value per original layer).
    """

    def __init__(
            self,
            idle_ratio: IdleRatio = DEFAULT_IDLE_RATIO,
            idle_schedule: Literal["uniform", "linear"] = "uniform",
            inference_mode: bool = False,
            attn_norm_layer: Optional[type[nn.Module]] = None,
            depth: int = 12,
            block_fn: type[nn.Module] = RepaBlock,
            mlp_layer: type[nn.Module] = ChannelIdleMlp,
            depth_branches: int = 1,
            **kwargs: Any,
    ) -> None:
        idle_ratios = resolve_idle_ratios(idle_ratio, depth, idle_schedule)
        if depth_branches < 1 or depth % depth_branches:
            raise ValueError(f"depth_branches={depth_branches} must divide the depth {depth}")
        merged = inference_mode and depth_branches > 1
        block_args = dict(idle_ratios=idle_ratios, attn_norm_layer=attn_norm_layer)
        super().__init__(
            depth=depth // depth_branches if merged else depth,
            block_fn=partial(merged_repa_block, branches=depth_branches, **block_args) if merged
            else partial(block_fn, inference_mode=inference_mode, **block_args),
            mlp_layer=mlp_layer,
            **kwargs,
        )
        if depth_branches > 1 and not inference_mode:
            branch_model(self, depth_branches)
        self.idle_ratios = idle_ratios
        self.inference_mode = inference_mode
        self.depth_branches = depth_branches


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: RepaVisionTransformer) -> Dict[str, torch.Tensor]:
    """Map foreign checkpoints onto ``RepaVisionTransformer``.

    Handles the RePaViT authors' released checkpoints (attention LayerNorm stored as
    ``blocks.i.attn.norm``; ours is timm's ``blocks.i.norm1``; the FFN keys already match),
    then defers to timm's ViT filter (position-embedding resampling, wrappers). A deep checkpoint
    loads into the branch form (``depth_branches=K``) at s = 1.
    """
    state_dict = state_dict.get("model", state_dict)
    state_dict = state_dict.get("state_dict", state_dict)
    authors_attn_norm = re.compile(r"^blocks\.(\d+)\.attn\.norm\.")
    out = {authors_attn_norm.sub(r"blocks.\1.norm1.", k): v for k, v in state_dict.items()}
    out = _vit_checkpoint_filter_fn(out, model)
    if model.depth_branches > 1 and not model.inference_mode:
        out = branch_state_dict(out, model.depth_branches)
    return out


def _create_repa_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> RepaVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        RepaVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


_AUTHORS_IN1K = dict(
    # The authors publish their weights outside any hub timm can reach offline: load a
    # downloaded file with pretrained_cfg_overlay=dict(file='RePaViT_Small.pth').
    paper_name="RePaViT (ICML 2025)",
    notes=("RePaViT authors' supervised ImageNet-1k weights, theta=0.75, train form",),
)
_CLIP_TOWER = dict(num_classes=0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_pct=1.0)

_entrypoint_cfgs = {
    "repa_vit_tiny_patch16_224.in1k": _cfg(**_AUTHORS_IN1K),
    "repa_vit_small_patch16_224.in1k": _cfg(**_AUTHORS_IN1K),
    "repa_vit_base_patch16_224.in1k": _cfg(**_AUTHORS_IN1K),
    "repa_vit_large_patch16_224.in1k": _cfg(**_AUTHORS_IN1K),
    "repa_vit_huge_patch14_224.untrained": _cfg(),
    "repa_vit_huge_patch16_224.untrained": _cfg(),
    "repa_vit_base_patch16_clip_224.untrained": _cfg(**_CLIP_TOWER),
    "repa_vit_base_patch32_clip_224.untrained": _cfg(**_CLIP_TOWER),
    "repa_vit_large_patch14_clip_224.untrained": _cfg(**_CLIP_TOWER),
    # Tiny models for tests, CI and the CPU demo (timm's test_vit convention).
    "test_repa_vit.untrained": _cfg(input_size=(3, 64, 64), crop_pct=1.0),
    "test_repa_vit_clip.untrained": _cfg(input_size=(3, 64, 64), **_CLIP_TOWER),
    "demo_repa_vit.untrained": _cfg(input_size=(3, 32, 32), crop_pct=1.0),
    "demo_repa_vit_clip.untrained": _cfg(input_size=(3, 32, 32), **_CLIP_TOWER),
}
default_cfgs = generate_default_cfgs({
    **_entrypoint_cfgs,
    # A name that only fixes θ or the fused form has its family's config.
    **{f"{n.timm_name}.untrained": _entrypoint_cfgs[f"{n.family}.untrained"] for n in REPA_NAMES if n.model_args},
})

# The tiny test and CPU-demo models; the benchmarks build their vanilla twins from the same arguments.
# Entrypoints unpack them with ``**``, so an argument set here and beside them is an error, not an override.
TEST_VIT_ARGS = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2)
DEMO_VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3, global_pool="avg")


@register_model
def repa_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """RePa-ViT-Tiny/16 (RePa-DeiT-Tiny), θ = 0.75 by default."""
    model_args = dict(
        patch_size=16, embed_dim=192, depth=12, num_heads=3, pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-6), attn_norm_layer=partial(LayerNorm, eps=1e-5))
    return _create_repa_vit("repa_vit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def repa_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """RePa-ViT-Small/16 (RePa-DeiT-Small), θ = 0.75 by default."""
    model_args = dict(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-6), attn_norm_layer=partial(LayerNorm, eps=1e-5))
    return _create_repa_vit("repa_vit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def repa_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """RePa-ViT-Base/16 (RePa-DeiT-Base), θ = 0.75 by default."""
    model_args = dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-6), attn_norm_layer=partial(LayerNorm, eps=1e-5))
    return _create_repa_vit("repa_vit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def repa_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """RePa-ViT-Large/16, θ = 0.75 by default."""
    model_args = dict(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16, pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-6), attn_norm_layer=partial(LayerNorm, eps=1e-5))
    return _create_repa_vit("repa_vit_large_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def repa_vit_huge_patch14_224(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """RePa-ViT-Huge/14, θ = 0.75 by default."""
    model_args = dict(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16, pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-6), attn_norm_layer=partial(LayerNorm, eps=1e-5))
    return _create_repa_vit("repa_vit_huge_patch14_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def repa_vit_huge_patch16_224(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """RePa-ViT-Huge/16, θ = 0.75 by default: the paper's "RePa-ViT-Huge" (369.9 M / 72.6 GMACs fused)."""
    model_args = dict(
        patch_size=16, embed_dim=1280, depth=32, num_heads=16, pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-6), attn_norm_layer=partial(LayerNorm, eps=1e-5))
    return _create_repa_vit("repa_vit_huge_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def repa_vit_base_patch16_clip_224(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """RePa CLIP image tower ViT-B/16, θ = 0.75 (OpenCLIP ``RePa-ViT-B-16``)."""
    model_args = dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-5), global_pool="token")
    return _create_repa_vit("repa_vit_base_patch16_clip_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def repa_vit_base_patch32_clip_224(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """RePa CLIP image tower ViT-B/32, θ = 0.75 (OpenCLIP ``RePa-ViT-B-32``)."""
    model_args = dict(
        patch_size=32, embed_dim=768, depth=12, num_heads=12, pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-5), global_pool="token")
    return _create_repa_vit("repa_vit_base_patch32_clip_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def repa_vit_large_patch14_clip_224(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """RePa CLIP image tower ViT-L/14, θ = 0.75 (OpenCLIP ``RePa-ViT-L-14``)."""
    model_args = dict(
        patch_size=14, embed_dim=1024, depth=24, num_heads=16, pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-5), global_pool="token")
    return _create_repa_vit("repa_vit_large_patch14_clip_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_repa_vit(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """Tiny RePa ViT (64 px, width 64, 2 blocks) for tests and CPU demos, the authors' layout."""
    model_args = dict(
        **TEST_VIT_ARGS, pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-6), attn_norm_layer=partial(LayerNorm, eps=1e-5))
    return _create_repa_vit("test_repa_vit", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_repa_vit_clip(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """Tiny RePa CLIP image tower (OpenCLIP ``RePa-ViT-Test``) for tests and CPU demos."""
    model_args = dict(**TEST_VIT_ARGS, pre_norm=True, norm_layer=partial(LayerNorm, eps=1e-5), global_pool="token")
    return _create_repa_vit("test_repa_vit_clip", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def demo_repa_vit(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """Small RePa ViT (32 px, patch 8, width 96, 4 blocks, average pooling) for the CPU demo."""
    model_args = dict(
        **DEMO_VIT_ARGS, pre_norm=True,
        norm_layer=partial(LayerNorm, eps=1e-6), attn_norm_layer=partial(LayerNorm, eps=1e-5))
    return _create_repa_vit("demo_repa_vit", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def demo_repa_vit_clip(pretrained: bool = False, **kwargs) -> RepaVisionTransformer:
    """Small RePa CLIP image tower (OpenCLIP ``RePa-ViT-Demo``) for the CPU demo, average-pooled."""
    model_args = dict(**DEMO_VIT_ARGS, pre_norm=True, norm_layer=partial(LayerNorm, eps=1e-5))
    return _create_repa_vit("demo_repa_vit_clip", pretrained=pretrained, **dict(model_args, **kwargs))


def _register_variant(name: RepaName) -> None:
    """Register ``name.timm_name``: its family's entrypoint with the θ / fused form the name fixes."""
    family = globals()[name.family]

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> RepaVisionTransformer:
        # The name's own pretrained config (a tag such as '.untrained' refers to it), not the family's.
        kwargs["pretrained_cfg"] = resolve_pretrained_cfg(
            name.timm_name, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None))
        return family(pretrained=pretrained, **dict(name.model_args, **kwargs))

    form = "fused (deploy)" if name.fused else "train"
    clip = f" (OpenCLIP ``{name.clip_name}``)" if name.clip_name else ""
    entrypoint.__name__ = entrypoint.__qualname__ = name.timm_name
    entrypoint.__doc__ = f"``{name.family}`` at θ = {name.idle_ratio}, {form} form{clip}."
    globals()[name.timm_name] = register_model(entrypoint)


# OpenCLIP's TimmModel passes no kwargs: each θ and fused form of a CLIP tower is registered as a name.
for _name in REPA_NAMES:
    if _name.model_args:
        _register_variant(_name)
