"""Parameter and MAC counts, the way the paper reports them (millions, GMACs)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_params", "count_gmacs"]

aten = torch.ops.aten
# Fused attention kernels: torch's counter knows the CUDA ones; the CPU flash kernel
# (what SDPA runs on CPU) is missing from its registry, so it is mapped here to the
# same formula, making counts identical on CPU and GPU.
_SDPA_OPS = (
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
    aten._scaled_dot_product_flash_attention_for_cpu,
)
# Where SDPA has no fused kernel (e.g. on the meta device) it decomposes into batched
# matmuls; in a ViT those are the attention matmuls (linears run as mm/addmm).
_ATTENTION_MATMUL_OPS = _SDPA_OPS + (aten.bmm, aten.baddbmm)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _no_flops(*args, **kwargs) -> int:
    return 0


def count_params(model: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics are buffers and do not count)."""
    return sum(p.numel() for p in model.parameters())


def count_gmacs(
        model: nn.Module,
        input_size: tuple[int, ...] = (3, 224, 224),
        include_attention: bool = True,
        forward: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
) -> float:
    """Multiply-accumulates (in G) of one forward pass on a single image, by torch's FLOP counter.

    Matmuls and convolutions count one MAC per 2 FLOPs; element-wise ops (norms,
    activations, residual adds) are not counted. ``include_attention`` counts the two
    attention matmuls (q·kᵀ and attn·v): the RePaViT paper's Table 9 (CLIP) includes them,
    its Tables 1 and 8 (supervised, DINO) do not (0.36 G for ViT-S/16, 0.72 G for ViT-B/16).
    """
    if include_attention:
        mapping = {op: _sdpa_flops for op in _SDPA_OPS}
    else:
        mapping = {op: _no_flops for op in _ATTENTION_MATMUL_OPS}
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, dtype=param.dtype, device=param.device)
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    try:
        # Grad stays enabled so nn.MultiheadAttention (OpenCLIP's towers) takes its generic,
        # countable path instead of the opaque inference fast path.
        with torch.enable_grad(), counter:
            forward(model, x) if forward is not None else model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
