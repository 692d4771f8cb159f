"""The channel-idle FFN of RePaViT (paper, eq. 2) and its fused deploy form (eq. 3-6).

Both modules own the FFN's normalisation and its residual connection, so a block
calls ``x = mlp(x)``: after fusion the identity shortcut lives inside the deploy
module's C x C linear and costs nothing.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath

from .idle_ratio import num_active_channels

_logger = logging.getLogger(__name__)

__all__ = ["ChannelIdleMlp", "ReparamChannelIdleMlp", "StateDictFormError"]


class StateDictFormError(RuntimeError):
    """A train-form state dict was given to a fused model, or the other way round."""


def _fold_batchnorm(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift`` (float64), from its running statistics."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fuse a BatchNorm without running statistics (track_running_stats=False).")
    mean, var = bn.running_mean.double(), bn.running_var.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale


def _bn_momentum(bn: nn.BatchNorm1d) -> float:
    """The momentum ``nn.BatchNorm1d.forward`` would use now, counting this batch (mirrors its logic)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return momentum


def _recomputing() -> bool:
    """True while autograd's backward re-runs a forward: gradient checkpointing's recomputation.

    The engine has a current graph task only while it runs a backward (torch's own FSDP2 and
    ``ModuleTracker.is_bw`` test it the same way; there is no public name for it). Compiled graphs
    recompute without re-running Python, so under ``torch.compile`` this is never true.
    """
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _running_stats_discarded(*norms: nn.Module) -> Iterator[None]:
    """BatchNorms update throwaway copies of their running statistics (and batch count).

    Normalisation is unchanged (batch statistics in training) and the same tensors are saved for
    backward as in the first forward, which non-reentrant checkpointing checks; only the update is
    thrown away. Any BatchNorm type and every path of :class:`ChannelIdleMlp` read the buffers by name.
    """
    saved = [{name: getattr(norm, name) for name in _RUNNING_STATS} for norm in norms]
    for norm, buffers in zip(norms, saved):
        for name, buf in buffers.items():
            if buf is not None:
                setattr(norm, name, buf.clone())
    try:
        yield
    finally:
        for norm, buffers in zip(norms, saved):
            for name, buf in buffers.items():
                setattr(norm, name, buf)


def _slice(t: Optional[torch.Tensor], ch: slice) -> Optional[torch.Tensor]:
    return None if t is None else t[ch]


def _batch_norm_blocks(bn: nn.BatchNorm1d, blocks: list[torch.Tensor], channels: list[slice],
                       momentum: float) -> list[torch.Tensor]:
    """``bn`` applied to a tensor given as column blocks, each normalised with its channels' slice.

    Mirrors ``nn.BatchNorm1d.forward`` (running-statistics update, eval mode) with the ``momentum``
    of :func:`_bn_momentum`; the running statistics are updated in place through views of the
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
            None if bn.weight is None else bn.weight[ch],
            None if bn.bias is None else bn.bias[ch],
            use_batch_stats, momentum, bn.eps))
    return out


class ChannelIdleMlp(nn.Module):
    """Train form: ``x + drop_path(fc2(BN(act_first_k(fc1(BN(x))))))``.

    The BatchNorms normalise the ``(B*N, C)`` view of the tokens (no transposes). Only the
    first ``num_active = ceil(hidden * (1 - idle_ratio))`` hidden channels go through the
    activation; the others are idle and pass through, forming the linear path that
    :meth:`fuse` folds away.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            idle_ratio: float = 0.75,
            act_layer: Type[nn.Module] = nn.GELU,
            bias: bool = True,
            drop_path: float = 0.0,
            bn_eps: float = 1e-5,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden_features = hidden_features or 4 * in_features
        self.idle_ratio = float(idle_ratio)
        self.num_active = num_active_channels(hidden_features, idle_ratio)
        self.norm1 = nn.BatchNorm1d(in_features, eps=bn_eps, **dd)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.act = act_layer()
        self.norm2 = nn.BatchNorm1d(hidden_features, eps=bn_eps, **dd)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _recomputing():
            # Gradient checkpointing re-runs this forward in backward: same batch statistics, but the
            # running statistics (what fuse() folds) must count each training step once, not twice.
            with _running_stats_discarded(self.norm1, self.norm2):
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm1(x.reshape(-1, x.shape[-1]))
        k, hidden = self.num_active, self.fc1.out_features
        if 0 < k < hidden and type(self.norm2) is nn.BatchNorm1d:
            cheaper = self._idle_matrix_is_cheaper(tokens.shape[0], k)
            y = self._forward_idle_as_matrix(tokens, k) if cheaper else self._forward_split(tokens, k)
        else:  # all active, all idle, or a converted norm (e.g. SyncBatchNorm): plain module calls
            h = self.fc1(tokens)
            if k == hidden:
                h = self.act(h)
            elif k > 0:
                h = torch.cat([self.act(h[:, :k]), h[:, k:]], dim=1)
            y = self.fc2(self.norm2(h))
        return x + self.drop_path(y.view(x.shape))

    def _forward_idle_as_matrix(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """fc1 -> act(first k) -> norm2 -> fc2 with the idle channels never materialised.

        The idle channels are linear in ``tokens`` until ``norm2``, and BatchNorm's batch statistics
        of a linear map are linear maps of the tokens' own statistics: mean ``W x̄ + b`` and variance
        ``diag(W Σ Wᵀ)``, with Σ the tokens' C x C covariance. So, in training as in eval, the
        idle path is one C x C matrix ``A = W2_idle diag(s) W1_idle`` (eq. 5 of the paper, here with
        batch statistics) applied to the centred tokens: about 2·C² MACs per token instead of 6·C²
        at θ = 0.75, forwards and backwards, with the same function, gradients and running statistics.
        Only the active channels go through fc1, GELU and norm2 as tensors.
        """
        bn, w1, b1, w2 = self.norm2, self.fc1.weight, self.fc1.bias, self.fc2.weight
        idle = slice(k, None)
        w_idle, b_idle = w1[idle], _slice(b1, idle)
        momentum = _bn_momentum(bn)
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
        bias = w2_idle @ offset.to(w2.dtype) + (0 if self.fc2.bias is None else self.fc2.bias)
        y = torch.addmm(bias, x_in, ((w2_idle * scale.to(w2.dtype)) @ w_idle).t())

        active = self.act(F.linear(tokens, w1[:k], _slice(b1, slice(0, k))))
        (active,) = _batch_norm_blocks(bn, [active], [slice(0, k)], momentum)
        return torch.addmm(y, active, w2[:, :k].t())

    def _idle_matrix_is_cheaper(self, num_tokens: int, k: int) -> bool:
        """MACs of the idle path as a C x C matrix (built per call) vs as fc1/fc2 column blocks."""
        c, idle = self.fc1.in_features, self.fc1.out_features - k
        stats = 2 if (self.norm2.training or self.norm2.running_mean is None) else 1  # covariance + variance
        as_matrix = stats * (c * c * idle + num_tokens * c * c)
        return as_matrix < 2 * num_tokens * c * idle

    def _forward_split(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Active and idle channels as two column blocks, never concatenated.

        Same function as fc1 -> act(first k) -> norm2 -> fc2, but slicing fc1's rows, norm2's
        channels and fc2's columns instead of the activations: no copy of the (tokens, hidden)
        tensor forwards and no zero-filled slice gradients backwards. Used where the batch is too
        small (or θ too low) for :meth:`_forward_idle_as_matrix` to pay off.
        """
        w1, b1, w2 = self.fc1.weight, self.fc1.bias, self.fc2.weight
        active = self.act(F.linear(tokens, w1[:k], _slice(b1, slice(0, k))))
        idle = F.linear(tokens, w1[k:], _slice(b1, slice(k, None)))
        active, idle = _batch_norm_blocks(self.norm2, [active, idle], [slice(0, k), slice(k, None)],
                                          _bn_momentum(self.norm2))
        return torch.addmm(F.linear(idle, w2[:, k:], self.fc2.bias), active, w2[:, :k].t())

    @torch.no_grad()
    def fuse(self) -> "ReparamChannelIdleMlp":
        """Fold both BatchNorms, both biases, the linear path and the residual (eq. 3-6).

        Fusion uses the BatchNorms' running statistics, i.e. it reproduces this module's
        eval-mode output. Folding is done in float64 and cast back.
        """
        if self.training:
            _logger.warning(
                "Fusing a channel-idle FFN that is in training mode: the fused module reproduces its "
                "EVAL-mode output (BatchNorm running statistics), not the batch statistics training uses. "
                "Call model.eval() first to silence this; repa_ssl.fuse_model() does it for you."
            )
        scale1, shift1 = _fold_batchnorm(self.norm1)
        scale2, shift2 = _fold_batchnorm(self.norm2)
        w1, w2 = self.fc1.weight.double(), self.fc2.weight.double()
        b1 = self.fc1.bias.double() if self.fc1.bias is not None else torch.zeros(w1.shape[0], dtype=w1.dtype)
        b2 = self.fc2.bias.double() if self.fc2.bias is not None else torch.zeros(w2.shape[0], dtype=w2.dtype)
        # eq. 3: fc1(BN1(x)) = x (w1 * scale1)^T + (b1 + w1 shift1), likewise for fc2(BN2(.)).
        w_in, b_in = w1 * scale1, b1 + w1 @ shift1
        w_out, b_out = w2 * scale2, b2 + w2 @ shift2
        k = self.num_active
        # eq. 5: idle channels are linear, so they collapse with the identity into one C x C map.
        eye = torch.eye(w1.shape[1], dtype=torch.float64, device=w1.device)
        w_lin = eye + w_out[:, k:] @ w_in[k:]
        b_lin = b_out + w_out[:, k:] @ b_in[k:]

        ref = self.fc1.weight
        fused = ReparamChannelIdleMlp(
            w1.shape[1], k, act_layer=type(self.act), device=ref.device, dtype=ref.dtype)
        fused.linear.weight.copy_(w_lin)
        fused.linear.bias.copy_(b_lin)
        if k > 0:
            fused.fc_in.weight.copy_(w_in[:k])
            fused.fc_in.bias.copy_(b_in[:k])
            fused.fc_out.weight.copy_(w_out[:, :k])
        return fused.train(self.training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if f"{prefix}fc1.weight" not in state_dict and f"{prefix}linear.weight" in state_dict:
            raise StateDictFormError(
                f"'{prefix}linear.weight' is a FUSED (deploy-form) FFN weight, but this model is in the "
                "train form. Build the model with inference_mode=True (e.g. timm.create_model(name, "
                "inference_mode=True), or the '-fused' OpenCLIP config) to load a fused checkpoint."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ReparamChannelIdleMlp(nn.Module):
    """Deploy form (eq. 6): ``linear(x) + fc_out(act(fc_in(x)))``.

    ``linear`` holds the idle channels' path, both BatchNorms, both biases and the
    identity shortcut; ``fc_in``/``fc_out`` the active channels. With ``num_active = 0``
    (idle ratio 1) the FFN is a single C x C linear.
    """

    def __init__(
            self,
            in_features: int,
            num_active: int,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_active = num_active
        self.linear = nn.Linear(in_features, in_features, **dd)
        if num_active > 0:
            self.fc_in = nn.Linear(in_features, num_active, **dd)
            self.act = act_layer()
            self.fc_out = nn.Linear(num_active, in_features, bias=False, **dd)
        else:
            self.fc_in = self.act = self.fc_out = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.fc_in is None:
            return y
        h = self.act(self.fc_in(x))
        w_out = self.fc_out.weight
        if type(self.fc_out) is nn.Linear and y.is_contiguous() and y.dtype == h.dtype == w_out.dtype:
            # Accumulate the active path into the linear path's fresh output: one GEMM with beta=1
            # instead of a GEMM plus an elementwise add over all tokens (3-5 % of the fused block on CPU).
            # Skipped for swapped layers (quantised, LoRA) and mixed dtypes (autocast), which need the call.
            return y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), w_out.t()).view(y.shape)
        return y + self.fc_out(h)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if f"{prefix}linear.weight" not in state_dict and f"{prefix}fc1.weight" in state_dict:
            raise StateDictFormError(
                f"'{prefix}fc1.weight' is a TRAIN-form FFN weight, but this model is fused "
                "(inference_mode=True). Build the train form (inference_mode=False) to load it, then fuse it "
                "with repa_ssl.fuse_model() or timm.utils.reparameterize_model()."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
