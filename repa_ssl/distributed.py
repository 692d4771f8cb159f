"""The project's one distributed-init module: torchrun, a submitit job (Slurm or local), or a single process.

``init_distributed()`` reads torchrun's variables (a submitit job's environment is turned into them by
``export_submitit_env``, submitit being the one reader of Slurm's), picks the backend (nccl on CUDA, gloo
otherwise), binds the local GPU and returns a ``DistEnv`` that training code passes around. Without any
launcher variables it returns a single-process environment and initialises nothing, so the same script
runs everywhere.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import submitit
import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)

__all__ = [
    "DistEnv", "detect_env", "init_distributed", "is_main_process", "all_reduce_mean", "all_reduce_sum",
    "all_gather_concat", "barrier", "max_difference_across_ranks", "shutdown", "export_submitit_env",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    launcher: str = "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env() -> tuple[str, int, int, int]:
    """(launcher, rank, world_size, local_rank) from torchrun's variables (``export_submitit_env`` sets them in a
    submitit job).

    Several Slurm tasks started without either (a bare ``srun``) are refused: each would train alone.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return ("submitit" if "SUBMITIT_EXECUTOR" in os.environ else "torchrun", int(os.environ["RANK"]),
                int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        raise RuntimeError(
            f"this is one of {os.environ['SLURM_NTASKS']} Slurm tasks, started without a launcher: each would train "
            "alone. Submit with the project's launchers (python -m dino.launch / clip.launch, through submitit), "
            "or start torchrun in each task.")
    return "single", 0, 1, 0


def export_submitit_env() -> dict[str, str]:
    """Inside a submitit job (Slurm or its local executor): set torchrun's variables from the job.

    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the job's first node) and MASTER_PORT
    (derived from the job id, so a requeued job uses the same) come from submitit's
    ``TorchDistributedEnvironment``, once per task (the launcher's job calls this, then ``init_distributed``).
    Any application that reads torchrun's environment (``init_distributed``, open_clip_train) then
    initialises as under torchrun. Outside a submitit job nothing is set. Returns the variables now in effect.
    """
    try:
        job_env = submitit.JobEnvironment()
    except RuntimeError:  # not in a submitit job
        return {}
    if job_env.cluster == "debug":  # in the submitting process: one task, nothing to initialise
        return {}
    if "RANK" not in os.environ:  # not exported yet in this task
        env = submitit.helpers.TorchDistributedEnvironment()
        if env.master_addr == socket.gethostname():
            env.master_addr = "127.0.0.1"
        env.export(set_cuda_visible_devices=False)
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: os.environ[k] for k in keys}


def init_distributed(device: Optional[str] = None, timeout_s: int = 1800) -> DistEnv:
    """Initialise ``torch.distributed`` from the environment (idempotent).

    ``device`` forces 'cpu' or 'cuda'; by default CUDA is used when available. In a submitit job
    (Slurm with one task per GPU, or its local executor) the job's environment is used as torchrun's
    (``export_submitit_env``), so no extra setup is needed.
    """
    export_submitit_env()
    launcher, rank, world_size, local_rank = detect_env()
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is visible; use --device cpu.")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        return DistEnv(device=dev, launcher=launcher)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        _logger.info("initialised %s process group: rank %d/%d (%s) on %s", backend, rank, world_size,
                     launcher, dev)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend,
                   launcher=launcher)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """End of a run: wait for every process, then tear the process group down.

    Exiting with a live gloo group can abort a process ("terminate called without an active
    exception") while another still talks to it.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (in place); a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (in place); a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather_concat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process in rank order; rows may differ in number per process.

    ``tensor`` must live on the backend's device (CUDA for nccl). A single process gets ``tensor`` back.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    world_size = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


def max_difference_across_ranks(tensor: torch.Tensor) -> float:
    """Largest absolute difference between any process's ``tensor`` and rank 0's (0.0 in one process).

    A cheap check that replicated state (a loss centre, EMA weights) has not drifted apart.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return 0.0
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return max((g - gathered[0]).abs().max().item() for g in gathered)
