"""ONNX beside a fused tower's export, checked with onnxruntime: ``python -m repa_ssl.export``.

    python -m repa_ssl.export runs/dino/teacher_fused.safetensors
    # -> runs/dino/teacher_fused.onnx (input 'images', output 'embeddings', any batch size)
    python -m repa_ssl.export repa-b16-fused.pt
    # -> repa-b16-fused.onnx: the fused CLIP's image tower (encode_image, unnormalised)

The tower is loaded as the evaluations load it (the model named by its JSON sidecar), exported with
``torch.onnx``, and the ONNX model's embeddings are compared with the tower's on a batch of random
images by onnxruntime; no ONNX file is left unless they agree within ``--rtol`` (relative to the
largest embedding value). Graphs of 2 GB and more (ViT-H) need ONNX's external-data format, which
this command does not write.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .checkpoint import atomic_write
from .cli import HelpFormatter
from .fusion import is_fused

_logger = logging.getLogger(__name__)

__all__ = ["ExportError", "check_onnx", "export_onnx", "export_tower_onnx", "load_image_tower"]

ONNX_OPSET = 18
ONNX_RTOL = 1e-5


class ExportError(RuntimeError):
    """The ONNX model could not be checked, or gives other embeddings than the tower."""


def export_onnx(model: nn.Module, path: str | Path, input_size: Sequence[int], opset: int = ONNX_OPSET) -> Path:
    """Write ``model`` (in eval mode) as ONNX to ``path``, atomically, with a dynamic batch dimension."""
    model.eval()
    example = torch.zeros(1, *input_size, dtype=next(model.parameters()).dtype)
    with atomic_write(path) as tmp, torch.no_grad():
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
    return Path(path)


@torch.no_grad()
def check_onnx(path: str | Path, model: nn.Module, images: torch.Tensor, rtol: float = ONNX_RTOL) -> float:
    """Relative difference (max abs error / max abs value) of the ONNX model's embeddings on ``images``.

    Raises :class:`ExportError` when it exceeds ``rtol``.
    """
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError("checking an ONNX export needs onnxruntime: pip install onnxruntime "
                          "(it comes with this project's test extra: pip install -e '.[test]').") from e
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {"images": images.numpy()})[0]).double()
    ref = model.eval()(images).double()
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    if not err <= rtol:
        raise ExportError(f"the ONNX model {path} gives other embeddings than the PyTorch tower: relative error "
                          f"{err:.3g} > {rtol:.3g}.")
    return err


def load_image_tower(path: Path, model_name: Optional[str] = None) -> tuple[nn.Module, tuple[int, int, int]]:
    """The image tower saved at ``path`` and its input size (channels, height, width).

    A ``.safetensors`` tower export (``dino.export``) gives its timm model; an OpenCLIP checkpoint (e.g. a
    fused CLIP of ``clip.export``) gives its image tower (``model.visual``: embeddings as ``encode_image``).
    """
    from .eval.towers import load_tower

    clip = path.suffix != ".safetensors"
    tower = load_tower(path, model_name, clip=clip)
    return (tower.model.visual if clip else tower.model), (3, tower.image_size, tower.image_size)


def export_tower_onnx(tower: str | Path, output: Optional[str | Path] = None, model_name: Optional[str] = None,
                      opset: int = ONNX_OPSET, rtol: float = ONNX_RTOL, num_images: int = 2) -> Path:
    """Export the image tower saved at ``tower`` as ONNX, checked with onnxruntime; return the ONNX path.

    The ONNX file is written beside ``tower`` (same name, ``.onnx``) unless ``output`` is given; a file that
    fails the check is removed.
    """
    tower = Path(tower)
    output = Path(output) if output is not None else tower.with_suffix(".onnx")
    model, input_size = load_image_tower(tower, model_name)
    if not is_fused(model):
        _logger.warning("%s holds a train-form tower: its ONNX graph keeps the BatchNorms and the idle channels; "
                        "export the fused form (dino.export, clip.export) to ship it.", tower)
    export_onnx(model, output, input_size, opset)
    images = torch.randn(num_images, *input_size, generator=torch.Generator().manual_seed(0))
    try:
        err = check_onnx(output, model, images, rtol)
    except ExportError:
        output.unlink(missing_ok=True)
        raise
    _logger.info("wrote %s: onnxruntime gives the tower's embeddings within %.2g (relative)", output, err)
    return output


def main(argv: Optional[list[str]] = None) -> Path:
    p = argparse.ArgumentParser("python -m repa_ssl.export", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("tower", type=Path, help="a fused tower export (.safetensors with its .json sidecar, from "
                                            "dino.export) or a fused CLIP checkpoint (from clip.export)")
    p.add_argument("--model", default=None,
                   help="the OpenCLIP model a CLIP checkpoint holds, if its sidecar does not name it")
    p.add_argument("--output", type=Path, default=None, help="ONNX file to write (default: beside the tower, .onnx)")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset version")
    p.add_argument("--rtol", type=float, default=ONNX_RTOL,
                   help="largest relative difference of the ONNX model's embeddings that is accepted")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return export_tower_onnx(args.tower, args.output, args.model, args.opset, args.rtol)


if __name__ == "__main__":
    main()
