"""Fast training forms of the channel-idle FFN and the BatchNorm arithmetic they share.

:class:`~repa_ssl.layers.channel_idle_mlp.ChannelIdleMlp` computes eq. 2 of the paper
(``fc1 -> act(first k) -> norm2 -> fc2``) with plain module calls. The functions here compute
the same function, gradients and BatchNorm running statistics faster, without materialising
the idle channels as one tensor with the active ones:

* :func:`ffn_column_blocks`: active and idle channels as column blocks of fc1 / norm2 / fc2;
* :func:`ffn_idle_as_matrix`: the idle channels as one C x C matrix built from the batch
  statistics (about 2·C² instead of 6·C² MACs per token at θ = 0.75);
* :func:`fast_channel_idle_ffn` picks the cheaper of the two by :func:`idle_matrix_is_cheaper`.

They take the layer's modules and read or update the BatchNorm's buffers exactly as
``nn.BatchNorm1d.forward`` does (``tests/test_channel_idle_kernels.py`` checks this in float64).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "advance_batch_count",
    "batch_norm_blocks",
    "fast_channel_idle_ffn",
    "fast_paths_apply",
    "fold_batchnorm",
    "ffn_column_blocks",
    "ffn_idle_as_matrix",
    "idle_matrix_is_cheaper",
]


def fold_batchnorm(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift`` (float64), from its running statistics."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fuse a BatchNorm without running statistics (track_running_stats=False).")
    mean, var = bn.running_mean.double(), bn.running_var.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale


def advance_batch_count(bn: nn.BatchNorm1d) -> float:
    """Count this batch in ``bn.num_batches_tracked`` (in training) and return the momentum it gets.

    The same side effect and momentum as ``nn.BatchNorm1d.forward``; call it once per forward.
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return momentum


def _slice(t: Optional[torch.Tensor], ch: slice) -> Optional[torch.Tensor]:
    return None if t is None else t[ch]


def batch_norm_blocks(bn: nn.BatchNorm1d, blocks: list[torch.Tensor], channels: list[slice],
                      momentum: float) -> list[torch.Tensor]:
    """``bn`` applied to a tensor given as column blocks, each normalised with its channels' slice.

    Mirrors ``nn.BatchNorm1d.forward`` (running-statistics update, eval mode) with the ``momentum``
    of :func:`advance_batch_count`; the running statistics are updated in place through views of the
    module's buffers.
    """
    use_batch_stats = bn.training or bn.running_mean is None
    track = not bn.training or bn.track_running_stats
    out = []
    for block, ch in zip(blocks, channels):
        out.append(F.batch_norm(
            block,
            bn.running_mean[ch] if track and bn.running_mean is not None else None,
            bn.running_var[ch] if track and bn.running_var is not None else None,
            _slice(bn.weight, ch),
            _slice(bn.bias, ch),
            use_batch_stats, momentum, bn.eps))
    return out


def idle_matrix_is_cheaper(in_features: int, num_idle: int, num_tokens: int, batch_stats: bool) -> bool:
    """MACs of the idle path as a C x C matrix (built per call) vs as fc1/fc2 column blocks."""
    c = in_features
    stats = 2 if batch_stats else 1  # covariance + variance
    as_matrix = stats * (c * c * num_idle + num_tokens * c * c)
    return as_matrix < 2 * num_tokens * c * num_idle


def fast_paths_apply(tokens: torch.Tensor, norm2: nn.Module, num_active: int) -> bool:
    """Whether :func:`fast_channel_idle_ffn` can stand in for the module calls on ``tokens``.

    Only in eager mode (and under ``torch.compile``): graph capture for deployment (FX, ``torch.jit.trace``,
    ``torch.export``) records the plain module calls, which have no shape-dependent branch. Only with
    active and idle channels both present, and with a plain ``nn.BatchNorm1d`` (not, e.g., SyncBatchNorm).
    """
    if isinstance(tokens, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_exporting():
        return False
    return type(norm2) is nn.BatchNorm1d and 0 < num_active < norm2.num_features


def fast_channel_idle_ffn(tokens: torch.Tensor, fc1: nn.Linear, act: nn.Module, norm2: nn.BatchNorm1d,
                          fc2: nn.Linear, num_active: int) -> torch.Tensor:
    """``fc2(norm2(concat(act(h[:, :k]), h[:, k:])))`` with ``h = fc1(tokens)``, by the cheaper fast form."""
    batch_stats = norm2.training or norm2.running_mean is None
    if idle_matrix_is_cheaper(fc1.in_features, fc1.out_features - num_active, tokens.shape[0], batch_stats):
        return ffn_idle_as_matrix(tokens, fc1, act, norm2, fc2, num_active)
    return ffn_column_blocks(tokens, fc1, act, norm2, fc2, num_active)


def ffn_idle_as_matrix(tokens: torch.Tensor, fc1: nn.Linear, act: nn.Module, norm2: nn.BatchNorm1d,
                       fc2: nn.Linear, k: int) -> torch.Tensor:
    """fc1 -> act(first k) -> norm2 -> fc2 with the idle channels never materialised.

    The idle channels are linear in ``tokens`` until ``norm2``, and BatchNorm's batch statistics
    of a linear map are linear maps of the tokens' own statistics: mean ``W x̄ + b`` and variance
    ``diag(W Σ Wᵀ)``, with Σ the tokens' C x C covariance. So, in training as in eval, the
    idle path is one C x C matrix ``A = W2_idle diag(s) W1_idle`` (eq. 5 of the paper, here with
    batch statistics) applied to the centred tokens: about 2·C² MACs per token instead of 6·C²
    at θ = 0.75, forwards and backwards, with the same function, gradients and running statistics.
    Only the active channels go through fc1, the activation and norm2 as tensors.
    """
    bn, w1, b1, w2 = norm2, fc1.weight, fc1.bias, fc2.weight
    idle = slice(k, None)
    w_idle, b_idle = w1[idle], _slice(b1, idle)
    momentum = advance_batch_count(bn)
    use_batch_stats = bn.training or bn.running_mean is None
    if use_batch_stats:
        dtype = torch.promote_types(tokens.dtype, torch.float32)  # at least fp32, as BatchNorm under autocast
        with torch.autocast(tokens.device.type, enabled=False):
            x, w = tokens.to(dtype), w_idle.to(dtype)
            centred = x - x.mean(0)
            var = ((w @ (centred.t() @ centred / x.shape[0])) * w).sum(1).clamp_min(0)
            mean = w @ x.mean(0) + (0 if b_idle is None else b_idle.to(dtype))
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            # Through .data, as BatchNorm's kernel does: the buffers are saved for backward by the
            # active block's batch_norm (this call's and those of earlier calls, e.g. DINO's crops).
            n = x.shape[0]
            bn.running_mean.data[idle].lerp_(mean.detach().to(bn.running_mean.dtype), momentum)
            bn.running_var.data[idle].lerp_((var.detach() * n / max(n - 1, 1)).to(bn.running_var.dtype), momentum)
        x_in, shift = centred.to(tokens.dtype), torch.zeros_like(var)  # (z - mean) = W_idle (x - x̄)
    else:
        var, x_in = bn.running_var[idle], tokens
        shift = (0 if b_idle is None else b_idle) - bn.running_mean[idle]  # (z - mean) = W_idle x + b - mean
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight[idle]
    w2_idle = w2[:, idle]
    offset = shift * scale + (0 if bn.bias is None else bn.bias[idle])
    bias = w2_idle @ offset.to(w2.dtype) + (0 if fc2.bias is None else fc2.bias)
    y = torch.addmm(bias, x_in, ((w2_idle * scale.to(w2.dtype)) @ w_idle).t())

    active = act(F.linear(tokens, w1[:k], _slice(b1, slice(0, k))))
    (active,) = batch_norm_blocks(bn, [active], [slice(0, k)], momentum)
    return torch.addmm(y, active, w2[:, :k].t())


def ffn_column_blocks(tokens: torch.Tensor, fc1: nn.Linear, act: nn.Module, norm2: nn.BatchNorm1d,
                      fc2: nn.Linear, k: int) -> torch.Tensor:
    """Active and idle channels as two column blocks, never concatenated.

    Same function as fc1 -> act(first k) -> norm2 -> fc2, but slicing fc1's rows, norm2's
    channels and fc2's columns instead of the activations: no copy of the (tokens, hidden)
    tensor forwards and no zero-filled slice gradients backwards. Used where the batch is too
    small (or θ too low) for :func:`ffn_idle_as_matrix` to pay off.
    """
    w1, b1, w2 = fc1.weight, fc1.bias, fc2.weight
    active = act(F.linear(tokens, w1[:k], _slice(b1, slice(0, k))))
    idle = F.linear(tokens, w1[k:], _slice(b1, slice(k, None)))
    active, idle = batch_norm_blocks(norm2, [active, idle], [slice(0, k), slice(k, None)],
                                     advance_batch_count(norm2))
    return torch.addmm(F.linear(idle, w2[:, k:], fc2.bias), active, w2[:, :k].t())
