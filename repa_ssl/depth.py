"""Depth reparameterization: train K joining branches per group of K layers, deploy one wide layer per group.

>>> model = timm.create_model("vit_tiny_patch16_224")        # or a RePa ViT, a CLIP, a DINO wrapper
>>> repa_ssl.branch_model(model, branches=4)                 # 12 blocks -> 3 groups of 4 branches, s = 1
>>> repa_ssl.set_branch_join(model, 0.0)                     # after the join schedule (s: 1 -> 0)
>>> deployed = repa_ssl.fuse_model(model)                    # 3 standard blocks with 4x the heads

s = 1 is the original model exactly, s = 0 the form that merges; ``join_stages`` says how s runs the two
stages of the design (``layers/branch_group.py``).
"""
from __future__ import annotations

import logging
import re
from typing import Optional

import torch
from torch import nn

from .layers.branch_group import BranchGroup, branch_group, join_stages

_logger = logging.getLogger(__name__)

__all__ = ["BranchGroup", "branch_join", "branch_model", "branch_state_dict", "join_stages", "set_branch_join"]

_BLOCK_LISTS = ("blocks", "resblocks")  # timm's VisionTransformer, OpenCLIP's Transformer


def branch_model(model: nn.Module, branches: int) -> nn.Module:
    """Group every ``branches`` consecutive blocks of ``model``'s image tower into a :class:`BranchGroup`, in place.

    The weights are taken over and the join starts at s = 1, so outputs are unchanged. Works on timm
    ViTs with standard blocks, our RePa ViTs (train form), OpenCLIP image towers and anything holding
    one (a CLIP model branches its image tower only). Returns ``model``.
    """
    if branches < 2:
        raise ValueError(f"branches must be at least 2 (the number of layers merged into one), got {branches}")
    if branch_join(model) is not None:
        raise ValueError(f"{type(model).__name__} already has depth branches")
    tower = model.visual if hasattr(model, "encode_image") else model  # never the text tower (branch before DDP)
    found = [(owner, name) for owner in tower.modules() for name in _BLOCK_LISTS
             if isinstance(getattr(owner, name, None), (nn.Sequential, nn.ModuleList))]
    if not found:
        raise ValueError(f"{type(model).__name__} has no block list ('blocks' or 'resblocks') to branch")
    for owner, name in found:
        _branch_block_list(owner, name, branches)
    _logger.info("branched %s: %d block list(s) in groups of %d, join s = 1", type(model).__name__, len(found),
                 branches)
    return model


def _branch_block_list(owner: nn.Module, name: str, branches: int) -> None:
    blocks = list(getattr(owner, name))
    if len(blocks) % branches:
        raise ValueError(f"{branches} branches must divide the depth, {len(blocks)} blocks in '{name}' "
                         f"(choose one of {[k for k in range(2, len(blocks) + 1) if len(blocks) % k == 0]})")
    groups = [branch_group(blocks[i:i + branches]) for i in range(0, len(blocks), branches)]
    setattr(owner, name, nn.Sequential(*groups) if isinstance(getattr(owner, name), nn.Sequential)
            else nn.ModuleList(groups))
    feature_info = getattr(owner, "feature_info", None)
    if isinstance(feature_info, list) and len(feature_info) == len(blocks):  # timm: one entry a block
        owner.feature_info = [dict(feature_info[(g + 1) * branches - 1], module=f"{name}.{g}")
                              for g in range(len(groups))]


def branch_state_dict(state_dict: dict[str, torch.Tensor], branches: int, blocks: str = "blocks"
                      ) -> dict[str, torch.Tensor]:
    """A deep model's state dict re-keyed for its ``branches``-branch form at s = 1.

    ``{blocks}.{i}.<key>`` becomes ``{blocks}.{i // K}.branches.{i % K}.<key>``, and each group gets its
    ``join`` (1: the deep model); a state dict that is already in branch form comes back as it is.
    """
    if any(re.match(rf"^{re.escape(blocks)}\.\d+\.(branches\.|join$)", k) for k in state_dict):
        return state_dict
    deep = re.compile(rf"^({re.escape(blocks)})\.(\d+)\.")

    def rekey(key: str) -> str:
        m = deep.match(key)
        if m is None:
            return key
        i = int(m.group(2))
        return f"{m.group(1)}.{i // branches}.branches.{i % branches}.{key[m.end():]}"

    out = {rekey(k): v for k, v in state_dict.items()}
    depth = 1 + max((int(m.group(2)) for k in state_dict if (m := deep.match(k))), default=-1)
    if depth % branches:
        raise ValueError(f"{branches} branches must divide the depth, {depth} blocks in the state dict")
    out.update({f"{blocks}.{g}.join": torch.tensor(1.0) for g in range(depth // branches)})
    return out


def _groups(model: nn.Module) -> list[BranchGroup]:
    return [m for m in model.modules() if isinstance(m, BranchGroup)]


def set_branch_join(model: nn.Module, s: float) -> None:
    """Set the join of every branch group of ``model``: 1 = the original deep model, 0 = mergeable.

    s in [0.5, 1] anneals λ = 2s - 1 (sequential -> parallel branches), s in [0, 0.5] raises
    μ = 1 - 2s (the FFNs' entries join); see :func:`join_stages`.
    """
    join_stages(s)  # validates
    groups = _groups(model)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no depth branches: call repa_ssl.branch_model first")
    for group in groups:
        group.set_join(s)


def branch_join(model: nn.Module) -> Optional[float]:
    """The join s of ``model``'s branch groups; None when it has none."""
    joins = {g.s for g in _groups(model)}
    if len(joins) > 1:
        raise ValueError(f"the branch groups of {type(model).__name__} are at different joins {sorted(joins)}; "
                         "set them with repa_ssl.set_branch_join")
    return joins.pop() if joins else None
