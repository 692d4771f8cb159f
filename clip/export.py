"""Export the fused (deploy) CLIP from an ``open_clip_train`` checkpoint of a RePa CLIP.

    python -m clip.export --checkpoint logs/repa-b16/checkpoints/epoch_32.pt --model RePa-ViT-B-16 \\
        --output repa-b16-fused.pt --images /data/laion400m/00000.tar

The image tower's channel-idle FFNs are fused (the text tower is untouched), the fused model is checked
against the train form on a batch of real images (``--images``: an image folder, a shard, or a brace
pattern of shards) and the export is refused when it differs by more than ``--rtol``. The result is a
plain CLIP state dict written with ``repa_ssl.save_checkpoint`` plus a JSON sidecar, and loads with

    open_clip.create_model("RePa-ViT-B-16-fused", pretrained="repa-b16-fused.pt")

A ``clip.train --depth-branches K`` run is exported with the same ``--depth-branches K``: its image tower is
merged in the same step, one wide block per group of K branches, once its join has reached s = 0
(``FusionError`` before: finish the join schedule), and loads as ``RePa-ViT-B-16-merged2`` (K = 2).

The sidecar names the source checkpoint; evaluations re-check the export against it only when the
two lie in the same folder (a path read from a file never picks a file elsewhere).
"""
from __future__ import annotations

import argparse
import logging
import tarfile
from pathlib import Path
from typing import Callable, Optional

import open_clip
import torch
from PIL import Image
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS

import repa_ssl
from repa_ssl.checkpoint import save_sidecar, sidecar_source, unwrap_state_dict
from repa_ssl.cli import positive_int
from repa_ssl.factory import weights_loaded_next
from repa_ssl.data import BadImageError, ImageShards, expand_shards, load_rgb, verification_batch
from repa_ssl.fusion import DEFAULT_RTOL, FusionReport
from repa_ssl.layers import StateDictFormError

_logger = logging.getLogger(__name__)

__all__ = ["export_fused_clip", "load_train_clip", "verification_images", "main"]


def load_train_clip(checkpoint: str | Path, model_name: str, depth_branches: int = 1
                    ) -> tuple[nn.Module, Callable[[Image.Image], torch.Tensor]]:
    """The train-form CLIP ``model_name`` with the weights of ``checkpoint``, and its eval preprocessing.

    ``checkpoint`` is an ``open_clip_train`` checkpoint (``epoch_N.pt``, ``epoch_latest.pt``, with or
    without DDP's ``module.`` prefix) or a bare state dict; ``depth_branches`` K > 1 for a
    ``clip.train --depth-branches K`` run (its join s is part of the weights).
    """
    entry = repa_ssl.find_repa_name(model_name)
    if entry is not None and entry.fused:
        raise ValueError(f"--model {model_name} is a deploy form: give the name the run was trained with "
                         f"(e.g. {repa_ssl.repa_variant_name(model_name, fused=False)}).")
    fused_name = repa_ssl.fused_model_name(model_name)  # also rejects non-RePa models with the list of ours
    with weights_loaded_next():
        model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    if depth_branches > 1:
        repa_ssl.branch_model(model, depth_branches)
    state_dict = unwrap_state_dict(repa_ssl.load_checkpoint(checkpoint))
    try:
        model.load_state_dict(state_dict, strict=True)
    except StateDictFormError:
        raise ValueError(f"{checkpoint} already holds a fused image tower: load it as it is with "
                         f"open_clip.create_model({fused_name!r}, pretrained={str(checkpoint)!r}).") from None
    except RuntimeError as e:
        raise ValueError(f"{checkpoint} does not match {model_name} with --depth-branches {depth_branches}: "
                         f"{str(e).splitlines()[0]} Check --model and --depth-branches (the run's flags; --model is in "
                         "params.txt in its log folder).") from None
    return model.eval(), preprocess


def _decoded(path: Path, transform: Callable[[Image.Image], torch.Tensor]) -> Optional[tuple[torch.Tensor, int]]:
    try:
        return transform(load_rgb(path)), 0
    except BadImageError as e:
        _logger.warning("skipping %s", e)
        return None


def verification_images(source: str | Path, num_images: int, transform: Callable[[Image.Image], torch.Tensor],
                        allow_remote: bool = False) -> torch.Tensor:
    """Up to ``num_images`` decodable images, transformed and stacked, from a folder of images, a folder of
    shards, a shard or a brace pattern of shards (read by the same ``ImageShards`` as DINO's pretraining;
    ``pipe:`` and URL shards only with ``allow_remote``)."""
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS) if path.is_dir() else []
    if path.is_dir() and not files and not any(path.glob("*.tar")):
        raise ValueError(f"no decodable images in {source}: --images needs an image folder, a .tar shard or a "
                         "brace pattern of shards ('/data/{00000..00003}.tar').")
    try:
        samples = (_decoded(p, transform) for p in files) if files else \
            ImageShards(expand_shards(source, allow_remote), transform=transform, shuffle_buffer=1, shuffle_initial=1)
        return verification_batch(samples, num_images, source=str(source))
    except (FileNotFoundError, tarfile.TarError) as e:
        raise ValueError(f"cannot read verification images from {source}: {e}") from None


def export_fused_clip(
        checkpoint: str | Path,
        model_name: str,
        output: str | Path,
        images: str | Path,
        num_images: int = 16,
        rtol: float = DEFAULT_RTOL,
        allow_remote: bool = False,
        depth_branches: int = 1,
) -> FusionReport:
    """Fuse (and merge, for ``depth_branches`` K > 1), verify (raise ``repa_ssl.FusionError`` above ``rtol``) and
    save; returns the report.

    Evaluations re-check the export against ``checkpoint`` only when both lie in the same folder.
    """
    output = Path(output)
    if output.suffix != ".pt":
        raise ValueError(f"--output must end in .pt (the JSON sidecar goes beside it), got {output}")
    model, preprocess = load_train_clip(checkpoint, model_name, depth_branches)
    deploy_name = repa_ssl.fused_model_name(model_name) if depth_branches == 1 else \
        repa_ssl.repa_variant_name(model_name, depth_branches=depth_branches)
    batch = verification_images(images, num_images, preprocess, allow_remote)
    fused = repa_ssl.fuse_model(model)
    report = repa_ssl.verify_fusion(model, fused, batch, rtol=rtol).check("fused CLIP image tower")
    _logger.info("fused image tower matches the train form on %d images: max abs err %.3g, max rel err %.3g",
                 report.num_samples, report.max_abs_err, report.max_rel_err)
    repa_ssl.save_checkpoint(fused.state_dict(), output)
    save_sidecar(output, {
        "model_name": deploy_name,
        "source_model": model_name,
        "fusion": report.as_dict(),
        "source_checkpoint": sidecar_source(checkpoint, output),
        **({"depth_branches": depth_branches} if depth_branches > 1 else {}),
    })
    _logger.info("exported %s: load it with open_clip.create_model(%r, pretrained=%r)", output, deploy_name,
                 str(output))
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("python -m clip.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="open_clip_train checkpoint (epoch_N.pt) or state dict")
    p.add_argument("--model", required=True, help="the RePa OpenCLIP model it was trained as, e.g. RePa-ViT-B-16")
    p.add_argument("--output", required=True, type=Path, help="fused CLIP state dict to write (.pt)")
    p.add_argument("--images", required=True,
                   help="real images for the check: image folder, .tar shard or brace pattern of shards")
    p.add_argument("--allow-remote-shards", action="store_true",
                   help="accept 'pipe:' (runs a shell command) and URL shard specs in --images")
    p.add_argument("--num-images", type=int, default=16, help="size of the verification batch")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help="largest accepted max|fused - train| / max|train| of the image embeddings")
    p.add_argument("--depth-branches", type=positive_int, default=1,
                   help="the run's --depth-branches K: its image tower is merged into one wide block per K branches")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s")
    export_fused_clip(args.checkpoint, args.model, args.output, args.images, args.num_images, args.rtol,
                      args.allow_remote_shards, args.depth_branches)


if __name__ == "__main__":
    main()
