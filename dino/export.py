"""Export the fused teacher backbone of any DINO checkpoint, verified on real training images.

    python -m dino.export --checkpoint runs/dino/checkpoint0040.pth --data-path /datasets/imagenet/train
    # -> runs/dino/teacher_fused.safetensors (+ .json)

The teacher's BatchNorm running statistics (which it kept in train mode during DINO) are
folded into its channel-idle FFNs; the fused backbone must match the train form on a batch
of real images before anything is written. Those images come from ``--data-path`` (read as
``--data-source``, by default the run's): the data path stored in the checkpoint is shown but
never opened, since a checkpoint from elsewhere could name any file or, for shards, a shell
command. Only a run on the embedded digits needs no ``--data-path``.

A ``--depth-branches K`` run's teacher is merged in the same step, one wide block per group of K
branches, once its join has reached s = 0 (``FusionError`` before: finish the join schedule).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from repa_ssl.checkpoint import load_checkpoint, save_fused_tower, sidecar_source
from repa_ssl.data import verification_batch
from repa_ssl.dino_checkpoint import load_dino_backbone
from repa_ssl.eval.data import eval_transform
from repa_ssl.fusion import FusionReport, fuse_model, verify_fusion

from .data import DATA_SOURCES, build_dataset

_logger = logging.getLogger(__name__)

__all__ = ["export_fused_teacher", "verification_dataset"]


def verification_dataset(stored: dict[str, Any], data_source: Optional[str], data_path: Optional[str],
                         image_size: int, allow_remote: bool = False):
    """The images the fused model is checked on: from the command line, never from the checkpoint's paths.

    ``data_source`` defaults to the checkpoint's (it only picks a reader); ``data_path`` must be given
    unless that reader is the embedded digits.
    """
    source = data_source or stored.get("data_source")
    if data_path is None and source != "digits":
        raise ValueError(
            "give --data-path (and --data-source, if not the run's): a few real images to verify the fused model "
            f"on, e.g. the run's training data. The checkpoint records data_source={stored.get('data_source')!r}, "
            f"data_path={stored.get('data_path')!r}, but a path read from a file is never opened: it could name "
            "any file or a shell command.")
    # A verification batch needs no shuffle buffer: its images come without reading 1000 samples first.
    return build_dataset(source, data_path, eval_transform(image_size), image_size, shuffle_buffer=1,
                         allow_remote=allow_remote)


def export_fused_teacher(
        checkpoint_path: str | Path,
        output: Optional[str | Path] = None,
        data_source: Optional[str] = None,
        data_path: Optional[str] = None,
        num_images: int = 16,
        entry: str = "teacher",
        allow_remote: bool = False,
) -> tuple[Path, FusionReport]:
    """Fuse, verify (``FusionError`` if it does not match) and save the teacher backbone.

    The check runs on ``data_path`` read as ``data_source`` (see :func:`verification_dataset`),
    at the backbone's native resolution, the one evaluations use.
    """
    checkpoint_path = Path(checkpoint_path)
    output = Path(output) if output else checkpoint_path.parent / "teacher_fused.safetensors"
    checkpoint = load_checkpoint(checkpoint_path)
    backbone = load_dino_backbone(checkpoint, entry, str(checkpoint_path))
    a = checkpoint["args"]
    image_size = int(backbone.patch_embed.img_size[0])
    dataset = verification_dataset(a, data_source, data_path, image_size, allow_remote)
    fused = fuse_model(backbone)
    batch = verification_batch(dataset, num_images)
    report = verify_fusion(backbone, fused, batch).check(f"fused {entry} of {checkpoint_path}")
    metadata = dict(
        model_name=a["arch"],
        idle_ratios=list(backbone.idle_ratios),
        num_classes=0,
        fusion=report.as_dict(),
        image_size=image_size,
        source_checkpoint=sidecar_source(checkpoint_path, output),  # re-checked at evaluation when beside it
        source_entry=entry,
        epoch=int(checkpoint["epoch"]),
    )
    if a.get("patch_size") is not None:
        metadata["patch_size"] = a["patch_size"]
    if (a.get("depth_branches") or 1) > 1:  # built merged: timm.create_model(..., depth_branches=K)
        metadata["depth_branches"] = a["depth_branches"]
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
    p.add_argument("--data-path", default=None,
                   help="real images to verify the fused model on (an ImageFolder root or shards, as for dino.train); "
                        "needed unless the run used the embedded digits. The path stored in the checkpoint is "
                        "never opened.")
    p.add_argument("--data-source", default=None, choices=DATA_SOURCES,
                   help="how to read --data-path (default: the run's --data-source)")
    p.add_argument("--allow-remote-shards", action="store_true",
                   help="accept 'pipe:' (runs a shell command) and URL shard specs in --data-path")
    p.add_argument("--num-images", type=int, default=16, help="size of the verification batch")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path, _ = export_fused_teacher(args.checkpoint, args.output, args.data_source, args.data_path, args.num_images,
                                   args.entry, args.allow_remote_shards)
    return path


if __name__ == "__main__":
    main()
