"""Side-by-side throughput measurement: interleaved runs, warm-up, medians."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch
from tqdm import tqdm

__all__ = ["measure_throughput"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_throughput(
        runners: Mapping[str, Callable[[], object]],
        batch_size: int,
        repeats: int = 10,
        warmup: int = 2,
        device: torch.device = torch.device("cpu"),
        progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Time each runner ``repeats`` times, round-robin so machine noise hits all alike.

    Returns per name the median seconds per call and images/s (``batch_size`` / median).
    """
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in tqdm(range(repeats), desc="timing", disable=not progress):
        for name, fn in runners.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        out[name] = {"median_s": median, "images_per_s": batch_size / median}
    return out
