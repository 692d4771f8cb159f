"""RePa model names: one table says which exist, which are RePa models and how they relate.

OpenCLIP 3.3.0's ``TimmModel`` passes no model kwargs to ``timm.create_model``, so a CLIP image
tower at θ = 0.5, or in its fused (deploy) form, needs a timm name of its own, and its CLIP an
OpenCLIP config of its own. ``FAMILIES`` lists each hand-written timm entrypoint once; the names
that only fix θ or the fused form are generated from it (``REPA_NAMES``). ``repa_vit.py`` registers
those entrypoints from it, and the tests check that ``model_configs/*.json`` agree with it.

Every caller asks this module, not the name's spelling:

>>> is_repa_name("repa_vit_small_patch16_224"), is_repa_name("vit_small_patch16_224")
(True, False)
>>> repa_variant_name("RePa-ViT-B-16", idle_ratio=0.5)
'RePa-ViT-B-16-idle50'
>>> repa_variant_name("repa_vit_base_patch16_clip_224_idle50", fused=True)
'repa_vit_base_patch16_clip_224_idle50_fused'
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

__all__ = [
    "DEFAULT_IDLE_RATIO", "FAMILIES", "REPA_NAMES", "RepaName", "find_repa_name", "is_repa_name",
    "repa_model_names", "repa_variant_name",
]

DEFAULT_IDLE_RATIO = 0.75  # θ of every entrypoint (the paper's default); names without an idle part have it
_IDLE_TAGS = {DEFAULT_IDLE_RATIO: "", 0.5: "idle50"}  # θ -> what a name says about it
_FUSED_TAG = "fused"
MERGED_BRANCHES = (2,)  # K of the merged (depth / K layers, fused) names each CLIP tower gets, e.g. B/16 12 -> 6

# (hand-written timm entrypoint: train form at θ = 0.75, its OpenCLIP config, θ that have names of their own).
# A CLIP image tower (a row with an OpenCLIP config) also gets, for each of its θ, a fused name and a merged
# name for each K of MERGED_BRANCHES (depth reparameterization: depth / K wide layers, fused; tag 'merged2').
FAMILIES: tuple[tuple[str, Optional[str], tuple[float, ...]], ...] = (
    ("repa_vit_tiny_patch16_224", None, (0.75,)),
    ("repa_vit_small_patch16_224", None, (0.75,)),
    ("repa_vit_base_patch16_224", None, (0.75,)),
    ("repa_vit_large_patch16_224", None, (0.75,)),
    ("repa_vit_huge_patch14_224", None, (0.75,)),
    ("repa_vit_huge_patch16_224", None, (0.75,)),
    ("repa_vit_base_patch16_clip_224", "RePa-ViT-B-16", (0.75, 0.5)),
    ("repa_vit_base_patch32_clip_224", "RePa-ViT-B-32", (0.75, 0.5)),
    ("repa_vit_large_patch14_clip_224", "RePa-ViT-L-14", (0.75, 0.5)),
    ("test_repa_vit", None, (0.75,)),
    ("test_repa_vit_clip", "RePa-ViT-Test", (0.75,)),
    ("demo_repa_vit", None, (0.75,)),
    ("demo_repa_vit_clip", "RePa-ViT-Demo", (0.75,)),
)


@dataclass(frozen=True)
class RepaName:
    """One RePa model name: its timm entrypoint, its OpenCLIP config, and what the name fixes."""

    timm_name: str
    clip_name: Optional[str]  # the CLIP with this image tower (None: a backbone only)
    family: str  # the hand-written entrypoint this name derives from
    idle_ratio: float
    fused: bool
    depth_branches: int = 1  # K > 1: the merged deploy form (depth / K layers), always fused

    @property
    def model_args(self) -> dict[str, Any]:
        """kwargs the name adds to its family's entrypoint (empty for the entrypoint itself)."""
        args: dict[str, Any] = {}
        if self.idle_ratio != DEFAULT_IDLE_RATIO:
            args["idle_ratio"] = self.idle_ratio
        if self.fused:
            args["inference_mode"] = True
        if self.depth_branches > 1:
            args["depth_branches"] = self.depth_branches
        return args


def _family_names(family: str, clip_name: Optional[str], idle_ratios: tuple[float, ...]) -> list[RepaName]:
    names = []
    forms = [(False, 1), (True, 1), *((True, k) for k in MERGED_BRANCHES)] if clip_name else [(False, 1)]
    for idle_ratio in idle_ratios:
        for fused, branches in forms:
            form_tag = f"merged{branches}" if branches > 1 else _FUSED_TAG if fused else ""
            tags = [t for t in (_IDLE_TAGS[idle_ratio], form_tag) if t]
            names.append(RepaName(
                timm_name="_".join([family, *tags]),
                clip_name="-".join([clip_name, *tags]) if clip_name else None,
                family=family, idle_ratio=idle_ratio, fused=fused, depth_branches=branches))
    return names


REPA_NAMES: tuple[RepaName, ...] = tuple(n for row in FAMILIES for n in _family_names(*row))
_BY_TIMM_NAME = {n.timm_name: n for n in REPA_NAMES}
_BY_CLIP_NAME = {n.clip_name: n for n in REPA_NAMES if n.clip_name}


def find_repa_name(name: str) -> Optional[RepaName]:
    """The table's entry for a timm name (``.tag`` allowed) or an OpenCLIP name; None if it is no RePa model."""
    return _BY_CLIP_NAME.get(name) or _BY_TIMM_NAME.get(name.split(".", 1)[0])


def is_repa_name(name: str) -> bool:
    """True for the timm and OpenCLIP names of the channel-idle RePa models."""
    return find_repa_name(name) is not None


def repa_model_names(library: Literal["timm", "open_clip"] = "timm", include_fused: bool = True) -> list[str]:
    """The RePa names ``library`` knows once ``repa_ssl`` is imported, sorted (as ``timm.list_models``)."""
    names = [n for n in REPA_NAMES if include_fused or not n.fused]
    if library == "open_clip":
        return sorted(n.clip_name for n in names if n.clip_name)
    return sorted(n.timm_name for n in names)


def repa_variant_name(name: str, idle_ratio: Optional[float] = None, fused: Optional[bool] = None,
                      depth_branches: Optional[int] = None) -> str:
    """The name, in ``name``'s library (timm or OpenCLIP), of the same model at θ = ``idle_ratio`` and/or fused,
    and/or merged by ``depth_branches`` (K > 1 implies fused; 1: not merged).

    Raises ``ValueError`` naming the variants that exist when there is no such name.
    """
    entry = find_repa_name(name)
    if entry is None:
        raise ValueError(f"{name!r} is not a RePa model; RePa models: {', '.join(repa_model_names())} (timm) "
                         f"and {', '.join(repa_model_names('open_clip'))} (OpenCLIP).")
    library = "open_clip" if name == entry.clip_name else "timm"
    branches = entry.depth_branches if depth_branches is None else depth_branches
    want = (entry.idle_ratio if idle_ratio is None else idle_ratio,
            (entry.fused or branches > 1) if fused is None else fused, branches)
    family = [n for n in REPA_NAMES if n.family == entry.family]
    for n in family:
        if (n.idle_ratio, n.fused, n.depth_branches) == want:
            return n.clip_name if library == "open_clip" else n.timm_name
    have = ", ".join(f"{n.clip_name if library == 'open_clip' else n.timm_name} (θ = {n.idle_ratio}"
                     f"{', fused' if n.fused else ''}{f', merged {n.depth_branches}' if n.depth_branches > 1 else ''})"
                     for n in family)
    hint = " (timm entrypoints take idle_ratio= and inference_mode=)" if library == "timm" else ""
    merged = f", merged {want[2]}" if want[2] > 1 else ""
    raise ValueError(f"{name!r} has no variant at θ = {want[0]}{', fused' if want[1] else ''}{merged}; "
                     f"its names are {have}{hint}.")
