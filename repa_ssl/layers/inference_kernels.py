"""Inference kernels of the deploy-form FFNs: the same arithmetic as the plain forms, with fewer buffers.

A deploy FFN's hidden activations are its largest buffers (a merged 12 -> 3 ViT-Tiny at batch 8: 18.5 MiB a
layer). Applying GELU in place keeps one of them instead of two, which measured 1-3 % faster for whole merged and
fused ViT-Tiny models on a 2-core CPU (docs/performance.md, "Depth"). The plain form runs wherever in place is not
allowed or not wanted: under autograd, TorchScript, tracing, FX, export and ``torch.compile`` (which fuse on their
own).
"""
from __future__ import annotations

import torch
from torch import nn

from .channel_idle_kernels import capturing_graph

__all__ = ["is_eager", "linear_then_activation"]


def is_eager(x: torch.Tensor) -> bool:
    """False while ``x`` flows through TorchScript, a trace, FX, ``torch.export`` or ``torch.compile``."""
    if torch.jit.is_scripting():
        return False
    return not (capturing_graph(x) or torch.compiler.is_compiling())


def linear_then_activation(fc: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(fc(x))``, with the activation computed in ``fc``'s output buffer where that is exact and allowed.

    Only for a plain ``nn.Linear`` (its output is a new tensor nobody else holds) and ``nn.GELU`` (either
    approximation), only in eager mode, and only when autograd does not track the output (GELU's backward needs
    its input); anything else, e.g. a swapped LoRA or quantised layer, runs as it is.
    """
    h = fc(x)
    if not is_eager(h) or h.requires_grad or type(fc) is not nn.Linear or type(act) is not nn.GELU:
        return act(h)
    return torch.ops.aten.gelu_(h, approximate=act.approximate)
