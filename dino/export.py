"""Export the fused teacher backbone of any DINO checkpoint, verified on real training images.

    python -m dino.export --checkpoint runs/dino/checkpoint0040.pth   # -> runs/dino/teacher_fused.safetensors

The teacher's BatchNorm running statistics (which it kept in train mode during DINO) are
folded into its channel-idle FFNs; the fused backbone must match the train form on a batch
of the run's own data before anything is written.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from repa_ssl.checkpoint import CheckpointError, load_checkpoint, save_fused_tower
from repa_ssl.data import verification_batch
from repa_ssl.fusion import FusionReport, fuse_model, verify_fusion

from .augment import eval_transform
from .backbone import build_backbone
from .data import build_dataset

_logger = logging.getLogger(__name__)

__all__ = ["export_fused_teacher", "load_teacher_backbone"]


def load_teacher_backbone(checkpoint: dict[str, Any], entry: str = "teacher"):
    """The train-form backbone of a DINO checkpoint's ``teacher`` (or ``student``), strictly loaded."""
    if entry not in checkpoint or "args" not in checkpoint:
        raise CheckpointError(f"not a DINO checkpoint: it needs '{entry}' and 'args', it has {sorted(checkpoint)}")
    a = checkpoint["args"]
    backbone = build_backbone(a["arch"], a.get("idle_ratio"), a.get("idle_schedule"), a.get("patch_size"))
    prefix = "backbone."
    state = {k.removeprefix("module.")[len(prefix):]: v for k, v in checkpoint[entry].items()
             if k.removeprefix("module.").startswith(prefix)}
    backbone.load_state_dict(state, strict=True)
    return backbone


def export_fused_teacher(
        checkpoint_path: str | Path,
        output: Optional[str | Path] = None,
        data_source: Optional[str] = None,
        data_path: Optional[str] = None,
        num_images: int = 16,
        entry: str = "teacher",
) -> tuple[Path, FusionReport]:
    """Fuse, verify (``FusionError`` if it does not match) and save the teacher backbone."""
    checkpoint_path = Path(checkpoint_path)
    output = Path(output) if output else checkpoint_path.parent / "teacher_fused.safetensors"
    checkpoint = load_checkpoint(checkpoint_path)
    a = checkpoint["args"]
    backbone = load_teacher_backbone(checkpoint, entry)
    fused = fuse_model(backbone)
    size = a["global_crop_size"]
    dataset = build_dataset(data_source or a["data_source"], data_path or a["data_path"], eval_transform(size), size)
    batch = verification_batch(dataset, num_images)
    report = verify_fusion(backbone, fused, batch).check(f"fused {entry} of {checkpoint_path}")
    metadata = dict(
        model_name=a["arch"],
        idle_ratios=list(backbone.idle_ratios),
        num_classes=0,
        fusion=report.as_dict(),
        image_size=int(backbone.patch_embed.img_size[0]),
        global_crop_size=size,
        source=f"{checkpoint_path}:{entry}",
        epoch=int(checkpoint["epoch"]),
    )
    if a.get("patch_size") is not None:
        metadata["patch_size"] = a["patch_size"]
    save_fused_tower(fused, output, metadata)
    _logger.info("exported the fused %s (epoch %d, max rel. error %.2e on %d images) to %s",
                 entry, checkpoint["epoch"], report.max_rel_err, report.num_samples, output)
    return output, report


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser("dino.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a DINO checkpoint (checkpoint.pth or checkpointNNNN.pth)")
    p.add_argument("--output", default=None, help="default: teacher_fused.safetensors next to the checkpoint")
    p.add_argument("--entry", default="teacher", choices=("teacher", "student"))
    p.add_argument("--data-source", default=None, help="verification data (default: the run's)")
    p.add_argument("--data-path", default=None, help="verification data (default: the run's)")
    p.add_argument("--num-images", type=int, default=16)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path, _ = export_fused_teacher(args.checkpoint, args.output, args.data_source, args.data_path, args.num_images,
                                   args.entry)
    return path


if __name__ == "__main__":
    main()
