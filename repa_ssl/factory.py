"""Create any model the project evaluates or trains, by name: timm or OpenCLIP."""
from __future__ import annotations

import difflib
import logging
from contextlib import contextmanager
from typing import Any, Iterator, Literal

from torch import nn

from .models.names import repa_model_names

__all__ = ["UnknownModelError", "create_model", "stored_model_name", "weights_loaded_next"]


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
    close = difflib.get_close_matches(name, repa_model_names() + clip_names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}: it is neither a timm model nor an OpenCLIP config.{hint} "
        "RePa models: repa_ssl.repa_model_names() (timm) and repa_ssl.repa_model_names('open_clip'); "
        "they are registered by `import repa_ssl`."
    )


def _not_random_init_warning(record: logging.LogRecord) -> bool:
    return "initialized randomly" not in record.getMessage()


@contextmanager
def weights_loaded_next() -> Iterator[None]:
    """Create OpenCLIP models whose weights are loaded right after, without open_clip's warning that the
    model is "initialized randomly" (logged on the root logger), which would precede every evaluation or
    export of a trained model."""
    root = logging.getLogger()
    root.addFilter(_not_random_init_warning)
    try:
        yield
    finally:
        root.removeFilter(_not_random_init_warning)


def stored_model_name(name: Any, where: str, library: Literal["timm", "open_clip", "any"] = "any") -> str:
    """``name`` read from a file (checkpoint args, sidecar, ``params.txt``), if it is a registered model.

    timm and open_clip also take ``hf-hub:`` and ``local-dir:`` names, which download or open a
    path: a name read from a file must never choose those, only one typed on the command line.
    """
    import open_clip
    import timm

    known = isinstance(name, str) and (
        library in ("timm", "any") and timm.is_model(name) or library in ("open_clip", "any") and
        name in open_clip.list_models())
    if not known:
        kind = {"timm": "timm model", "open_clip": "OpenCLIP config", "any": "timm model or OpenCLIP config"}[library]
        raise UnknownModelError(
            f"{where} names the model {name!r}, which is not a registered {kind}: a model name read from a file "
            "must be one (hf-hub: and local-dir: names are taken only from the command line). Pass the model "
            "name on the command line, or fix the file.")
    return name
