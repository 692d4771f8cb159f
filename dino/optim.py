"""DINO's optimizer pieces: parameter groups, per-tensor gradient clipping, last-layer freezing."""
from __future__ import annotations

from typing import Iterable

import torch
from timm.optim import Lars, param_groups_weight_decay
from torch import nn

__all__ = ["OPTIMIZERS", "build_optimizer", "cancel_gradients_last_layer", "clip_gradients"]

OPTIMIZERS = ("adamw", "sgd", "lars")


def build_optimizer(model: nn.Module, name: str = "adamw") -> torch.optim.Optimizer:
    """Two groups: biases and 1-D tensors without weight decay, everything else decayed.

    lr and weight decay are set every iteration from the schedules; groups carry
    ``apply_wd`` so the weight-decay schedule reaches only the decayed group.
    """
    # A non-zero placeholder makes timm split the groups (bias / ndim <= 1 -> no decay), the
    # protocol's rule; cls token, position embedding and the prototypes' gain stay decayed.
    groups = param_groups_weight_decay(model, weight_decay=1.0)
    for group in groups:
        group["apply_wd"] = group["weight_decay"] > 0
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    if name == "lars":
        return Lars(groups, lr=0, momentum=0.9)  # no adaptation for the no-decay group, as in DINO
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


@torch.no_grad()
def clip_gradients(parameters: Iterable[nn.Parameter], clip: float) -> list[torch.Tensor]:
    """Scale each gradient TENSOR to norm <= ``clip`` (not a global norm); return the norms."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return []
    norms = torch._foreach_norm(grads)
    scales = (clip / (torch.stack(norms) + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """While ``epoch < freeze_last_layer`` drop (None, not zero) the prototypes' gradients.

    None skips the parameter in the optimizer step, so AdamW does not decay it either.
    """
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None

