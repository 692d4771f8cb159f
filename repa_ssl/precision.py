"""Mixed precision: the one place that resolves ``--precision auto`` and opens autocast.

``auto`` is fp16 with a GradScaler on GPU (the reference DINO's ``use_fp16``) and fp32 elsewhere;
fp16 and bf16 training need a GPU.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Optional, Union

import torch

__all__ = ["PRECISIONS", "autocast", "autocast_for", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

Device = Union[str, torch.device]


def resolve_precision(precision: str, device: Device) -> str:
    """``precision`` with ``auto`` replaced by what it means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: Device) -> ContextManager:
    """The autocast context of a resolved ``precision`` on ``device`` (nothing to do for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def autocast_for(precision: str, device: torch.device) -> tuple[Callable[[], ContextManager],
                                                                 Optional[torch.amp.GradScaler]]:
    """(autocast context factory, GradScaler or None) for training at ``--precision`` on ``device``."""
    precision = resolve_precision(precision, device)
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {precision} needs a GPU; on CPU use --precision fp32 (or auto).")
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return functools.partial(autocast, precision, device), scaler
