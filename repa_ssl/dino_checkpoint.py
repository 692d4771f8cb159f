"""The DINO checkpoint contract: what ``dino.train`` writes in ``checkpoint.pth``, and the one reader of its backbones.

A checkpoint is a dict with ``student`` and ``teacher`` (``MultiCropWrapper`` states: ``backbone.*``
and ``head.*``), ``args`` (the run's ``DINOConfig`` as plain data), ``epoch``, ``iteration`` and
what resuming needs (``optimizer``, ``dino_loss``, ``rng`` ...). A backbone is rebuilt from:

* ``args['arch']``: a registered timm name only (``stored_model_name``: never an ``hf-hub:`` or
  ``local-dir:`` name read from a file), with the run's ``idle_ratio`` / ``idle_schedule`` (None
  for a non-RePa arch: ``dino.train`` clears them);
* the stored weights: patch and image size (``vit_geometry``), so a run with ``--patch-size`` or
  another resolution loads at the geometry it was trained at;
* ``args['depth_branches']`` K > 1: the K-branch form (``repa_ssl.branch_model``); its join s is a buffer
  of the stored weights.

``dino.export`` and the evaluations (``repa_ssl.eval.load_tower``) both read through ``load_dino_backbone``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from . import branch_model
from .checkpoint import CheckpointError, unwrap_state_dict
from .factory import stored_model_name

__all__ = ["DINO_ENTRIES", "is_dino_checkpoint", "vit_geometry", "load_dino_backbone"]

DINO_ENTRIES = ("teacher", "student")
_BACKBONE = "backbone."


def is_dino_checkpoint(checkpoint: Any) -> bool:
    return isinstance(checkpoint, dict) and all(k in checkpoint for k in DINO_ENTRIES)


def vit_geometry(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """``img_size``/``patch_size`` that make a timm ViT's position embedding match the stored one."""
    patch = shapes["patch_embed.proj.weight"][-1]
    prefix = (1 if "cls_token" in shapes else 0) + (shapes["reg_token"][1] if "reg_token" in shapes else 0)
    grid = math.isqrt(shapes["pos_embed"][1] - prefix)
    if grid * grid != shapes["pos_embed"][1] - prefix:  # no_embed_class models store patches only
        grid = math.isqrt(shapes["pos_embed"][1])
    return dict(img_size=grid * patch, patch_size=patch)


def _backbone_state(checkpoint: dict[str, Any], entry: str, source: str) -> dict[str, torch.Tensor]:
    if entry not in DINO_ENTRIES:
        raise ValueError(f"the DINO network to load is 'teacher' or 'student', not {entry!r}")
    if entry not in checkpoint or not isinstance(checkpoint.get("args"), dict) or "arch" not in checkpoint["args"]:
        raise CheckpointError(f"{source} is not a DINO checkpoint: it needs '{entry}' and 'args' with 'arch', it has "
                              f"{sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__}.")
    state = {k.removeprefix(_BACKBONE): v for k, v in unwrap_state_dict(checkpoint, entry).items()
             if k.startswith(_BACKBONE)}
    if not state:
        raise CheckpointError(f"{source}: the {entry!r} entry has no 'backbone.' keys; it is not a DINO wrapper state.")
    return state


def load_dino_backbone(checkpoint: dict[str, Any], entry: str = "teacher", source: Optional[str] = None
                       ) -> nn.Module:
    """The train-form backbone (headless timm model) of a DINO checkpoint's ``entry``, strictly loaded.

    ``source`` names the checkpoint in errors (e.g. its path). A missing or unexpected key is an
    error, never a silently random layer.
    """
    import timm

    state = _backbone_state(checkpoint, entry, source or "the checkpoint")
    args = checkpoint["args"]
    arch = stored_model_name(args["arch"], f"{source} (args['arch'])" if source else "the checkpoint's args['arch']",
                             "timm")
    kwargs: dict[str, Any] = dict(num_classes=0, **vit_geometry({k: tuple(v.shape) for k, v in state.items()}))
    kwargs.update({k: args[k] for k in ("idle_ratio", "idle_schedule") if args.get(k) is not None})  # RePa only
    model = timm.create_model(arch, **kwargs)
    branches = int(args.get("depth_branches") or 1)
    if branches > 1:
        model = branch_model(model, branches)
    model.load_state_dict(state, strict=True)
    return model
