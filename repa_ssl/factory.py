"""Create any model the project evaluates or trains, by name: timm or OpenCLIP."""
from __future__ import annotations

import difflib
from typing import Any

from torch import nn

__all__ = ["UnknownModelError", "create_model"]


class UnknownModelError(ValueError):
    """The name is neither a timm model nor an OpenCLIP config."""


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` for timm names, ``open_clip.create_model`` for OpenCLIP configs.

    Unknown names raise ``UnknownModelError`` listing the closest known ones.
    """
    import open_clip
    import timm

    if timm.is_model(name.split(".")[0]):
        return timm.create_model(name, **kwargs)
    clip_names = open_clip.list_models()
    if name in clip_names:
        return open_clip.create_model(name, **kwargs)
    close = difflib.get_close_matches(name, timm.list_models("*repa*") + clip_names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}: it is neither a timm model nor an OpenCLIP config.{hint} "
        "RePa models: timm.list_models('*repa*') and repa_ssl.repa_clip_model_names(); "
        "they are registered by `import repa_ssl`."
    )
