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

With a :class:`SyncChannelIdleBatchNorm` (``repa_ssl.convert_sync_batchnorm`` puts them in) the batch
statistics span every process of its group, on both paths: each block's shifted token sums
(:func:`global_batch_stats`) go through one differentiable all-reduce per BatchNorm and call, as many
elements as torch's ``SyncBatchNorm`` sends for the same channels (``tests/test_sync_batchnorm.py``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SyncChannelIdleBatchNorm",
    "advance_batch_count",
    "all_reduce_batch_sums",
    "batch_moments",
    "batch_norm_blocks",
    "capturing_graph",
    "fast_channel_idle_ffn",
    "fast_paths_apply",
    "fold_batchnorm",
    "ffn_column_blocks",
    "ffn_idle_as_matrix",
    "global_batch_stats",
    "idle_matrix_is_cheaper",
    "sync_group",
    "update_running_stats",
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
    module's buffers. A synchronised ``bn`` in training takes its statistics over its process group.
    """
    group = sync_group(bn)
    if group is not None:
        dtype = _stats_dtype(blocks[0])
        with torch.autocast(blocks[0].device.type, enabled=False):
            zs = [block.to(dtype) for block in blocks]
            shifts = [_stats_shift(bn, ch, dtype) for ch in channels]
            sums = [_shifted_sums(z, shift) for z, shift in zip(zs, shifts)]
            stats, _ = global_batch_stats(bn, sums, shifts, channels, blocks[0].shape[0], momentum, group)
            return [_normalise(bn, z, mean, var, ch) for z, (mean, var), ch in zip(zs, stats, channels)]
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


class SyncChannelIdleBatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over ``(tokens, channels)`` whose training statistics span ``process_group``.

    What ``nn.SyncBatchNorm`` is to BatchNorm, for the channel-idle FFN: the fast paths of this module
    recognise it and keep running (the idle channels' statistics are all-reduced as token moments), and it
    runs on gloo (CPU) as on nccl. Same parameters, buffers and state-dict keys as ``nn.BatchNorm1d``;
    outside training, or in a single process, it is one. Made by ``repa_ssl.convert_sync_batchnorm``, also
    for other BatchNorm1d layers on CPU, where torch's ``SyncBatchNorm`` cannot run.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Optional[Any] = None, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if sync_group(self) is None:
            return super().forward(x)
        self._check_input_dim(x)
        if x.dim() == 3:  # (N, C, L): the N * L positions are the samples, as in BatchNorm1d
            n, c, length = x.shape
            return self.forward(x.transpose(1, 2).reshape(-1, c)).reshape(n, length, c).transpose(1, 2)
        (out,) = batch_norm_blocks(self, [x], [slice(None)], advance_batch_count(self))
        return out

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm1d, process_group: Optional[Any] = None) -> "SyncChannelIdleBatchNorm":
        """``bn`` synchronised: the same parameter and buffer tensors (shared, as in torch's conversion)."""
        sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group,
                   device="meta")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(sync, name, getattr(bn, name))
        return sync.train(bn.training)


def sync_group(bn: nn.Module) -> Optional[Any]:
    """The process group whose batch ``bn`` normalises over, or None where it normalises its own.

    A :class:`SyncChannelIdleBatchNorm` in training, with ``torch.distributed`` initialised and its
    group holding more than one process (as ``nn.SyncBatchNorm`` decides); ``dist.group.WORLD`` for
    the default group.
    """
    if not (isinstance(bn, SyncChannelIdleBatchNorm) and bn.training and dist.is_available()
            and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _AllReduceBatchSums(torch.autograd.Function):
    """Sum of ``values`` and of the token ``count`` over ``group``, in one call; backward all-reduces the
    gradient of the sums (the sum's gradient with respect to each process's term is the total gradient)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, count: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.group = group
        buffer = torch.cat([values, count.to(values.dtype).reshape(1)])
        dist.all_reduce(buffer, group=group)
        total, n = buffer[:-1], buffer[-1:]
        ctx.mark_non_differentiable(n)
        return total, n

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_n: Optional[torch.Tensor]) -> tuple[Any, None, None]:
        grad = grad_total.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


def all_reduce_batch_sums(values: torch.Tensor, count: int, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of ``values``, sum of ``count``) over ``group``: ``values.numel() + 1`` elements forward,
    ``values.numel()`` backward, which is what ``nn.SyncBatchNorm`` sends for ``values.numel() / 2``
    channels (mean, invstd and a count forward; two sums backward)."""
    return _AllReduceBatchSums.apply(values, torch.tensor(count, device=values.device), group)


def _stats_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # at least fp32, as BatchNorm under autocast


def _stats_shift(bn: nn.BatchNorm1d, ch: slice, dtype: torch.dtype) -> torch.Tensor | float:
    """The running mean: moments about it lose no precision to a large mean, and every process holds
    the same one (updated with the same global statistics; DDP also broadcasts rank 0's buffers)."""
    if bn.running_mean is None:
        return 0.0
    return bn.running_mean[ch].detach().to(dtype, copy=True)


def _shifted_sums(z: torch.Tensor, shift: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    d = z - shift
    return d.sum(0), (d * d).sum(0)


def update_running_stats(bn: nn.BatchNorm1d, ch: slice, mean: torch.Tensor, var: torch.Tensor,
                         count: torch.Tensor | float, momentum: float) -> None:
    """Move ``bn``'s running statistics of channels ``ch`` towards a batch's (mean, biased variance) over
    ``count`` tokens, as BatchNorm does in training (variance unbiased); nothing outside training.

    Through ``.data``, as BatchNorm's kernel does: the buffers may be saved for backward elsewhere (the
    active block's ``batch_norm`` of this call and of earlier ones, e.g. DINO's crops).
    """
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return
    bn.running_mean.data[ch].lerp_(mean.detach().to(bn.running_mean.dtype), momentum)
    denominator = (count - 1).clamp_min(1) if isinstance(count, torch.Tensor) else max(count - 1, 1)
    unbiased = var.detach() * count / denominator
    bn.running_var.data[ch].lerp_(unbiased.to(bn.running_var.dtype), momentum)


def global_batch_stats(bn: nn.BatchNorm1d, sums: list[tuple[torch.Tensor, torch.Tensor]],
                       shifts: list[torch.Tensor | float], channels: list[slice], count: int, momentum: float,
                       group: Any) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Batch (mean, biased variance) of each channel block over ``group``, from this process's
    ``(sum(z - shift), sum((z - shift)²))`` over its ``count`` tokens, and the global token count; one
    all-reduce for all blocks.

    Updates ``bn``'s running statistics as ``nn.SyncBatchNorm`` does: the global mean, and the
    variance unbiased over the global token count, with ``momentum``.
    """
    total, n = all_reduce_batch_sums(torch.cat([t for pair in sums for t in pair]), count, group)
    stats, start = [], 0
    for (s1, _), shift, ch in zip(sums, shifts, channels):
        m = s1.numel()
        mean_d, mean_d2 = total[start:start + m] / n, total[start + m:start + 2 * m] / n
        start += 2 * m
        mean, var = shift + mean_d, (mean_d2 - mean_d * mean_d).clamp_min(0)
        update_running_stats(bn, ch, mean, var, n, momentum)
        stats.append((mean, var))
    return stats, n


def batch_moments(bn: nn.BatchNorm1d, local: list[tuple[torch.Tensor, torch.Tensor]], channels: list[slice],
                  count: int, momentum: float) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | float]:
    """Batch (mean, biased variance) of each channel block over ``bn``'s process group (see
    :func:`sync_group`) from this process's ``local`` ones over ``count`` tokens, and the token count;
    running statistics updated as BatchNorm does."""
    group = sync_group(bn)
    if group is None:
        for (mean, var), ch in zip(local, channels):
            update_running_stats(bn, ch, mean, var, count, momentum)
        return local, float(count)
    shifts = [_stats_shift(bn, ch, mean.dtype) for (mean, _), ch in zip(local, channels)]
    sums = [(count * (mean - c), count * (var + (mean - c) ** 2)) for (mean, var), c in zip(local, shifts)]
    return global_batch_stats(bn, sums, shifts, channels, count, momentum, group)


def _normalise(bn: nn.BatchNorm1d, z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
               ch: slice) -> torch.Tensor:
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight[ch].to(z.dtype)
    out = (z - mean) * scale
    return out if bn.bias is None else out + bn.bias[ch].to(z.dtype)


def idle_matrix_is_cheaper(in_features: int, num_idle: int, num_tokens: int, batch_stats: bool) -> bool:
    """MACs of the idle path as a C x C matrix (built per call) vs as fc1/fc2 column blocks."""
    c = in_features
    stats = 2 if batch_stats else 1  # covariance + variance
    as_matrix = stats * (c * c * num_idle + num_tokens * c * c)
    return as_matrix < 2 * num_tokens * c * num_idle


def capturing_graph(x: torch.Tensor) -> bool:
    """True while ``x`` is being recorded for deployment: FX, ``torch.jit.trace`` or ``torch.export``."""
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_exporting()


def fast_paths_apply(tokens: torch.Tensor, norm2: nn.Module, num_active: int) -> bool:
    """Whether :func:`fast_channel_idle_ffn` can stand in for the module calls on ``tokens``.

    Only in eager mode (and under ``torch.compile``): graph capture for deployment (FX, ``torch.jit.trace``,
    ``torch.export``) records the plain module calls, which have no shape-dependent branch. Only with
    active and idle channels both present, and with a plain ``nn.BatchNorm1d`` or a
    :class:`SyncChannelIdleBatchNorm` (not, e.g., torch's SyncBatchNorm).
    """
    if capturing_graph(tokens):
        return False
    return type(norm2) in (nn.BatchNorm1d, SyncChannelIdleBatchNorm) and 0 < num_active < norm2.num_features


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
    Only the active channels go through fc1, the activation and norm2 as tensors. Synchronised, the
    idle channels' statistics come from each process's token mean and covariance (see
    :func:`_synced_idle_and_active`).
    """
    bn, w1, b1, w2 = norm2, fc1.weight, fc1.bias, fc2.weight
    idle = slice(k, None)
    w_idle, b_idle = w1[idle], _slice(b1, idle)
    momentum = advance_batch_count(bn)
    use_batch_stats = bn.training or bn.running_mean is None
    active = act(F.linear(tokens, w1[:k], _slice(b1, slice(0, k))))
    group = sync_group(bn)
    if group is not None:
        mean, var, active = _synced_idle_and_active(tokens, w_idle, b_idle, active, bn, momentum, group)
        x_in, shift = tokens, (0 if b_idle is None else b_idle) - mean  # (z - mean) = W_idle x + b - mean
    elif use_batch_stats:
        dtype = torch.promote_types(tokens.dtype, torch.float32)  # at least fp32, as BatchNorm under autocast
        with torch.autocast(tokens.device.type, enabled=False):
            x, w = tokens.to(dtype), w_idle.to(dtype)
            centred = x - x.mean(0)
            var = ((w @ (centred.t() @ centred / x.shape[0])) * w).sum(1).clamp_min(0)
            mean = w @ x.mean(0) + (0 if b_idle is None else b_idle.to(dtype))
        update_running_stats(bn, idle, mean, var, x.shape[0], momentum)
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
    if group is None:
        (active,) = batch_norm_blocks(bn, [active], [slice(0, k)], momentum)
    return torch.addmm(y, active, w2[:, :k].t())


def _synced_idle_and_active(tokens: torch.Tensor, w_idle: torch.Tensor, b_idle: Optional[torch.Tensor],
                            active: torch.Tensor, bn: nn.BatchNorm1d, momentum: float,
                            group: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (mean, variance) of the idle channels ``z = W_idle x + b`` and the normalised active block.

    Each process sends per idle channel ``sum(z - c)`` and ``sum((z - c)²)`` about the running mean
    ``c``, from its own token mean ``m`` and centred covariance ``Σ`` (``n (W m + b - c)`` and
    ``n (diag(W Σ Wᵀ) + (W m + b - c)²)``: no idle activation is formed, and no large mean cancels),
    with the active channels' sums in the same all-reduce.
    """
    k = active.shape[1]
    idle, first = slice(k, None), slice(0, k)
    dtype = _stats_dtype(tokens)
    with torch.autocast(tokens.device.type, enabled=False):
        x, w, z_active = tokens.to(dtype), w_idle.to(dtype), active.to(dtype)
        n, m = x.shape[0], x.mean(0)
        centred = x - m
        shift_idle, shift_active = _stats_shift(bn, idle, dtype), _stats_shift(bn, first, dtype)
        d = w @ m + (0 if b_idle is None else b_idle.to(dtype)) - shift_idle
        var_local = ((w @ (centred.t() @ centred / n)) * w).sum(1).clamp_min(0)
        ((mean, var), (mean_a, var_a)), _ = global_batch_stats(
            bn, [(n * d, n * (var_local + d * d)), _shifted_sums(z_active, shift_active)],
            [shift_idle, shift_active], [idle, first], n, momentum, group)
        return mean, var, _normalise(bn, z_active, mean_a, var_a, first)


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
