"""The channel-idle FFN's training step as one autograd function that keeps little for backward.

Autograd through :func:`~.channel_idle_kernels.ffn_idle_as_matrix` keeps, per token, the FFN input,
``norm1``'s output, the centred tokens, and the active channels before and after the activation and
after ``norm2``. All of them but two are cheap functions of the others: :func:`lean_train_ffn` keeps
only the input ``x`` and the active pre-activations ``h`` (plus per-channel statistics and two
weight-sized matrices: the tokens' covariance times fc1's idle rows, and the C x C idle matrix), and
recomputes ``norm1(x)``, ``act(h)`` and ``norm2`` in backward, whose gradients it writes out by hand,
with the idle channels still never materialised (their BatchNorm gradients reduce to C x C matrices,
as their forward does). With a synchronised BatchNorm (``repa_ssl.convert_sync_batchnorm``) each
BatchNorm sends one all-reduce forward and one backward, the elements torch's ``SyncBatchNorm``
sends, and normalises with single fused passes.

It runs where the idle matrix is the cheaper path, in training, in eager float32/float64 without
autocast; elsewhere (evaluation, autocast, ``torch.compile``, which fuses the elementwise work itself)
the layer uses :mod:`.channel_idle_kernels`. ``tests/test_channel_idle_kernels.py`` checks outputs,
gradients and running statistics against eq. 2 in float64, in one process and two.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .channel_idle_kernels import (
    SyncChannelIdleBatchNorm,
    advance_batch_count,
    batch_moments,
    fast_paths_apply,
    idle_matrix_is_cheaper,
    sync_group,
)

__all__ = ["lean_train_ffn", "lean_train_ffn_applies"]

_NORMS = (nn.BatchNorm1d, SyncChannelIdleBatchNorm)


def lean_train_ffn_applies(x: torch.Tensor, norm1: nn.Module, norm2: nn.Module, num_active: int) -> bool:
    """Whether :func:`lean_train_ffn` stands in for ``norm1`` and the FFN on the ``(tokens, C)`` input ``x``: where
    the fast kernels apply (:func:`~.channel_idle_kernels.fast_paths_apply`), in eager training without autocast."""
    if not fast_paths_apply(x, norm2, num_active) or torch.compiler.is_compiling() or _autocasting(x.device.type):
        return False
    return (type(norm1) in _NORMS and norm1.training and norm2.training and x.dtype in (torch.float32, torch.float64)
            and idle_matrix_is_cheaper(x.shape[1], norm2.num_features - num_active, x.shape[0], True))


def _autocasting(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def lean_train_ffn(x: torch.Tensor, norm1: nn.BatchNorm1d, fc1: nn.Linear, act: nn.Module,
                   norm2: nn.BatchNorm1d, fc2: nn.Linear, num_active: int) -> torch.Tensor:
    """``fc2(norm2(concat(act(h[:, :k]), h[:, k:])))`` with ``h = fc1(norm1(x))``, batch statistics in both
    BatchNorms (over their process groups when synchronised) and their running statistics updated."""
    def params(m: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return m.weight, m.bias
    return _LeanTrainFFN.apply(x, *params(norm1), *params(fc1), *params(norm2), *params(fc2),
                               (norm1, fc1, act, norm2, fc2, num_active))


def _local_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of ``(tokens, channels)``: BatchNorm's own CPU/CUDA kernel,
    several times faster than ``torch.var_mean`` over the first dimension."""
    return torch.batch_norm_update_stats(z, None, None, 0.0)


def _grad_sums(grad: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ g, Σ g (z - mean))`` per channel, in one pass of BatchNorm's backward reduction kernel."""
    _, g_centred, g_sum = torch.ops.aten.native_batch_norm_backward(
        grad, z, None, None, None, mean, invstd, True, 0.0, [False, True, True])
    return g_sum, g_centred / invstd


def _all_reduce(t: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    group = sync_group(bn)
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def _affine(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], ch: slice, mean: torch.Tensor,
            invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm (affine ``weight``, ``bias``) of channels ``ch`` as ``z * scale + offset``."""
    scale = invstd if weight is None else invstd * weight[ch]
    offset = -mean * scale
    return scale, offset if bias is None else offset + bias[ch]


def _input_grad(grad: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                invstd: torch.Tensor, sum_grad: torch.Tensor, sum_grad_centred: torch.Tensor,
                count: float) -> torch.Tensor:
    """BatchNorm's input gradient ``scale (g - Σg / N - (z - mean) invstd² Σg(z - mean) / N)`` from the
    (global) sums, as ``z * a + g * scale + b`` in two fused passes."""
    a = -scale * invstd * invstd * sum_grad_centred / count
    b = -scale * sum_grad / count - a * mean
    return torch.addcmul(b, z, a).addcmul_(grad, scale)


class _LeanTrainFFN(torch.autograd.Function):
    """Forward: eq. 2 with the idle path as one C x C matrix. Saved: ``x``, the active pre-activations,
    per-channel statistics, the tokens' mean, ``W_idle Σ`` and the idle matrix. Backward: eq. 2's gradients by hand."""

    @staticmethod
    def forward(ctx, x, w_n1, b_n1, w1, b1, w_n2, b_n2, w2, b2, modules):
        norm1, fc1, act, norm2, fc2, k = modules
        n, idle = x.shape[0], slice(k, None)
        # norm1: batch statistics, then one fused affine pass
        momentum1 = advance_batch_count(norm1)
        [(mean1, var1)], count1 = batch_moments(norm1, [_local_moments(x)], [slice(None)], n, momentum1)
        invstd1 = torch.rsqrt(var1 + norm1.eps)
        scale1, offset1 = _affine(w_n1, b_n1, slice(None), mean1, invstd1)
        t = torch.addcmul(offset1, x, scale1)
        # active channels: fc1 rows, activation; idle channels: statistics from the tokens' covariance
        h = F.linear(t, w1[:k], None if b1 is None else b1[:k])
        a = act(h)
        w_idle, b_idle = w1[idle], (0 if b1 is None else b1[idle])
        t_mean = t.mean(0)
        centred = t - t_mean
        w_cov = w_idle @ (centred.t() @ centred / n)  # W_idle Σ: the idle channels' covariance with the tokens
        del centred
        (stats_a, stats_z), count2 = batch_moments(
            norm2, [_local_moments(a), (w_idle @ t_mean + b_idle, (w_cov * w_idle).sum(1).clamp_min(0))],
            [slice(0, k), idle], n, advance_batch_count(norm2))
        (mean_a, var_a), (mean_z, var_z) = stats_a, stats_z
        invstd_a, invstd_z = torch.rsqrt(var_a + norm2.eps), torch.rsqrt(var_z + norm2.eps)
        scale_a, offset_a = _affine(w_n2, b_n2, slice(0, k), mean_a, invstd_a)
        scale_z, offset_z = _affine(w_n2, b_n2, idle, mean_z, invstd_z)  # norm2(z) = z * scale_z + offset_z
        w2_idle = w2[:, idle]
        # y = norm2(W_idle t + b_idle) W2_idleᵀ + norm2(a) W2_activeᵀ + b2, the first as t Aᵀ + const
        bias = w2_idle @ (b_idle * scale_z + offset_z) + (0 if b2 is None else b2)
        a_mat = (w2_idle * scale_z) @ w_idle
        y = torch.addmm(bias, t, a_mat.t())
        y.addmm_(torch.addcmul(offset_a, a, scale_a), w2[:, :k].t())
        ctx.modules, ctx.counts = modules, (count1, count2)
        # the parameters too: not copied, but autograd then refuses a backward after they change in place
        ctx.save_for_backward(x, h, mean1, invstd1, mean_a, invstd_a, mean_z, invstd_z, t_mean, w_cov, a_mat,
                              w_n1, b_n1, w1, b1, w_n2, b_n2, w2, b2)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        norm1, _, act, norm2, _, k = ctx.modules
        count1, count2 = ctx.counts
        (x, h, mean1, invstd1, mean_a, invstd_a, mean_z, invstd_z, t_mean, w_cov, a_mat,
         w_n1, b_n1, w1, b1, w_n2, b_n2, w2, b2) = ctx.saved_tensors
        n, idle = x.shape[0], slice(k, None)
        w_idle, b_idle, w2_idle, w2_active = w1[idle], (0 if b1 is None else b1[idle]), w2[:, idle], w2[:, :k]
        scale1, offset1 = _affine(w_n1, b_n1, slice(None), mean1, invstd1)
        scale_a, offset_a = _affine(w_n2, b_n2, slice(0, k), mean_a, invstd_a)
        scale_z, offset_z = _affine(w_n2, b_n2, idle, mean_z, invstd_z)
        t = torch.addcmul(offset1, x, scale1)  # recomputed: norm1(x), h's activation and norm2's output
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            a = act(h)
        a_norm = torch.addcmul(offset_a, a.detach(), scale_a)

        g_b2 = gy.sum(0)
        g_w2_active = gy.t() @ a_norm
        del a_norm
        gy_t = gy.t() @ t  # C x C: every idle-path gradient below is a product of it with the weights
        g_a_norm = gy @ w2_active
        # norm2's backward sums, active channels (Σg, Σg(a - mean)) and idle channels from C x C products
        sum_a, sum_a_centred = _grad_sums(g_a_norm, a.detach(), mean_a, invstd_a)
        sum_z = w2_idle.t() @ g_b2
        p = w2_idle.t() @ gy_t  # (idle, C): Σ_n g_norm2(z) tᵀ
        z_offset = b_idle - mean_z
        sum_z_centred = (p * w_idle).sum(1) + sum_z * z_offset
        local2 = torch.cat([sum_a, sum_a_centred, sum_z, sum_z_centred])
        total_a, total_a_centred, total_z, total_z_centred = _all_reduce(local2.clone(), norm2).split(
            [k, k, w_idle.shape[0], w_idle.shape[0]])
        # active: norm2, activation, fc1 rows
        g_a = _input_grad(g_a_norm, a.detach(), scale_a, mean_a, invstd_a, total_a, total_a_centred, count2)
        del g_a_norm
        (g_h,) = torch.autograd.grad(a, h, g_a)
        del g_a, a
        g_w1_active, g_b1_active = g_h.t() @ t, g_h.sum(0)
        g_t = g_h @ w1[:k]
        del g_h
        # idle: g_z = g_norm2(z) scale_z - q (z - mean_z) - scale_z Σg / N, with z = W_idle t + b_idle
        q = scale_z * invstd_z * invstd_z * total_z_centred / count2
        c_z = scale_z * total_z / count2 + q * z_offset
        g_t.addmm_(gy, a_mat).addmm_(t, (w_idle.t() * q) @ w_idle, alpha=-1).sub_(w_idle.t() @ c_z)
        t_sum = n * t_mean
        w_gram = n * (w_cov + torch.outer(w_idle @ t_mean, t_mean))  # W_idle Σ_n t tᵀ
        g_w1_idle = scale_z[:, None] * p - q[:, None] * w_gram - torch.outer(c_z, t_sum)
        g_b1_idle = scale_z * sum_z - n * c_z - q * (w_idle @ t_sum)
        g_w2_idle = (gy_t @ w_idle.t()) * scale_z + torch.outer(g_b2, b_idle * scale_z + offset_z)
        del t
        # norm1
        sum1, sum1_centred = _grad_sums(g_t, x, mean1, invstd1)
        total1, total1_centred = _all_reduce(torch.cat([sum1, sum1_centred]), norm1).split(sum1.shape[0])
        g_x = _input_grad(g_t, x, scale1, mean1, invstd1, total1, total1_centred, count1)

        def bn_grads(bn, sums, centred, invstd):
            return (None if bn.weight is None else centred * invstd), (None if bn.bias is None else sums)
        g_wn2, g_bn2 = bn_grads(norm2, torch.cat([sum_a, sum_z]), torch.cat([sum_a_centred, sum_z_centred]),
                                torch.cat([invstd_a, invstd_z]))
        g_w1 = torch.cat([g_w1_active, g_w1_idle])
        g_b1 = None if b1 is None else torch.cat([g_b1_active, g_b1_idle])
        g_w2 = torch.cat([g_w2_active, g_w2_idle], dim=1)
        return (g_x, *bn_grads(norm1, sum1, sum1_centred, invstd1), g_w1, g_b1, g_wn2, g_bn2, g_w2,
                None if b2 is None else g_b2, None)
