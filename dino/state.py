"""What a DINO run must save to continue exactly: RNG states and a last-good-state guard."""
from __future__ import annotations

import logging
import random
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from repa_ssl.distributed import DistEnv

_logger = logging.getLogger(__name__)

__all__ = ["all_finite", "gather_rng_states", "restore_buffers", "set_rng_state", "snapshot_buffers"]


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain data (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def gather_rng_states(env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by rank (a collective call under several processes)."""
    state = _rng_state()
    if not env.distributed:
        return [state]
    states: list[Any] = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


def set_rng_state(states: Optional[list[dict[str, Any]]], env: DistEnv) -> bool:
    """Restore this rank's RNG states; False (and a warning) when the world size changed."""
    if not states or len(states) != env.world_size:
        _logger.warning("not restoring RNG states: saved for %s processes, running %d; augmentations and drop "
                        "path will differ from an uninterrupted run", len(states or []), env.world_size)
        return False
    state = states[env.rank]
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_as_tuples(state["python"]))
    return True


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def snapshot_buffers(*modules: nn.Module) -> list[torch.Tensor]:
    """Copies of every buffer (BatchNorm statistics, the loss centre) of ``modules``."""
    return [b.detach().clone() for m in modules for b in m.buffers()]


@torch.no_grad()
def restore_buffers(snapshot: list[torch.Tensor], *modules: nn.Module) -> None:
    for saved, b in zip(snapshot, (b for m in modules for b in m.buffers()), strict=True):
        b.copy_(saved)


def all_finite(tensors: Iterable[Any]) -> bool:
    """True when every floating-point tensor in a (nested) state dict is finite."""
    def walk(x: Any) -> Iterable[torch.Tensor]:
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from walk(v)
    return all(bool(torch.isfinite(t).all()) for t in walk(tensors) if t.is_floating_point())
