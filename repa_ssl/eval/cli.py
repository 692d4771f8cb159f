"""Command-line pieces shared by ``python -m repa_ssl.eval.{knn,linear,zeroshot}``."""
from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..distributed import DistEnv, init_distributed, shutdown
from ..fusion import DEFAULT_RTOL
from .options import EvalOptions, EvalResult
from .towers import Tower, load_tower

__all__ = ["add_common_args", "check_output_dir", "setup", "common_options", "prepare_tower", "run_evaluation"]


def add_common_args(p: argparse.ArgumentParser, checkpoint_required: bool = True) -> argparse.ArgumentParser:
    p.add_argument("checkpoint", nargs=None if checkpoint_required else "?",
                   help="DINO checkpoint.pth, fused teacher .safetensors, OpenCLIP checkpoint (.pt, train or fused), "
                        "a plain timm state dict (e.g. the authors' RePaViT_Small.pth, with --model), or a timm / "
                        "OpenCLIP model name")
    p.add_argument("--model", default=None,
                   help="timm name for plain state dicts; OpenCLIP name for CLIP checkpoints without a sidecar JSON")
    p.add_argument("--checkpoint-key", default="teacher", choices=("teacher", "student"),
                   help="which network of a DINO checkpoint to evaluate")
    p.add_argument("--idle-ratio", type=float, default=None,
                   help="θ of a plain RePa state dict (default: the model's)")
    p.add_argument("--pretrained", nargs="?", const=True, default=False,
                   help="for a model name: load its published weights (OpenCLIP: give the tag)")
    p.add_argument("--batch-size", type=int, default=128, help="images per process")
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--image-size", type=int, default=None, help="crop size (default: the tower's input size)")
    p.add_argument("--resize-size", type=int, default=None, help="resize before the crop (default: crop × 256/224)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--fusion-rtol", type=float, default=DEFAULT_RTOL,
                   help="max relative error of the fused vs the train form on the first batch before refusing")
    p.add_argument("--throughput-repeats", type=int, default=5, help="timed batches for the throughput figure")
    p.add_argument("--output-dir", default="outputs/eval")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_output_dir(path: str | Path) -> Path:
    """Make ``path`` and write a probe file there, so an unwritable ``--output-dir`` fails before the work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OSError(e.errno, f"--output-dir {path} is not writable ({e.strerror or e}): the results could not be "
                               "saved there, so nothing was evaluated. Give a folder you can write to.") from None
    return path


def setup(args: argparse.Namespace) -> DistEnv:
    check_output_dir(args.output_dir)
    env = init_distributed(args.device)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    return env


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``EvalOptions`` fields from the flags of ``add_common_args``."""
    return {f.name: getattr(args, f.name) for f in fields(EvalOptions)}


def prepare_tower(args: argparse.Namespace, env: DistEnv, clip: bool = False) -> Tower:
    tower = load_tower(args.checkpoint, args.model, checkpoint_key=args.checkpoint_key, clip=clip,
                       idle_ratio=args.idle_ratio, pretrained=args.pretrained)
    tower.model.to(env.device)
    if args.image_size:
        tower.image_size = args.image_size
    return tower


def run_evaluation(args: argparse.Namespace, evaluate: Callable[[DistEnv], Optional[EvalResult]]
                   ) -> Optional[dict[str, Any]]:
    """The tail every evaluation command shares: check ``--output-dir``, start the processes, evaluate, write
    ``<stem>.json`` / ``.md`` (with the command line) on rank 0 and return that JSON there (None elsewhere)."""
    env = setup(args)
    result = evaluate(env)
    results = None
    if result is not None:
        results = dict(result.to_json(), args=vars(args))
        result.write(args.output_dir, dict(args=vars(args)))
    shutdown()
    return results
