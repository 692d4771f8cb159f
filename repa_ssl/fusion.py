"""One fusion entry point and one verification helper for every model we ship.

``fuse_model`` works on anything that contains channel-idle FFNs or depth-branch groups: a timm
model, an OpenCLIP ``CLIP``, a DINO student/teacher wrapper, a DDP-wrapped module. It is the
operation of ``timm.utils.reparameterize_model`` (which calls each layer's ``fuse()``: a branch group's
merges it into one wide block, fusing its channel-idle FFNs), plus a switch to eval mode and an error when
there is nothing to fuse or a branch group has not finished its join.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from timm.utils import reparameterize_model
from torch import nn

from .layers import ChannelIdleMlp, ReparamChannelIdleMlp
from .layers.branch_group import BranchGroup

_logger = logging.getLogger(__name__)

__all__ = ["FusionError", "FusionReport", "fuse_model", "verify_fusion", "is_fused", "has_unfused_repa_layers"]

# Float32 fused vs train form differ by re-association only; 1e-4 of the output scale
# leaves room for deep/large models while catching any real folding mistake.
DEFAULT_RTOL = 1e-4


class FusionError(RuntimeError):
    """Fusion could not be done, or the fused model does not match the train form."""


def has_unfused_repa_layers(model: nn.Module) -> bool:
    """True when ``model`` holds a train-form channel-idle FFN or a depth-branch group, i.e. ``fuse_model``
    has work to do."""
    return any(isinstance(m, (ChannelIdleMlp, BranchGroup)) for m in model.modules())


def is_fused(model: nn.Module) -> bool:
    """True for a RePa model in deploy form: fused channel-idle FFNs and no train-form one left.

    False for a vanilla model, which has nothing to fuse.
    """
    return (any(isinstance(m, ReparamChannelIdleMlp) for m in model.modules())
            and not has_unfused_repa_layers(model))


def fuse_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` in deploy form, in eval mode, with every channel-idle FFN fused.

    Fusion folds the BatchNorms' running statistics, i.e. the eval-mode behaviour; the
    result is therefore put in eval mode. Depth-branch groups merge into one block each, and raise
    ``FusionError`` unless their join is 0. Raises ``FusionError`` if there is nothing to fuse.
    """
    num_ffns = sum(isinstance(m, ChannelIdleMlp) for m in model.modules() if m is not model)  # timm fuses children
    groups = [m for m in model.modules() if isinstance(m, BranchGroup) and m is not model]
    if not num_ffns and not groups:
        raise FusionError(
            f"{type(model).__name__} has no train-form channel-idle FFN to fuse: it is already fused or is "
            "not a RePa model."
        )
    if not inplace:
        model = copy.deepcopy(model)
    if model.training:
        _logger.info("fuse_model: switching %s to eval mode (fusion uses running statistics)", type(model).__name__)
    model = reparameterize_model(model.eval(), inplace=True)
    _logger.info("fused %d channel-idle FFNs and merged %d branch groups of %s", num_ffns, len(groups),
                 type(model).__name__)
    return model


@dataclass
class FusionReport:
    """How far the fused model is from the train form on one batch."""

    max_abs_err: float
    max_rel_err: float  # max |fused - train| / max |train|
    rtol: float
    num_samples: int

    @property
    def ok(self) -> bool:
        return self.max_rel_err <= self.rtol

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), ok=self.ok)

    def check(self, what: str = "fused model") -> "FusionReport":
        """Raise ``FusionError`` unless the error is within tolerance; return self."""
        if not self.ok:
            raise FusionError(
                f"{what} differs from the train form: max abs error {self.max_abs_err:.3g}, max relative "
                f"error {self.max_rel_err:.3g} > tolerance {self.rtol:.3g}. Refusing to export or evaluate it; "
                "check that the BatchNorm running statistics are finite and that the checkpoint matches the model."
            )
        return self


def _default_forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    # A CLIP model's image embedding is what its fused tower changes.
    return model.encode_image if hasattr(model, "encode_image") else model


@torch.no_grad()
def verify_fusion(
        train_model: nn.Module,
        fused_model: nn.Module,
        batch: torch.Tensor,
        rtol: float = DEFAULT_RTOL,
        forward: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
) -> FusionReport:
    """Run both forms in eval mode on ``batch`` and report their max abs / rel error.

    The train model's mode is restored afterwards. ``forward(model, batch)`` selects the
    output to compare (default: ``encode_image`` for CLIP models, else ``model(batch)``).
    """
    was_training = train_model.training
    train_model.eval()
    fused_model.eval()
    try:
        if forward is None:
            ref, out = _default_forward(train_model)(batch), _default_forward(fused_model)(batch)
        else:
            ref, out = forward(train_model, batch), forward(fused_model, batch)
    finally:
        train_model.train(was_training)
    ref, out = ref.double(), out.double()
    if ref.shape != out.shape:
        raise FusionError(f"fused output shape {tuple(out.shape)} differs from train-form {tuple(ref.shape)}")
    max_abs = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    max_rel = max_abs / scale if scale > 0 else max_abs
    if not (torch.isfinite(ref).all() and torch.isfinite(out).all()):
        max_abs = max_rel = float("inf")
    return FusionReport(max_abs_err=max_abs, max_rel_err=max_rel, rtol=rtol, num_samples=int(batch.shape[0]))
