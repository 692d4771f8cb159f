"""The channel-idle FFN of RePaViT (paper, eq. 2) and its fused deploy form (eq. 3-6).

Both modules own the FFN's normalisation and its residual connection, so a block
calls ``x = mlp(x)``: after fusion the identity shortcut lives inside the deploy
module's C x C linear and costs nothing.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Iterator, Optional, Type

import torch
from torch import nn
from timm.layers import DropPath, LayerScale

from .channel_idle_kernels import fast_channel_idle_ffn, fast_paths_apply, fold_batchnorm
from .channel_idle_lean_training import lean_train_ffn, lean_train_ffn_applies
from .idle_ratio import num_active_channels
from .inference_kernels import linear_then_activation

_logger = logging.getLogger(__name__)

__all__ = ["ChannelIdleMlp", "ReparamChannelIdleMlp", "StateDictFormError"]


class StateDictFormError(RuntimeError):
    """A train-form state dict was given to a fused model, or the other way round."""


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


def _discard_running_stats_when_recomputing(forward: Callable) -> Callable:
    """Gradient checkpointing re-runs ``forward`` in backward: same batch statistics, but the running
    statistics (what :meth:`ChannelIdleMlp.fuse` folds) must count each training step once, not twice.

    A scripted module runs the undecorated ``forward`` (TorchScript compiles the wrapped function).
    """
    @functools.wraps(forward)
    def wrapper(self: "ChannelIdleMlp", x: torch.Tensor) -> torch.Tensor:
        if self.training and _recomputing():
            with _running_stats_discarded(self.norm1, self.norm2):
                return forward(self, x)
        return forward(self, x)
    return wrapper


class ChannelIdleMlp(nn.Module):
    """Train form (eq. 2): ``x + drop_path(ls(drop(fc2(BN(act_first_k(fc1(BN(x))))))))``.

    The BatchNorms normalise the ``(B*N, C)`` view of the tokens (no transposes). Only the
    first ``num_active = ceil(hidden * (1 - idle_ratio))`` hidden channels go through the
    activation; the others are idle and pass through, forming the linear path that
    :meth:`fuse` folds away. ``drop`` (dropout after fc2), ``init_values`` (LayerScale) and
    ``drop_path`` act on the FFN's output before the residual add, as in timm's ``Block``;
    dropout and drop path act only in training, and the layer scale folds into the fused form.

    ``fast_paths=False`` always runs the module calls of eq. 2 (for reading and debugging);
    see :meth:`forward` for when the fast forms of :mod:`.channel_idle_kernels` are used.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            idle_ratio: float = 0.75,
            act_layer: Type[nn.Module] = nn.GELU,
            bias: bool = True,
            drop: float = 0.0,
            init_values: Optional[float] = None,
            drop_path: float = 0.0,
            bn_eps: float = 1e-5,
            fast_paths: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden_features = hidden_features or 4 * in_features
        self.idle_ratio = float(idle_ratio)
        self.num_active = num_active_channels(hidden_features, idle_ratio)
        self.fast_paths = fast_paths
        self.norm1 = nn.BatchNorm1d(in_features, eps=bn_eps, **dd)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.act = act_layer()
        self.norm2 = nn.BatchNorm1d(hidden_features, eps=bn_eps, **dd)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias, **dd)
        self.drop = nn.Dropout(drop)
        self.ls = LayerScale(in_features, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @_discard_running_stats_when_recomputing
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 2: ``h = fc1(BN1(x))``, activate its first k channels, ``y = fc2(BN2(h))``, add ``x``.

        With ``fast_paths`` (the default), an eager forward (training, evaluation, ``torch.compile``) with
        both active and idle channels and a plain ``nn.BatchNorm1d`` as ``norm2`` (or the synchronised one
        ``repa_ssl.convert_sync_batchnorm`` puts in, whose statistics span the process group) computes ``y`` with
        :func:`~.channel_idle_kernels.fast_channel_idle_ffn` instead: the same outputs, gradients and
        running statistics, without materialising the hidden activations. An eager float32/float64 training
        forward where the idle path is cheaper as a matrix runs both BatchNorms and ``y`` as
        :func:`~.channel_idle_lean_training.lean_train_ffn`, which keeps less for backward. Scripting, FX,
        ``torch.jit.trace`` and ``torch.export`` always record the module calls below.
        """
        k = self.num_active
        if not torch.jit.is_scripting():
            x2d = x.reshape(-1, x.shape[-1])
            if self.fast_paths and lean_train_ffn_applies(x2d, self.norm1, self.norm2, k):
                y = lean_train_ffn(x2d, self.norm1, self.fc1, self.act, self.norm2, self.fc2, k)
                return self._add_residual(x, y)
        tokens = self.norm1(x.reshape(-1, x.shape[-1]))  # BatchNorm over the (B*N, C) tokens
        if not torch.jit.is_scripting():
            if self.fast_paths and fast_paths_apply(tokens, self.norm2, k):
                return self._add_residual(x, fast_channel_idle_ffn(tokens, self.fc1, self.act, self.norm2, self.fc2, k))
        h = self.fc1(tokens)
        h = torch.cat([self.act(h[:, :k]), h[:, k:]], dim=1)  # only the first k hidden channels are activated
        return self._add_residual(x, self.fc2(self.norm2(h)))

    def _add_residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls(self.drop(y.view(x.shape))))

    @torch.no_grad()
    def fuse(self) -> "ReparamChannelIdleMlp":
        """Fold both BatchNorms, both biases, the layer scale, the linear path and the residual (eq. 3-6).

        Fusion uses the BatchNorms' running statistics, i.e. it reproduces this module's
        eval-mode output (dropout and drop path off). Folding is done in float64 and cast back.
        """
        if self.training:
            _logger.warning(
                "Fusing a channel-idle FFN that is in training mode: the fused module reproduces its "
                "EVAL-mode output (BatchNorm running statistics), not the batch statistics training uses. "
                "Call model.eval() first to silence this; repa_ssl.fuse_model() does it for you."
            )
        scale1, shift1 = fold_batchnorm(self.norm1)
        scale2, shift2 = fold_batchnorm(self.norm2)
        w1, w2 = self.fc1.weight.double(), self.fc2.weight.double()
        b1 = self.fc1.bias.double() if self.fc1.bias is not None else torch.zeros(w1.shape[0], dtype=w1.dtype)
        b2 = self.fc2.bias.double() if self.fc2.bias is not None else torch.zeros(w2.shape[0], dtype=w2.dtype)
        gamma = self.ls.gamma.double() if isinstance(self.ls, LayerScale) else torch.ones_like(b2)
        # eq. 3: fc1(BN1(x)) = x (w1 * scale1)^T + (b1 + w1 shift1), likewise for fc2(BN2(.)); the layer
        # scale multiplies fc2's output rows.
        w_in, b_in = w1 * scale1, b1 + w1 @ shift1
        w_out, b_out = gamma[:, None] * w2 * scale2, gamma * (b2 + w2 @ shift2)
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
        _refuse_other_form(state_dict, prefix, "train")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ReparamChannelIdleMlp(nn.Module):
    """Deploy form (eq. 6): ``linear(x) + fc_out(act(fc_in(x)))``.

    ``linear`` holds the idle channels' path, both BatchNorms, both biases and the
    identity shortcut; ``fc_in``/``fc_out`` the active channels (the layer scale, if any, is
    folded into ``linear`` and ``fc_out``). With ``num_active = 0`` (idle ratio 1) the FFN is a
    single C x C linear. It is an inference form: dropout and drop path are not part of it.
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
        if self.fc_in is None:
            return self.linear(x)
        if torch.jit.is_scripting():
            active = self.act(self.fc_in(x))
        else:  # the same GELU, in fc_in's output buffer where allowed (inference_kernels)
            active = linear_then_activation(self.fc_in, self.act, x)
        return self.linear(x) + self.fc_out(active)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _refuse_other_form(state_dict, prefix, "fused")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# form -> (a key only it has, the other form's key, why that key cannot load here)
_FORM_KEYS = {
    "train": ("fc1.weight", "linear.weight",
              "is a FUSED (deploy-form) FFN weight, but this model is in the train form. Build the model with "
              "inference_mode=True (e.g. timm.create_model(name, inference_mode=True), or the '-fused' OpenCLIP "
              "config) to load a fused checkpoint."),
    "fused": ("linear.weight", "fc1.weight",
              "is a TRAIN-form FFN weight, but this model is fused (inference_mode=True). Build the train form "
              "(inference_mode=False) to load it, then fuse it with repa_ssl.fuse_model() or "
              "timm.utils.reparameterize_model()."),
}


def _refuse_other_form(state_dict: dict, prefix: str, form: str) -> None:
    """A clear error, instead of missing/unexpected keys, when a state dict holds the other form's FFN."""
    own, other, why = _FORM_KEYS[form]
    if f"{prefix}{own}" not in state_dict and f"{prefix}{other}" in state_dict:
        raise StateDictFormError(f"'{prefix}{other}' {why}")
