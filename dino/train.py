"""DINO self-supervised pretraining of RePa ViTs (and any timm ViT), single process or torchrun.

    python -m dino.train --arch repa_vit_small_patch16_224 --idle-ratio 0.75 \
        --data-path /datasets/imagenet/train --output-dir runs/dino_repa_s16
    torchrun --nproc_per_node 8 -m dino.train ...   # same flags; nccl on GPU, gloo on CPU

Flags and defaults follow the reference ``main_dino.py`` (dashes or underscores both work).
Starting again with the same ``--output-dir`` resumes from ``checkpoint.pth`` (same model,
optimizer and global batch size; anything else is refused). At the end the teacher backbone is
fused, verified on this run's ``--data-path`` and exported to ``teacher_fused.safetensors`` (+ ``.json``).

Depth reparameterization: ``--depth-branches K`` trains K parallel branches in each group of K blocks
(``repa_ssl.branch_model``), usually from a trained deep tower (``--init-from``). The join s falls from 1
(the deep model) to 0 over ``--join-fraction`` of the run (``repa_ssl.join_schedule``); the export merges
each group into one wide block (depth D/K) as it fuses the channel-idle FFNs.

From Python, the flags are the fields of ``DINOConfig``::

    result = train(DINOConfig(arch="test_repa_vit", data_path="images/", output_dir="runs/x", epochs=2))
    result.last_epoch.loss, result.checkpoint, result.fused_export
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from repa_ssl import branch_model, set_branch_join
from repa_ssl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, unwrap_state_dict
from repa_ssl.data import ImageShards, SkippingBatch
from repa_ssl.data.shards import UnreadableShardsError
from repa_ssl.dino_checkpoint import is_dino_checkpoint
from repa_ssl.distributed import DistEnv, all_reduce_mean, init_distributed, max_difference_across_ranks
from repa_ssl.join_schedule import JoinSchedule, add_join_arguments, check_same_join
from repa_ssl.precision import PRECISIONS, autocast_for, resolve_precision
from repa_ssl.seeding import epoch_seed
from repa_ssl.sync_batchnorm import convert_sync_batchnorm

from .augment import DataAugmentationDINO
from .backbone import build_backbone, is_repa_arch
from .data import DATA_SOURCES, build_dataset, build_loader
from .head import DINOHead
from .loss import DINOLoss
from .optim import OPTIMIZERS, build_optimizer, cancel_gradients_last_layer, clip_gradients
from .schedules import cosine_scheduler
from .state import all_finite, gather_rng_states, restore_buffers, set_rng_state, snapshot_buffers
from .wrapper import MultiCropWrapper

_logger = logging.getLogger("dino.train")

CHECKPOINT = "checkpoint.pth"
# Arguments that define the networks: a checkpoint only resumes into the same ones.
ARCHITECTURE_ARGS = ("arch", "patch_size", "idle_ratio", "idle_schedule", "out_dim", "norm_last_layer",
                     "use_bn_in_head", "head_hidden_dim", "head_bottleneck_dim", "local_crops_number")
# What CheckpointedRun.resume reads from a checkpoint (CheckpointedRun.state writes these and more).
RESUME_KEYS = ("student", "teacher", "optimizer", "scaler", "dino_loss", "epoch", "iteration", "args", "rng",
               "world_size")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops."""

    def __init__(self, loss: float, epoch: int, iteration: int) -> None:
        super().__init__(f"loss is {loss} at epoch {epoch}, iteration {iteration}")
        self.loss, self.epoch, self.iteration = loss, epoch, iteration


@dataclass
class DINOConfig:
    """Everything a DINO run is made of; ``get_args_parser`` is its command line (the same names, dashed)."""

    # model
    arch: str = "repa_vit_small_patch16_224"
    patch_size: Optional[int] = None
    idle_ratio: Optional[float] = 0.75  # None for a non-RePa arch
    idle_schedule: Optional[str] = "uniform"
    out_dim: int = 65536
    norm_last_layer: bool = True
    use_bn_in_head: bool = False
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    drop_path_rate: float = 0.1
    init_from: Optional[str] = None
    # depth reparameterization (repa_ssl.join_schedule)
    depth_branches: int = 1
    join_fraction: float = 0.5
    join_schedule: str = "cosine"
    # optimisation
    precision: str = "auto"
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    batch_size_per_gpu: int = 64
    epochs: int = 100
    freeze_last_layer: int = 1
    lr: float = 0.0005
    warmup_epochs: int = 10
    min_lr: float = 1e-6
    optimizer: str = "adamw"
    # multi-crop
    global_crops_scale: Sequence[float] = (0.4, 1.0)
    local_crops_number: int = 8
    local_crops_scale: Sequence[float] = (0.05, 0.4)
    global_crop_size: int = 224
    local_crop_size: int = 96
    # data, run
    data_source: str = "folder"
    data_path: Optional[str] = None
    train_num_samples: Optional[int] = None
    max_bad_fraction: float = 0.5
    allow_remote_shards: bool = False
    shuffle_buffer: int = 5000  # open_clip's sample shuffle (first yield at min(buffer, 1000))
    shard_streams: int = 4
    output_dir: str = "."
    saveckp_freq: int = 20
    saveckp_iters: int = 0
    seed: int = 0
    num_workers: int = 10
    device: Optional[str] = None
    export: bool = True


@dataclass
class EpochStats:
    """One epoch of a run, as logged to ``log.txt``."""

    loss: float  # mean over the epoch's trained batches
    skipped_images: int  # unreadable images skipped
    skipped_batches: int  # batches without a readable image
    bad_fraction: float  # unreadable share of the images read
    epoch: int = 0
    world_size: int = 1
    max_difference_across_ranks: dict[str, float] = field(default_factory=dict)  # 0 when processes agree
    center_norm: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What ``train`` leaves behind."""

    config: DINOConfig  # as run: precision resolved, no idle ratio for a non-RePa arch
    checkpoint: Path  # checkpoint.pth, the last state
    fused_export: Optional[Path]  # teacher_fused.safetensors (+ .json); None if not exported (or not rank 0)
    last_epoch: Optional[EpochStats]  # the last epoch trained by this call; None if it resumed a finished run
    resumed_at: int  # the global iteration it started from (0: a fresh run)


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of ``DINOConfig``: ``DINOConfig(**vars(get_args_parser().parse_args(argv)))``."""
    p = argparse.ArgumentParser("dino.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    defaults = DINOConfig()

    def add(name: str, **kwargs: Any) -> None:  # --some-flag and the reference's --some_flag, DINOConfig's default
        names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
        p.add_argument(*names, default=getattr(defaults, name.replace("-", "_")), **kwargs)

    # model
    add("arch", help="timm model name (any repa_vit_* or timm ViT)")
    add("patch-size", type=int, help="override the arch's patch size")
    add("idle-ratio", type=float, help="theta: fraction of idle FFN channels (RePa models)")
    add("idle-schedule", choices=("uniform", "linear"))
    add("out-dim", type=int, help="prototypes (dimension of the DINO head output)")
    add("norm-last-layer", action=argparse.BooleanOptionalAction,
        help="freeze the weight-norm gain of the head's last layer (DINO advises --no-norm-last-layer for ViT-S)")
    add("use-bn-in-head", action=argparse.BooleanOptionalAction)
    add("head-hidden-dim", type=int)
    add("head-bottleneck-dim", type=int)
    add("momentum-teacher", type=float, help="base EMA momentum, cosine to 1")
    add("warmup-teacher-temp", type=float)
    add("teacher-temp", type=float)
    add("warmup-teacher-temp-epochs", type=int)
    add("drop-path-rate", type=float, help="student only")
    add("init-from", help="start from these weights: a dino.train checkpoint (its teacher, head included) or a "
                          "backbone state dict (timm, the RePaViT authors'); same --arch and --idle-ratio")
    # depth reparameterization
    add_join_arguments(p, defaults.depth_branches, defaults.join_fraction, defaults.join_schedule)
    # optimisation
    add("precision", choices=PRECISIONS,
        help="auto: fp16 with a GradScaler on GPU (the reference's use_fp16), fp32 on CPU")
    add("weight-decay", type=float)
    add("weight-decay-end", type=float)
    add("clip-grad", type=float, help="max norm of EACH gradient tensor; 0 disables")
    add("batch-size-per-gpu", type=int, help="per process")
    add("epochs", type=int)
    add("freeze-last-layer", type=int, help="epochs during which the last layer is not updated")
    add("lr", type=float, help="peak lr for a global batch of 256 (scaled linearly)")
    add("warmup-epochs", type=int)
    add("min-lr", type=float)
    add("optimizer", choices=OPTIMIZERS)
    # multi-crop
    add("global-crops-scale", type=float, nargs=2)
    add("local-crops-number", type=int)
    add("local-crops-scale", type=float, nargs=2)
    add("global-crop-size", type=int)
    add("local-crop-size", type=int)
    # data, run
    add("data-source", choices=DATA_SOURCES,
        help="folder: ImageFolder root; wds: img2dataset/LAION tar shards (images only); digits: embedded demo data")
    add("data-path", help="ImageFolder root, or shards: a folder of .tar, a brace pattern, a::b")
    add("train-num-samples", type=int, help="images per epoch for --data-source wds (default: count)")
    add("max-bad-fraction", type=float,
        help="stop (after saving) at the end of an epoch in which more than this fraction of the images read "
             "was unreadable (default 0.5); below it unreadable images and whole batches are skipped and counted")
    add("allow-remote-shards", action="store_true",
        help="accept 'pipe:' (runs a shell command) and URL shard specs in --data-path")
    add("shuffle-buffer", type=int,
        help="wds: samples shuffled per worker (open_clip's 5000; yields once it holds min(N, 1000)); 1: none")
    add("shard-streams", type=int,
        help="wds: shards each worker reads at once, taking their samples in turn, so a batch mixes shards")
    add("output-dir", help="checkpoints, logs, TensorBoard and the fused teacher")
    add("saveckp-freq", type=int, help="also keep checkpoint{epoch:04d}.pth every N epochs")
    add("saveckp-iters", type=int, help="also write checkpoint.pth every N iterations (0: per epoch)")
    add("seed", type=int)
    add("num-workers", type=int)
    add("device", choices=("cpu", "cuda"), help="default: cuda when available")
    add("export", action=argparse.BooleanOptionalAction, help="export the fused teacher at the end")
    return p


def plain_args(cfg: DINOConfig) -> dict[str, Any]:
    """The configuration as plain data (lists, numbers, strings) for the checkpoint's ``args``."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def has_batchnorms(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def load_init(net: MultiCropWrapper, path: str) -> None:
    """Start ``net`` from ``path``: a dino.train checkpoint's teacher (backbone and head), else a backbone state dict.

    A classifier (``head.*``) in a backbone state dict is left out: DINO's head is its own.
    """
    ckpt = load_checkpoint(path)
    if is_dino_checkpoint(ckpt):
        target, state = net, unwrap_state_dict(ckpt, "teacher")
    else:
        target, state = net.backbone, {k: v for k, v in unwrap_state_dict(ckpt).items() if not k.startswith("head.")}
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"--init-from {path} does not fit this model ({lines[-1] if lines else e}): give the "
                         "--arch, --idle-ratio and, for a DINO checkpoint, the head flags it was trained "
                         "with.") from None
    _logger.info("initialised from %s (%s)", path, "its teacher" if target is net else "backbone weights")


def build_networks(cfg: DINOConfig, env: DistEnv) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(student, teacher, student_without_ddp, teacher_without_ddp); the teacher starts as the student."""
    nets = []
    for drop_path_rate in (cfg.drop_path_rate, 0.0):  # student, teacher
        backbone = build_backbone(cfg.arch, cfg.idle_ratio, cfg.idle_schedule, cfg.patch_size, drop_path_rate)
        head = DINOHead(backbone.num_features, cfg.out_dim, use_bn=cfg.use_bn_in_head,
                        norm_last_layer=cfg.norm_last_layer, hidden_dim=cfg.head_hidden_dim,
                        bottleneck_dim=cfg.head_bottleneck_dim)
        nets.append(MultiCropWrapper(backbone, head).to(env.device))
    student, teacher = nets
    if cfg.init_from and not (Path(cfg.output_dir) / CHECKPOINT).is_file():  # a resume has weights of its own
        load_init(student, cfg.init_from)
    if cfg.depth_branches > 1:  # weights taken over: at s = 1 the branch form is the deep model
        for net in nets:
            net.backbone = branch_model(net.backbone, cfg.depth_branches)
    if env.distributed and has_batchnorms(student):
        # Batch statistics over every process, on GPUs and CPUs alike; the FFNs keep their fast paths.
        student, teacher = convert_sync_batchnorm(student), convert_sync_batchnorm(teacher)
    teacher_without_ddp, student_without_ddp = teacher, student
    if env.distributed and has_batchnorms(student):
        # As in the reference, DDP on the teacher keeps its BatchNorm buffers in step across processes.
        teacher = DDP(teacher, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        teacher_without_ddp = teacher.module
    if env.distributed:
        student = DDP(student, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        student_without_ddp = student.module
    teacher_without_ddp.load_state_dict(student_without_ddp.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher, student_without_ddp, teacher_without_ddp


@dataclass
class DINOStep:
    """One DINO iteration on a list of crops; returns the loss averaged over processes."""

    student: nn.Module
    teacher: nn.Module
    student_without_ddp: nn.Module
    teacher_without_ddp: nn.Module
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    autocast: Callable[[], contextlib.AbstractContextManager]
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    clip_grad: float
    freeze_last_layer: int
    join: Optional[JoinSchedule] = None  # depth branches: s per global iteration

    def __call__(self, images: Sequence[torch.Tensor], epoch: int, it: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[it])
            if group["apply_wd"]:
                group["weight_decay"] = float(self.wd[it])
        if self.join is not None:
            for net in (self.student_without_ddp, self.teacher_without_ddp):
                set_branch_join(net, self.join(it))

        buffers = snapshot_buffers(self.student, self.teacher, self.dino_loss)
        with self.autocast():
            with torch.no_grad():
                teacher_output = self.teacher(images[:2])  # only the 2 global views through the teacher
            student_output = self.student(images)
            loss = self.dino_loss(student_output, teacher_output, epoch)
        loss_value = all_reduce_mean(loss.detach().clone()).item()  # every process stops together
        if not math.isfinite(loss_value):
            restore_buffers(buffers, self.student, self.teacher, self.dino_loss)  # back to the last good state
            raise NonFiniteLossError(loss_value, epoch, it)

        self.optimizer.zero_grad(set_to_none=True)
        params = list(self.student_without_ddp.parameters())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        else:
            loss.backward()
        if self.clip_grad:
            clip_gradients(params, self.clip_grad)
        cancel_gradients_last_layer(epoch, self.student_without_ddp, self.freeze_last_layer)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

        with torch.no_grad():  # teacher <- m * teacher + (1 - m) * student, parameters only
            m = float(self.momentum[it])
            teacher_params = list(self.teacher_without_ddp.parameters())
            torch._foreach_mul_(teacher_params, m)
            torch._foreach_add_(teacher_params, [p.detach() for p in params], alpha=1 - m)
        return loss_value


def build_step(cfg: DINOConfig, env: DistEnv, niter: int) -> DINOStep:
    """Networks, loss, optimizer and schedules for ``niter`` iterations per epoch."""
    # ============ building student and teacher networks ============
    student, teacher, student_without_ddp, teacher_without_ddp = build_networks(cfg, env)

    # ============ preparing loss ============
    dino_loss = DINOLoss(cfg.out_dim, cfg.local_crops_number + 2, cfg.warmup_teacher_temp, cfg.teacher_temp,
                         cfg.warmup_teacher_temp_epochs, cfg.epochs).to(env.device)

    # ============ preparing optimizer and mixed precision ============
    optimizer = build_optimizer(student, cfg.optimizer)
    autocast, scaler = autocast_for(cfg.precision, env.device)

    # ============ init schedulers: per iteration, the lr scaled to the global batch ============
    global_batch = cfg.batch_size_per_gpu * env.world_size
    return DINOStep(
        student, teacher, student_without_ddp, teacher_without_ddp, dino_loss,
        optimizer=optimizer, scaler=scaler, autocast=autocast,
        lr=cosine_scheduler(cfg.lr * global_batch / 256, cfg.min_lr, cfg.epochs, niter, cfg.warmup_epochs),
        wd=cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, niter),
        momentum=cosine_scheduler(cfg.momentum_teacher, 1.0, cfg.epochs, niter),
        clip_grad=cfg.clip_grad, freeze_last_layer=cfg.freeze_last_layer,
        join=JoinSchedule(cfg.epochs * niter, cfg.join_fraction, cfg.join_schedule) if cfg.depth_branches > 1
        else None,
    )


class CheckpointedRun:
    """Saves a run's full state to ``checkpoint.pth`` in its output directory, and resumes from it exactly."""

    def __init__(self, cfg: DINOConfig, env: DistEnv, step: DINOStep, niter: int) -> None:
        self.cfg, self.env, self.step, self.niter = cfg, env, step, niter
        self.output_dir = Path(cfg.output_dir)

    def state(self, epoch: int, iteration: int) -> dict[str, Any]:
        """The checkpoint dict (contract shared with the evaluation tools). Collective call."""
        s = self.step
        return {
            "student": s.student_without_ddp.state_dict(),
            "teacher": s.teacher_without_ddp.state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "scaler": s.scaler.state_dict() if s.scaler is not None else None,
            "dino_loss": s.dino_loss.state_dict(),
            "epoch": epoch,
            "iteration": iteration,
            "args": plain_args(self.cfg),
            "rng": gather_rng_states(self.env),
            "world_size": self.env.world_size,
            "iterations_per_epoch": self.niter,
        }

    def save(self, epoch: int, iteration: int, also: Optional[str] = None) -> None:
        state = self.state(epoch, iteration)
        if self.env.is_main:
            save_checkpoint(state, self.output_dir / CHECKPOINT)
            if also:
                save_checkpoint(state, self.output_dir / also)

    def save_last_good_state(self, error: NonFiniteLossError) -> str:
        """After a non-finite loss: save the state before that iteration, unless it is itself bad."""
        state = self.state(error.epoch, error.iteration)
        if not all_finite({k: state[k] for k in ("student", "teacher", "optimizer", "dino_loss")}):
            return (f"the weights are already non-finite, so nothing was written; the last good checkpoint is "
                    f"{self.output_dir / CHECKPOINT} as it was")
        if self.env.is_main:
            save_checkpoint(state, self.output_dir / CHECKPOINT)
        return (f"the last good state (before epoch {error.epoch}, iteration {error.iteration}) is saved in "
                f"{self.output_dir / CHECKPOINT}")

    def check_resumable(self, path: Path, ckpt: Any) -> None:
        """Refuse, naming the mismatch and the fix, a checkpoint this run cannot continue exactly."""
        missing = [k for k in RESUME_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(RESUME_KEYS)
        if missing or not isinstance(ckpt["args"], dict):
            raise CheckpointError(f"{path} is not a dino.train checkpoint (it lacks {', '.join(missing) or 'args'}): "
                                  "move it out of --output-dir, or use another --output-dir.")
        old = ckpt["args"]
        changed = {k: (old.get(k), v) for k, v in plain_args(self.cfg).items()
                   if k in ARCHITECTURE_ARGS and old.get(k) != v}
        if changed:
            what = ", ".join(f"{k}: {was} -> {now}" for k, (was, now) in changed.items())
            raise ValueError(f"{path} belongs to a different model ({what}): use a new --output-dir, or the "
                             "checkpoint's settings to resume.")
        check_same_join(old, plain_args(self.cfg), str(path), "use a new --output-dir")
        if old.get("optimizer") != self.cfg.optimizer:
            raise ValueError(f"{path} was trained with --optimizer {old.get('optimizer')}, not "
                             f"{self.cfg.optimizer}: its optimizer state continues only the same optimizer. "
                             f"Resume with --optimizer {old.get('optimizer')}, or use a new --output-dir.")
        old_batch, batch = old.get("batch_size_per_gpu", 0), self.cfg.batch_size_per_gpu
        if old_batch * ckpt["world_size"] != batch * self.env.world_size:
            raise ValueError(f"{path} was trained with a global batch of {old_batch * ckpt['world_size']} "
                             f"({old_batch} per process x {ckpt['world_size']}), now {batch * self.env.world_size} "
                             f"({batch} x {self.env.world_size}): its schedules and position in the epoch count "
                             "iterations of that batch. Resume with the same --batch-size-per-gpu x processes, or "
                             "use a new --output-dir.")
        epoch, iteration = ckpt["epoch"], ckpt["iteration"]
        if ckpt.get("iterations_per_epoch", self.niter) != self.niter or \
                not epoch * self.niter <= iteration < (epoch + 1) * self.niter:
            raise ValueError(f"{path} was written at iteration {iteration} of epoch {epoch} with another number "
                             f"of iterations per epoch than now ({self.niter}): the data changed. Resume with the "
                             "same data, or use a new --output-dir.")

    def resume(self) -> tuple[int, int]:
        """Restore everything from ``checkpoint.pth`` if present; returns (epoch, global iteration)."""
        path = self.output_dir / CHECKPOINT
        if not path.is_file():
            return 0, 0
        ckpt = load_checkpoint(path)
        self.check_resumable(path, ckpt)
        epoch, iteration = ckpt["epoch"], ckpt["iteration"]
        s = self.step
        s.student_without_ddp.load_state_dict(ckpt["student"])
        s.teacher_without_ddp.load_state_dict(ckpt["teacher"])
        s.optimizer.load_state_dict(ckpt["optimizer"])
        s.dino_loss.load_state_dict(ckpt["dino_loss"])
        if s.scaler is not None and ckpt["scaler"] is not None:
            s.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], self.env)
        _logger.info("resumed from %s: epoch %d, iteration %d", path, epoch, iteration)
        return epoch, iteration


class DataError(RuntimeError):
    """The data stream of some process failed (e.g. no shard holds a sample); every process stops here."""

    def __init__(self, message: str, epoch: int, iteration: int) -> None:
        super().__init__(message)
        self.epoch, self.iteration = epoch, iteration


def agreed_batch_status(batch: Optional[SkippingBatch], error: Optional[Exception],
                        env: DistEnv) -> tuple[int, bool, bool]:
    """(unreadable images, some process has no image, some process's data failed), summed over processes.

    All processes take the same decision (step, skip the batch, or stop) from these sums, so one
    process's unreadable batch never leaves the others waiting in a collective.
    """
    status = torch.tensor([batch.num_skipped if batch is not None else 0,
                           batch is None or batch.data is None, error is not None], device=env.device)
    if env.distributed:
        dist.all_reduce(status)
    skipped, empty, failed = status.tolist()
    return int(skipped), bool(empty), bool(failed)


def next_batch(batches: Iterator[SkippingBatch]) -> tuple[Optional[SkippingBatch], Optional[Exception]]:
    """The next batch, or the data error that ended the stream (for ``agreed_batch_status``)."""
    try:
        return next(batches), None
    except UnreadableShardsError as e:  # from a DataLoader worker it comes with the worker's traceback
        return None, UnreadableShardsError(str(e).strip().splitlines()[-1].split("UnreadableShardsError: ")[-1])


def train_one_epoch(run: CheckpointedRun, loader, epoch: int, first_it: int, writer) -> EpochStats:
    """One epoch; an all-unreadable batch (on any process) is skipped on all and counted, not fatal."""
    cfg, env, step, niter = run.cfg, run.env, run.step, run.niter
    losses, num_skipped, skipped_batches = [], 0, 0
    global_batch = cfg.batch_size_per_gpu * env.world_size
    bar = tqdm(total=niter, initial=first_it, desc=f"epoch {epoch}/{cfg.epochs}", disable=not env.is_main,
               dynamic_ncols=True)
    batches = iter(loader)
    for it in range(first_it, niter):
        it_global = epoch * niter + it
        batch, error = next_batch(batches)
        skipped, empty, failed = agreed_batch_status(batch, error, env)
        if failed:
            raise DataError(str(error) if error is not None else "another process's data failed", epoch, it_global)
        num_skipped += skipped
        if empty:
            skipped_batches += 1
            _logger.warning("iteration %d: every image of a batch was unreadable, the batch is skipped (see the "
                            "warnings above)", it_global)
            bar.update()
            continue
        start = time.perf_counter()
        images = [crop.to(env.device, non_blocking=True) for crop in batch.data[0]]
        loss = step(images, epoch, it_global)
        losses.append(loss)
        images_per_s = global_batch / (time.perf_counter() - start)
        if env.is_main:
            scalars = dict(loss=loss, lr=step.lr[it_global], wd=step.wd[it_global],
                           momentum=step.momentum[it_global], teacher_temp=step.dino_loss.teacher_temp(epoch),
                           images_per_s=images_per_s)
            if step.join is not None:
                scalars["join"] = step.join(it_global)
            for name, value in scalars.items():
                writer.add_scalar(f"train/{name}", value, it_global)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scalars['lr']:.2e}", img_s=f"{images_per_s:.1f}")
        bar.update()
        if cfg.saveckp_iters and (it_global + 1) % cfg.saveckp_iters == 0 and it + 1 < niter:
            run.save(epoch, it_global + 1)
    bar.close()
    if not losses:  # never log an untrained epoch as a NaN loss and carry on
        raise DataError(f"no batch of epoch {epoch} had a readable image (see the warnings above)", epoch,
                        epoch * niter + first_it)
    return EpochStats(loss=float(np.mean(losses)), skipped_images=num_skipped, skipped_batches=skipped_batches,
                      bad_fraction=num_skipped / ((niter - first_it) * global_batch))


def replica_differences(step: DINOStep) -> dict[str, float]:
    """How far each process's loss centre, teacher and student BatchNorm running statistics (per-tensor
    sums) are from rank 0's: 0 when in sync."""
    teacher_sums = torch.stack([p.detach().double().sum() for p in step.teacher_without_ddp.parameters()])
    running_stats = [b.detach().double().sum() for m in step.student_without_ddp.modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in (m.running_mean, m.running_var)
                     if b is not None]
    return {"center": max_difference_across_ranks(step.dino_loss.center),
            "teacher": max_difference_across_ranks(teacher_sums),
            "student_batchnorm": max_difference_across_ranks(torch.stack(running_stats)) if running_stats else 0.0}


def train(cfg: DINOConfig) -> TrainResult:
    """Run (or resume) DINO pretraining in ``cfg.output_dir``, then export the fused teacher."""
    env = init_distributed(cfg.device)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    if env.device.type == "cuda":  # as DINO and OpenCLIP: fastest convolution algorithms, TF32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not is_repa_arch(cfg.arch):
        _logger.info("%s is not a RePa model: training it as a plain timm ViT baseline", cfg.arch)
        cfg = replace(cfg, idle_ratio=None, idle_schedule=None)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, env.device))
    random.seed(cfg.seed + env.rank)
    np.random.seed(cfg.seed + env.rank)
    torch.manual_seed(cfg.seed)  # the same initial weights everywhere (DDP also broadcasts them)

    # ============ preparing data: multi-crop views of folders, shards or the digits ============
    transform = DataAugmentationDINO(cfg.global_crops_scale, cfg.local_crops_scale, cfg.local_crops_number,
                                     cfg.global_crop_size, cfg.local_crop_size)
    dataset = build_dataset(cfg.data_source, cfg.data_path, transform, cfg.global_crop_size, cfg.shuffle_buffer,
                            cfg.allow_remote_shards, cfg.shard_streams)
    loader, sampler, niter = build_loader(dataset, env, cfg.batch_size_per_gpu, cfg.num_workers, cfg.seed,
                                          cfg.train_num_samples)

    # ============ networks, loss, optimizer and schedules: one DINO step ============
    step = build_step(cfg, env, niter)
    torch.manual_seed(cfg.seed + env.rank)  # augmentations and drop path differ across processes

    # ============ optionally resume training ============
    global_batch = cfg.batch_size_per_gpu * env.world_size
    run = CheckpointedRun(cfg, env, step, niter)
    start_epoch, start_iteration = run.resume()
    if sampler is not None:
        sampler.skip = (start_iteration - start_epoch * niter) * cfg.batch_size_per_gpu
    _logger.info("DINO on %s (%d images/step over %d process(es), %d iterations/epoch), %s, precision %s",
                 cfg.arch, global_batch, env.world_size, niter, env.device, cfg.precision)

    # ============ training loop: an epoch, a checkpoint, a log line ============
    writer = None
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "tb"), purge_step=start_iteration)
    stats: Optional[EpochStats] = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader.generator.manual_seed(epoch_seed(cfg.seed, env.rank, epoch))
            first_it = start_iteration - epoch * niter if epoch == start_epoch else 0
            if isinstance(dataset, ImageShards):  # the epoch's streams, past the batches already trained on
                dataset.set_epoch(epoch_seed(cfg.seed, env.rank, epoch), first_it, cfg.batch_size_per_gpu)
                if first_it:
                    _logger.info("resuming mid-epoch from shards: reading past (without decoding) the %d images "
                                 "of this epoch already trained on", first_it * cfg.batch_size_per_gpu)
            stats = replace(train_one_epoch(run, loader, epoch, first_it, writer), epoch=epoch,
                            world_size=env.world_size, max_difference_across_ranks=replica_differences(step),
                            center_norm=step.dino_loss.center.norm().item())
            keep = f"checkpoint{epoch:04d}.pth" if cfg.saveckp_freq and epoch % cfg.saveckp_freq == 0 else None
            run.save(epoch + 1, (epoch + 1) * niter, also=keep)
            if env.is_main:
                _logger.info("epoch %d: loss %.4f, %d unreadable images skipped (%.1f %% of those read), %d "
                             "all-unreadable batches skipped", epoch, stats.loss, stats.skipped_images,
                             100 * stats.bad_fraction, stats.skipped_batches)
                with open(output_dir / "log.txt", "a") as f:
                    f.write(json.dumps(stats.to_json()) + "\n")
            if stats.bad_fraction > cfg.max_bad_fraction:
                raise SystemExit(
                    f"DINO stopped: {100 * stats.bad_fraction:.1f} % of the images read in epoch {epoch} were "
                    f"unreadable, more than --max-bad-fraction {cfg.max_bad_fraction}. The run is saved in "
                    f"{output_dir / CHECKPOINT}. Fix or remove the files named in the warnings above (or raise "
                    "--max-bad-fraction), then start again with the same --output-dir to resume.")
    except DataError as e:
        saved = e.iteration > start_iteration
        if saved:
            run.save(e.epoch, e.iteration)
        where = (f"The run up to iteration {e.iteration} is saved in {output_dir / CHECKPOINT}" if saved else
                 "Nothing was trained since the last checkpoint, so nothing was written")
        raise SystemExit(f"DINO stopped at epoch {e.epoch}: {e} {where}.") from None
    except NonFiniteLossError as e:
        where = run.save_last_good_state(e)
        raise SystemExit(f"DINO stopped: {e}. {where}. Lower --lr or --clip-grad, raise --warmup-epochs, or use "
                         "--precision bf16/fp32, then start again with the same --output-dir to resume.") from None
    finally:
        if writer is not None:
            writer.close()
        if env.distributed:
            dist.destroy_process_group()

    # ============ export the fused teacher ============
    fused_export = None
    if cfg.export and env.is_main and is_repa_arch(cfg.arch):
        from .export import export_fused_teacher

        # Verified on this run's data as typed, never on the paths stored in checkpoint.pth.
        fused_export, _ = export_fused_teacher(output_dir / CHECKPOINT, output_dir / "teacher_fused.safetensors",
                                               cfg.data_source, cfg.data_path, allow_remote=cfg.allow_remote_shards)
    return TrainResult(config=cfg, checkpoint=output_dir / CHECKPOINT, fused_export=fused_export, last_epoch=stats,
                       resumed_at=start_iteration)


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    return train(DINOConfig(**vars(get_args_parser().parse_args(argv))))


if __name__ == "__main__":
    main(sys.argv[1:])
