"""Throughput of one full DINO training step, RePa backbone vs the vanilla timm ViT, side by side.

    python -m dino.bench --arch repa_vit_small_patch16_224 --baseline vit_small_patch16_224 \
        --batch-size 8 --local-crops-number 2 --threads 2

A step is what ``dino.train`` runs per iteration (teacher forward on the 2 global crops,
student forward/backward on all crops, DINO loss, per-tensor clipping, AdamW, EMA update),
built by the same code, on random crops of a fixed batch. Runs are interleaved and the
median is reported (``repa_ssl.speed.measure_throughput``), so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from repa_ssl.complexity import count_params
from repa_ssl.distributed import init_distributed
from repa_ssl.precision import PRECISIONS, resolve_precision
from repa_ssl.speed import measure_throughput

from .train import DINOConfig, DINOStep, build_step

_logger = logging.getLogger("dino.bench")


def _runner(step: DINOStep, crops: list[torch.Tensor]):
    def run() -> None:
        step(crops, epoch=1, it=10)  # past the frozen-last-layer epoch: every parameter is updated
    return run


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser("dino.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="repa_vit_small_patch16_224")
    p.add_argument("--baseline", default="vit_small_patch16_224", help="vanilla timm ViT of the same size")
    p.add_argument("--idle-ratio", type=float, default=0.75)
    p.add_argument("--batch-size", type=int, default=8, help="images per step (each gives 2 + N crops)")
    p.add_argument("--local-crops-number", type=int, default=2)
    p.add_argument("--global-crop-size", type=int, default=224)
    p.add_argument("--local-crop-size", type=int, default=96)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = init_distributed(args.device)
    torch.manual_seed(0)
    g, loc, b = args.global_crop_size, args.local_crop_size, args.batch_size
    crops = [torch.randn(b, 3, g, g, device=env.device) for _ in range(2)]
    crops += [torch.randn(b, 3, loc, loc, device=env.device) for _ in range(args.local_crops_number)]

    runners, params = {}, {}
    for arch in (args.arch, args.baseline):
        repa = arch != args.baseline
        cfg = DINOConfig(arch=arch, idle_ratio=args.idle_ratio if repa else None,
                         idle_schedule=DINOConfig.idle_schedule if repa else None, batch_size_per_gpu=b,
                         local_crops_number=args.local_crops_number, global_crop_size=g, local_crop_size=loc,
                         out_dim=args.out_dim, epochs=2, warmup_epochs=1, precision=args.precision)
        step = build_step(cfg, env, niter=10)
        runners[arch] = _runner(step, crops)
        params[arch] = count_params(step.student_without_ddp.backbone) / 1e6
    results = measure_throughput(runners, batch_size=b, repeats=args.repeats, warmup=args.warmup, device=env.device,
                                 baseline=args.baseline, inference=False)
    report = {
        "device": str(env.device), "threads": torch.get_num_threads(), "batch_size": b,
        "crops": f"2x{g}px + {args.local_crops_number}x{loc}px", "out_dim": args.out_dim,
        "precision": resolve_precision(args.precision, env.device), "repeats": args.repeats,
        "models": {arch: dict(r, backbone_params_m=params[arch], speedup_vs_baseline=r["speedup"])
                   for arch, r in results.items()},
    }
    for arch, r in report["models"].items():
        _logger.info("%-32s %6.2f M params  %7.3f s/step  %7.2f images/s  x%.3f", arch, r["backbone_params_m"],
                     r["median_s"], r["images_per_s"], r["speedup_vs_baseline"])
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
