"""Decode any image a user's data may hold into an 8-bit RGB ``PIL.Image``.

Grayscale, palette, CMYK, RGBA (composited on white) and 16-bit images are converted;
anything that cannot be decoded raises ``BadImageError`` naming the file, which the
datasets catch, skip and count.
"""
from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = ["BadImageError", "load_rgb", "to_rgb"]

# Truncated JPEGs are corrupt input: never silently decode half an image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImageError(ValueError):
    """An image file or sample could not be decoded."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(source: Union[str, os.PathLike, bytes, BinaryIO], name: str = "") -> Image.Image:
    """Open and fully decode ``source`` (a path, bytes or a file object) as RGB."""
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<bytes>")
    if isinstance(source, bytes):
        if not source:
            raise BadImageError(f"{label}: empty (zero-byte) image")
        source = io.BytesIO(source)
    try:
        with Image.open(source) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{label}: cannot decode image ({e})") from None
