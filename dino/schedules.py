"""DINO's per-iteration schedules (lr, weight decay, teacher momentum) and teacher temperature.

timm's schedulers do not give these exact semantics (their warm-up excludes its end point
and they drive one optimizer field), so the two DINO formulas are written once here.
"""
from __future__ import annotations

import numpy as np

__all__ = ["cosine_scheduler", "teacher_temp_schedule"]


def cosine_scheduler(
        base_value: float,
        final_value: float,
        epochs: int,
        niter_per_ep: int,
        warmup_epochs: int = 0,
        start_warmup_value: float = 0.0,
) -> np.ndarray:
    """One value per iteration: linear warm-up (end points included), then cosine to ``final_value``.

    ``value[i] = final + (base - final) * (1 + cos(pi * i / N)) / 2`` over the ``N``
    iterations after the warm-up; the array is indexed by the global iteration.
    """
    warmup_iters = warmup_epochs * niter_per_ep
    total = epochs * niter_per_ep
    if warmup_iters > total:
        raise ValueError(f"warm-up ({warmup_epochs} epochs) is longer than training ({epochs} epochs)")
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cosine))


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int,
                          nepochs: int) -> np.ndarray:
    """One temperature per epoch: linear from ``warmup_teacher_temp`` over the warm-up, then constant."""
    if warmup_epochs > nepochs:
        raise ValueError(f"teacher temperature warm-up ({warmup_epochs} epochs) exceeds training ({nepochs})")
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
        np.full(nepochs - warmup_epochs, teacher_temp),
    ))
