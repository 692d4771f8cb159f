"""Side-by-side throughput measurement: interleaved runs, warm-up, medians, paired ratios.

On a shared or virtualised machine the speed of the whole box drifts by tens of percent
within a minute. Timing the runners round-robin puts each round's runs seconds apart, so
the per-round ratio to the baseline cancels that drift; its median is the speed-up to
report, and its interquartile range says how much to trust it.
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Callable, Mapping, Optional

import torch
from tqdm import tqdm

__all__ = ["measure_throughput"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def measure_throughput(
        runners: Mapping[str, Callable[[], object]],
        batch_size: int,
        repeats: int = 10,
        warmup: int = 2,
        device: torch.device = torch.device("cpu"),
        progress: bool = True,
        baseline: Optional[str] = None,
        inference: bool = True,
) -> dict[str, dict]:
    """Time each runner ``repeats`` times, round-robin (rotating the order) so machine noise hits all alike.

    Returns per name the median seconds per call, images/s (``batch_size`` / median) and the
    per-round ``seconds``. With ``baseline`` (a key of ``runners``) each entry also has
    ``speedup``: the median over rounds of baseline time / this runner's time, and
    ``speedup_iqr``, its quartiles. ``inference=False`` keeps autograd on (training steps).
    """
    if baseline is not None and baseline not in runners:
        raise KeyError(f"baseline {baseline!r} is not one of the runners {list(runners)}")
    with torch.inference_mode() if inference else nullcontext():
        for fn in runners.values():
            for _ in range(warmup):
                fn()
        _sync(device)
        times: dict[str, list[float]] = {name: [] for name in runners}
        names = list(runners)
        for r in tqdm(range(repeats), desc="timing", disable=not progress, leave=False):
            # each round starts one runner later, so no runner always follows the same neighbour
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn = runners[name]
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    out: dict[str, dict] = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        out[name] = {"median_s": median, "images_per_s": batch_size / median, "seconds": ts}
        if baseline is not None:
            ratios = [b / t for b, t in zip(times[baseline], ts)]
            out[name].update(speedup=statistics.median(ratios), speedup_iqr=_quartiles(ratios))
    return out
