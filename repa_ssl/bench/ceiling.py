"""The floor under any exact fused RePa ViT on this machine: its matmuls, attention and GELU alone.

``ceiling_runner`` pushes a fused model's own weights through nothing but the GEMMs (with
``linear`` and ``fc_in`` as one), scaled-dot-product attention and the active channels'
activation: no LayerNorm, biases, residual adds or copies. Every exact implementation of the
fused model does at least this work, so its speed bounds the fused row from above; the gap
between the two is all that layout tuning could still win, and a target above it needs a
different model, not a faster kernel.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import RepaBlock, ReparamChannelIdleMlp

__all__ = ["ceiling_runner"]


def _block_weights(block: nn.Module) -> dict:
    if not (isinstance(block, RepaBlock) and isinstance(block.mlp, ReparamChannelIdleMlp)):
        raise TypeError(f"the ceiling needs fused RePa blocks, got {type(block).__name__}: fuse the model first")
    mlp, attn = block.mlp, block.attn
    mats = [mlp.linear.weight] + ([mlp.fc_in.weight] if mlp.fc_in is not None else [])
    return dict(
        heads=attn.num_heads,
        qkv=attn.qkv.weight.t().contiguous(),
        proj=attn.proj.weight.t().contiguous(),
        ffn_in=torch.cat(mats).t().contiguous(),
        fc_out=mlp.fc_out.weight.t().contiguous() if mlp.fc_out is not None else None,
        act=mlp.act,
    )


@torch.no_grad()
def _block_inputs(vit: nn.Module, model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """What each block of ``vit`` receives when ``model`` runs on ``images``."""
    inputs: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0].flatten(0, 1).clone()))
             for b in vit.blocks]
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def ceiling_runner(model: nn.Module, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A callable doing the irreducible work of ``model`` (a fused timm RePa ViT or OpenCLIP tower) on ``images``."""
    vit = getattr(model, "trunk", model)  # OpenCLIP keeps the timm model of a RePa tower in .trunk
    blocks = [_block_weights(b) for b in vit.blocks]
    # Each block reads the tokens the real model feeds it (recorded once here): chained without norms
    # and residuals, activations would drift into denormals or overflow, which run far slower.
    inputs = _block_inputs(vit, model, images)

    def run() -> torch.Tensor:
        batch = images.shape[0]
        vit.patch_embed(images)
        for w, x in zip(blocks, inputs):
            n, dim = x.shape[0] // batch, x.shape[1]
            q, k, v = torch.mm(x, w["qkv"]).view(batch, n, 3, w["heads"], dim // w["heads"]).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch * n, dim)
            h = torch.mm(torch.mm(a, w["proj"]), w["ffn_in"])
            if w["fc_out"] is not None:
                h = torch.mm(w["act"](h[:, dim:]), w["fc_out"])
        return h
    return run
