"""Activation memory of a training forward: the bytes autograd keeps for backward.

Counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor a forward saves for backward
(by autograd's built-in functions and by custom ``autograd.Function``s' ``save_for_backward`` alike), as
distinct storages (views of one tensor count once), parameters excluded. Unlike a peak-allocation reading
it does not depend on the allocator or on what else the process holds, so it works on the CPU too.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["saved_activation_bytes"]


def saved_activation_bytes(model: nn.Module, *inputs: torch.Tensor,
                           forward: Callable[..., torch.Tensor] | None = None) -> int:
    """Bytes of the distinct storages ``(forward or model)(*inputs)`` saves for backward, weights excluded.

    The graph is kept alive until the storages are counted (so no freed storage's address is reused
    in between), then released without a backward.
    """
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = (forward or model)(*inputs)
    total = sum(saved.values())
    del out
    return total
