"""Transformer block whose FFN half is channel-idle (train form) or fused (deploy form)."""
from __future__ import annotations

from typing import Optional, Sequence, Type

import torch
from torch import nn
from timm.layers import DropPath, LayerNorm, LayerScale, LayerType
from timm.models.vision_transformer import Attention, _create_attn  # timm is pinned; handles attn_layer names

from .channel_idle_mlp import ChannelIdleMlp, ReparamChannelIdleMlp
from .idle_ratio import num_active_channels

__all__ = ["RepaBlock"]


class RepaBlock(nn.Module):
    """Pre-norm ViT block: ``x = x + attn(LN(x))`` then ``x = mlp(x)``.

    The attention half is timm's (LayerNorm, layer scale, drop path). The FFN half is a
    channel-idle FFN that owns its BatchNorm and residual, so the block adds no shortcut
    of its own around it; ``proj_drop``, ``init_values`` and ``drop_path`` reach it (the fused
    form folds the layer scale and, being an inference form, has no dropout or drop path).
    The signature matches ``timm.models.vision_transformer.Block`` so it plugs into
    ``VisionTransformer(block_fn=...)``; the per-layer idle ratio is picked with the
    ``depth`` (block index) timm passes in.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_attn_norm: bool = False,
            scale_mlp_norm: bool = False,
            proj_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            init_values: Optional[float] = None,
            drop_path: float = 0.0,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = LayerNorm,
            mlp_layer: Type[nn.Module] = ChannelIdleMlp,
            attn_layer: LayerType = Attention,
            depth: int = 0,
            idle_ratios: Sequence[float] = (0.75,),
            inference_mode: bool = False,
            attn_norm_layer: Optional[Type[nn.Module]] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if scale_mlp_norm:
            raise ValueError("scale_mlp_norm is not supported: the channel-idle FFN normalises with BatchNorm.")
        dd = {"device": device, "dtype": dtype}
        self.norm1 = (attn_norm_layer or norm_layer)(dim, **dd)
        self.attn = _create_attn(
            attn_layer,
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            scale_norm=scale_attn_norm,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            depth=depth,
            **dd,
        )
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

        idle_ratio = idle_ratios[depth]
        hidden = int(dim * mlp_ratio)
        if inference_mode:
            self.mlp = ReparamChannelIdleMlp(
                dim, num_active_channels(hidden, idle_ratio), act_layer=act_layer, **dd)
        else:
            self.mlp = mlp_layer(
                in_features=dim,
                hidden_features=hidden,
                idle_ratio=idle_ratio,
                act_layer=act_layer,
                bias=proj_bias,
                drop=proj_drop,
                init_values=init_values,
                drop_path=drop_path,
                **dd,
            )

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return self.mlp(x)
