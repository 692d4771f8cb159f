"""Channel-idle ratios: validation, per-layer schedules and active-channel counts."""
from __future__ import annotations

import math
from typing import Sequence, Union

IdleRatio = Union[float, Sequence[float]]

IDLE_SCHEDULES = ("uniform", "linear")


def num_active_channels(hidden_features: int, idle_ratio: float) -> int:
    """Hidden channels that go through the activation: ``ceil(hidden * (1 - θ))``.

    The product is rounded to 6 decimals first so that float noise such as
    ``1536 * (1 - 0.75) = 384.00000000000006`` does not add a channel.
    """
    check_idle_ratio(idle_ratio)
    return int(math.ceil(round(hidden_features * (1.0 - idle_ratio), 6)))


def check_idle_ratio(idle_ratio: float, where: str = "idle_ratio") -> float:
    if isinstance(idle_ratio, bool) or not isinstance(idle_ratio, (int, float)):
        raise TypeError(f"{where} must be a number in [0, 1], got {idle_ratio!r}.")
    if not 0.0 <= float(idle_ratio) <= 1.0 or math.isnan(idle_ratio):
        raise ValueError(
            f"{where}={idle_ratio!r} is outside [0, 1]: it is the fraction of FFN hidden channels "
            "left idle (0 = every channel activated, 1 = the FFN is purely linear). Pick a value in [0, 1], "
            "e.g. 0.75 as in the paper."
        )
    return float(idle_ratio)


def linear_idle_ratios(base_ratio: float, depth: int) -> list[float]:
    """The RePaViT authors' "linear" heuristic.

    Layer ``i < depth - 1`` gets ``(2r - 1) + (2 - 2r) / (depth - 1) * (i + 1)``; the last
    layer keeps every channel active (0.0). The mean over the first ``depth - 1`` layers is
    close to ``r``; it is only defined for ``r`` in [0.5, 1].
    """
    check_idle_ratio(base_ratio)
    if base_ratio < 0.5:
        raise ValueError(
            f"the 'linear' idle schedule needs a base idle_ratio in [0.5, 1] (its first layer gets "
            f"2r - 1 = {2 * base_ratio - 1:.3f} < 0); got {base_ratio}. Use idle_schedule='uniform' or a larger ratio."
        )
    if depth < 2:
        return [0.0] * depth
    ratios = [(2 * base_ratio - 1) + (2 - 2 * base_ratio) / (depth - 1) * (i + 1) for i in range(depth - 1)]
    return [min(1.0, r) for r in ratios] + [0.0]


def resolve_idle_ratios(idle_ratio: IdleRatio, depth: int, idle_schedule: str = "uniform") -> list[float]:
    """Turn the user's ``idle_ratio`` (a float or a per-layer list) into one ratio per block."""
    if idle_schedule not in IDLE_SCHEDULES:
        raise ValueError(f"unknown idle_schedule {idle_schedule!r}; choose one of {IDLE_SCHEDULES}.")
    if isinstance(idle_ratio, (list, tuple)):
        if idle_schedule != "uniform":
            raise ValueError("a per-layer idle_ratio list cannot be combined with idle_schedule='linear'.")
        if len(idle_ratio) != depth:
            raise ValueError(
                f"idle_ratio has {len(idle_ratio)} per-layer values but the model has {depth} blocks: "
                f"give exactly one value per block, or a single float for all of them."
            )
        return [check_idle_ratio(r, f"idle_ratio[{i}]") for i, r in enumerate(idle_ratio)]
    check_idle_ratio(idle_ratio)
    if idle_schedule == "linear":
        return linear_idle_ratios(float(idle_ratio), depth)
    return [float(idle_ratio)] * depth
