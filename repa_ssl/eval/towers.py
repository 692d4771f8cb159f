"""The evaluations' one loading step and one fusion-and-verify step.

``load_tower`` accepts everything the evaluations consume and tells the kind apart by
content, not by file name:

* a DINO checkpoint (``checkpoint.pth``: ``teacher``/``student``/``args``), teacher or student
  backbone, built from ``args['arch']`` with the run's idle ratios;
* a fused teacher export (``teacher_fused.safetensors`` + JSON sidecar);
* an OpenCLIP checkpoint, train form (open_clip_train's ``epoch_N.pt``) or fused form
  (``<file>.pt`` + sidecar), the model name from the argument, the sidecar or the run's ``params.txt``;
* a plain timm state dict such as the RePaViT authors' released checkpoints (needs the timm
  name; loaded through timm's pretrained machinery and our checkpoint filter);
* a timm or OpenCLIP model name (vanilla baselines).

``fuse_and_verify`` then swaps in the fused tower after comparing both forms on real images.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import open_clip
import timm
import torch
from safetensors import safe_open
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint, load_fused_tower, sidecar_source_path, unwrap_state_dict
from ..complexity import count_params
from ..dino_checkpoint import is_dino_checkpoint, load_dino_backbone, vit_geometry
from ..factory import UnknownModelError, create_model, stored_model_name, weights_loaded_next
from ..fusion import DEFAULT_RTOL, FusionError, fuse_model, has_unfused_repa_layers, is_fused, verify_fusion
from ..models import is_repa_name
from ..open_clip_models import fused_model_name

_logger = logging.getLogger(__name__)

__all__ = ["Tower", "load_tower", "fuse_and_verify"]

_FUSED_FFN_KEY = ".mlp.linear.weight"  # only the deploy-form FFN has this key


@dataclass
class Tower:
    """A model ready for evaluation, plus where it came from and how to preprocess for it."""

    model: nn.Module  # a timm image tower (num_classes=0) or, for zero-shot, an OpenCLIP CLIP model
    name: str  # timm or OpenCLIP model name
    kind: str  # dino | fused_export | clip | timm_checkpoint | model_name
    source: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    fusion: Optional[dict[str, Any]] = None  # filled in by fuse_and_verify
    params_train_m: Optional[float] = None

    @property
    def is_clip(self) -> bool:
        return hasattr(self.model, "encode_image")

    def summary(self) -> dict[str, Any]:
        return dict(name=self.name, kind=self.kind, source=self.source, image_size=self.image_size,
                    fusion=self.fusion, params_train_m=self.params_train_m)


def _timm_tower(model: nn.Module, name: str, kind: str, source: str, **extra: Any) -> Tower:
    cfg = model.pretrained_cfg
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None) or cfg["input_size"][-2:]
    return Tower(model=model.eval(), name=name, kind=kind, source=source, image_size=int(img_size[0]),
                 mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), **extra)


def _clip_tower(model: nn.Module, name: str, kind: str, source: str, clip: bool, **extra: Any) -> Tower:
    pp = model.visual.preprocess_cfg
    if clip:
        return Tower(model=model.eval(), name=name, kind=kind, source=source, image_size=int(pp["size"][0]),
                     mean=tuple(pp["mean"]), std=tuple(pp["std"]), **extra)
    trunk = getattr(model.visual, "trunk", None)
    if trunk is None:
        raise ValueError(
            f"{name}'s image tower is OpenCLIP's own VisionTransformer, not a timm model; k-NN and linear probes "
            "read class tokens from timm towers. Use the timm twin of the weights instead (e.g. "
            "'vit_base_patch16_clip_224.laion2b' with --pretrained), or run the zero-shot evaluation.")
    tower = _timm_tower(trunk, name, kind, source, **extra)
    tower.mean, tower.std = tuple(pp["mean"]), tuple(pp["std"])
    return tower


def _from_dino(path: Path, ckpt: dict[str, Any], key: str) -> Tower:
    model = load_dino_backbone(ckpt, key, str(path))
    arch = ckpt["args"]["arch"]
    _logger.info("loaded the %s backbone of DINO checkpoint %s (%s, epoch %s)", key, path, arch, ckpt.get("epoch"))
    meta = dict(checkpoint_key=key, epoch=ckpt.get("epoch"), args=ckpt["args"])
    return _timm_tower(model, arch, "dino", str(path), metadata=meta)


def _from_fused_export(path: Path) -> Tower:
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    model, meta = load_fused_tower(path, **vit_geometry(shapes))
    _logger.info("loaded fused tower export %s (%s)", path, meta["model_name"])
    return _timm_tower(model, meta["model_name"], "fused_export", str(path), metadata=meta)


def _clip_model_name(path: Path, model_name: Optional[str]) -> tuple[str, dict[str, Any]]:
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if model_name:
        return model_name, meta
    if "model_name" in meta:
        return stored_model_name(meta["model_name"], str(sidecar), "open_clip"), meta
    params = path.parent.parent / "params.txt"  # open_clip_train: <logs>/<name>/{params.txt,checkpoints/}
    if params.is_file():
        for line in params.read_text().splitlines():
            if line.startswith("model:"):
                return stored_model_name(line.split(":", 1)[1].strip(), str(params), "open_clip"), meta
    raise ValueError(f"cannot tell which OpenCLIP model {path} holds: pass the model name (e.g. RePa-ViT-B-16).")


def _from_clip(path: Path, state: dict[str, torch.Tensor], model_name: Optional[str], clip: bool) -> Tower:
    name, meta = _clip_model_name(path, model_name)
    fused_state = any(k.startswith("visual.") and k.endswith(_FUSED_FFN_KEY) for k in state)
    if fused_state and not name.endswith("-fused"):
        name = fused_model_name(name)
    with weights_loaded_next():
        model = open_clip.create_model(name)
    model.load_state_dict(state, strict=True)
    _logger.info("loaded OpenCLIP checkpoint %s as %s", path, name)
    return _clip_tower(model, name, "clip", str(path), clip, metadata=meta)


def _from_timm_checkpoint(path: Path, state: dict[str, torch.Tensor], model_name: Optional[str],
                          idle_ratio: Optional[float]) -> Tower:
    if not model_name:
        raise ValueError(f"{path} is a plain state dict: pass the timm model name it belongs to "
                         "(e.g. repa_vit_small_patch16_224 for the authors' RePaViT_Small.pth).")
    kwargs: dict[str, Any] = {}
    if is_repa_name(model_name):
        if idle_ratio is not None:
            kwargs["idle_ratio"] = idle_ratio
        kwargs["inference_mode"] = any(k.endswith(_FUSED_FFN_KEY) for k in state)
    # timm's pretrained path: weights_only loading plus the model's checkpoint filter (authors' key names).
    # Built with its classifier so that loading stays strict, then headless.
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    model.reset_classifier(0)
    _logger.info("loaded %s into %s", path, model_name)
    return _timm_tower(model, model_name, "timm_checkpoint", str(path))


def _from_name(name: str, clip: bool, pretrained: Union[bool, str]) -> Tower:
    if timm.is_model(name.split(".")[0]) and not clip:
        model = timm.create_model(name, pretrained=bool(pretrained), num_classes=0)
        return _timm_tower(model, name, "model_name", name)
    if name in open_clip.list_models():
        tag = pretrained if isinstance(pretrained, str) else None
        model = open_clip.create_model(name, pretrained=tag)
        return _clip_tower(model, name, "model_name", f"{name}:{tag}" if tag else name, clip)
    if clip:
        raise ValueError(f"{name!r} is not an OpenCLIP model: zero-shot needs a CLIP checkpoint or OpenCLIP name.")
    create_model(name)  # not a known name: raises UnknownModelError listing the closest ones
    raise UnknownModelError(name)


def load_tower(
        source: Union[str, Path],
        model_name: Optional[str] = None,
        *,
        checkpoint_key: str = "teacher",
        clip: bool = False,
        idle_ratio: Optional[float] = None,
        pretrained: Union[bool, str] = False,
) -> Tower:
    """Load whatever ``source`` names (a checkpoint file or a model name) in eval mode.

    ``clip=True`` returns the whole OpenCLIP model (zero-shot); otherwise the timm image tower.
    ``model_name`` is needed for plain state dicts and CLIP checkpoints without a sidecar;
    ``idle_ratio`` overrides θ for plain RePa state dicts; ``pretrained`` (True or an
    OpenCLIP tag) loads a named model's published weights.
    """
    path = Path(source)
    if not path.exists():
        if path.suffix in (".pth", ".pt", ".safetensors", ".bin") or "/" in str(source):
            raise FileNotFoundError(f"checkpoint {path} does not exist: check the path.")
        return _from_name(str(source), clip, pretrained)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give the checkpoint file (e.g. <output_dir>/checkpoint.pth).")
    if path.suffix == ".safetensors":
        if clip:
            raise ValueError(f"{path} is an image-tower export; zero-shot needs a CLIP checkpoint.")
        return _from_fused_export(path)
    ckpt = load_checkpoint(path)
    if is_dino_checkpoint(ckpt):
        if clip:
            raise ValueError(f"{path} is a DINO checkpoint (image tower only); zero-shot needs a CLIP checkpoint.")
        return _from_dino(path, ckpt, checkpoint_key)
    state = unwrap_state_dict(ckpt)
    if any(k.startswith("visual.") for k in state):
        return _from_clip(path, state, model_name, clip)
    if clip:
        raise ValueError(f"{path} holds no OpenCLIP model (no 'visual.' keys); zero-shot needs a CLIP checkpoint.")
    return _from_timm_checkpoint(path, state, model_name, idle_ratio)


def _source_train_form(tower: Tower) -> Optional[Tower]:
    """The train-form model an export was fused from, when its sidecar names a checkpoint beside it.

    The sidecar is read from a file, so it never chooses a file elsewhere (see ``sidecar_source_path``)
    nor a model name that is not registered.
    """
    meta = tower.metadata
    recorded, entry = meta.get("source_checkpoint"), meta.get("source_entry", "teacher")
    if recorded is None:  # older exports: "source": "<checkpoint>" or, from dino.export, "<checkpoint>:<entry>"
        recorded = meta.get("source")
        if isinstance(recorded, str) and recorded.endswith((":teacher", ":student")):
            recorded, _, entry = recorded.rpartition(":")
    source = sidecar_source_path(tower.source, recorded)
    if source is None:
        return None
    try:
        model_name = meta.get("source_model")
        if model_name is not None:
            model_name = stored_model_name(model_name, f"the sidecar of {tower.source}")
        return load_tower(source, model_name, checkpoint_key=entry, clip=tower.is_clip)
    except (CheckpointError, ValueError, RuntimeError) as e:
        _logger.warning("cannot load the export's source %s to re-check the fusion (%s)", source, e)
        return None


def fuse_and_verify(tower: Tower, images: torch.Tensor, rtol: float = DEFAULT_RTOL) -> Tower:
    """Put the fused form in ``tower.model``, after checking it against the train form on ``images``.

    Stores the max absolute / relative error in ``tower.fusion`` and raises ``FusionError`` above
    ``rtol``. An already fused tower (an export) is checked against the train-form checkpoint its
    sidecar names when that file lies in the export's folder, else keeps the report written at export time; a vanilla
    model has nothing to fuse (``tower.fusion`` stays None).
    """
    model = tower.model
    if has_unfused_repa_layers(model):
        tower.params_train_m = count_params(model) / 1e6
        fused = fuse_model(model)
        report = verify_fusion(model, fused, images, rtol=rtol)
        tower.fusion = dict(report.as_dict(), verified_on="first evaluation batch")
        _logger.info("fused %s vs train form on %d evaluation images: max abs err %.3g, max rel err %.3g (tol %.1g)",
                     tower.name, report.num_samples, report.max_abs_err, report.max_rel_err, rtol)
        report.check(f"fused {tower.name}")
        tower.model = fused
    elif is_fused(model):
        train = _source_train_form(tower)
        if train is not None:
            report = verify_fusion(train.model.to(images.device), model, images, rtol=rtol)
            tower.fusion = dict(report.as_dict(), verified_on=f"first evaluation batch, against {train.source}")
            _logger.info("export %s vs its train-form source %s: max abs err %.3g, max rel err %.3g (tol %.1g)",
                         tower.source, train.source, report.max_abs_err, report.max_rel_err, rtol)
            report.check(f"exported {tower.name}")
        else:
            stored = tower.metadata.get("fusion")
            tower.fusion = dict(stored or {}, verified_on="at export (train-form source not found beside the export)")
            _logger.info("%s is already fused and its source checkpoint is not in its folder; using the check "
                         "stored with the export: %s", tower.source, stored)
            if stored is not None and not stored.get("ok", True):
                raise FusionError(f"{tower.source} was exported with a failed fusion check ({stored}); re-export it.")
    else:
        _logger.info("%s has no channel-idle FFN (vanilla model): nothing to fuse", tower.name)
    return tower
