"""Synchronised BatchNorm for RePa models: ``convert_sync_batchnorm``, the analogue of torch's.

``torch.nn.SyncBatchNorm`` runs only on GPUs and would switch off the channel-idle FFN's fast paths.
Here the FFNs' two BatchNorms become :class:`~repa_ssl.layers.channel_idle_kernels.SyncChannelIdleBatchNorm`
instead, which take their batch statistics over the process group on gloo (CPU) and nccl alike, through
the column-block and idle-as-matrix paths, sending per step as many elements as torch's SyncBatchNorm
would for the same layers. Any other BatchNorm (e.g. a DINO head with BN) becomes torch's SyncBatchNorm
where it lives on a GPU; on CPU, where torch's cannot run, a BatchNorm1d becomes the synchronised one of
the FFNs too, and a 2-d or 3-d BatchNorm stays per-process (with a warning).

By default the statistics travel on a process group of their own (:func:`batchnorm_process_group`), not on the
default group that DDP all-reduces the gradients on.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch.distributed as dist
from torch import nn

from .layers.channel_idle_kernels import SyncChannelIdleBatchNorm
from .layers.channel_idle_mlp import ChannelIdleMlp

_logger = logging.getLogger(__name__)

__all__ = ["SyncChannelIdleBatchNorm", "batchnorm_process_group", "convert_sync_batchnorm"]

_BATCHNORM_GROUP: Optional[tuple[Any, Any]] = None  # (the default group it was made in, the group)


def batchnorm_process_group() -> Optional[Any]:
    """Every process of the default group, as a separate group for the BatchNorms' statistics (None without one).

    DDP all-reduces gradient buckets on the default group while backward runs, and a group runs its collectives in
    order (gloo's queue, nccl's stream): a BatchNorm's backward all-reduce on that group waits behind a whole
    bucket. On a group of its own it does not (on 2 gloo processes, ViT-S/16, it took the RePa step from 0.83x
    to 0.75x vanilla at θ = 0.75). Made once per default group; making it is collective, so every process
    converts its models at the same point, as DDP's construction requires anyway.
    """
    global _BATCHNORM_GROUP
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if _BATCHNORM_GROUP is None or _BATCHNORM_GROUP[0] is not dist.group.WORLD:
        _BATCHNORM_GROUP = (dist.group.WORLD, dist.new_group())
    return _BATCHNORM_GROUP[1]


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[Any] = None) -> nn.Module:
    """Synchronise ``module``'s BatchNorms over ``process_group`` (default: every process, on
    :func:`batchnorm_process_group`); returns it.

    Converted in place, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does (a bare BatchNorm is
    returned as a new module): parameters and buffers are the same tensors and the state dict keeps its
    keys, so checkpoints load and fuse alike. Frozen BatchNorms (no ``_BatchNorm``) are left as they are.
    """
    on_cpu = []
    converted = _convert(module, process_group or batchnorm_process_group(), on_cpu)
    if on_cpu:
        _logger.warning("%d 2-d/3-d BatchNorm layer(s) live on the CPU, where torch's SyncBatchNorm cannot "
                        "run: each process normalises its own batch there (%s).",
                        len(on_cpu), ", ".join(on_cpu[:3]) + (", ..." if len(on_cpu) > 3 else ""))
    return converted


def _convert(module: nn.Module, process_group: Optional[Any], on_cpu: list[str], name: str = "") -> nn.Module:
    if isinstance(module, ChannelIdleMlp):
        for norm in ("norm1", "norm2"):
            bn = getattr(module, norm)
            if type(bn) in (nn.BatchNorm1d, SyncChannelIdleBatchNorm):
                setattr(module, norm, SyncChannelIdleBatchNorm.from_batchnorm(bn, process_group))
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        if not any(t.device.type == "cpu" for t in (*module.parameters(), *module.buffers())):
            return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        if type(module) is nn.BatchNorm1d:
            return SyncChannelIdleBatchNorm.from_batchnorm(module, process_group)
        on_cpu.append(name or type(module).__name__)
        return module
    for child_name, child in module.named_children():
        converted = _convert(child, process_group, on_cpu, f"{name}.{child_name}" if name else child_name)
        if converted is not child:
            module.add_module(child_name, converted)
    return module
