"""Decode any image a user's data may hold into an 8-bit RGB ``PIL.Image``.

Grayscale, palette, CMYK, RGBA (composited on white) and 16-bit images are converted;
anything that cannot be decoded raises ``BadImageError`` naming the file, which the
datasets catch, skip and count. So does an image larger than ``MAX_IMAGE_PIXELS``: its size
is read from the header and it is refused before decoding, since a few hundred KB of PNG can
claim 20000 x 20000 pixels (a decompression bomb) and take gigabytes and a minute to decode.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = ["BadImageError", "MAX_IMAGE_PIXELS", "load_rgb", "to_rgb"]

# Truncated JPEGs are corrupt input: never silently decode half an image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Pixel budget of one image (64 MP, e.g. 8000 x 8000): larger images are skipped and counted without
# being decoded. Raise it with the environment variable REPA_SSL_MAX_IMAGE_PIXELS (which also raises
# PIL's own decompression-bomb limit when it is lower).
def _pixel_budget(value: str) -> int:
    try:
        budget = int(value)
    except ValueError:
        budget = 0
    if budget < 1:
        raise ValueError(f"REPA_SSL_MAX_IMAGE_PIXELS={value!r} is not a positive whole number of pixels: set it "
                         "like REPA_SSL_MAX_IMAGE_PIXELS=100000000, or unset it for the default of 64,000,000.")
    return budget


MAX_IMAGE_PIXELS = _pixel_budget(os.environ.get("REPA_SSL_MAX_IMAGE_PIXELS", "64000000"))
if Image.MAX_IMAGE_PIXELS is not None and MAX_IMAGE_PIXELS > Image.MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


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


def load_rgb(source: Union[str, os.PathLike, bytes, BinaryIO], name: str = "",
             max_pixels: Optional[int] = None) -> Image.Image:
    """Open and fully decode ``source`` (a path, bytes or a file object) as RGB.

    Images above ``max_pixels`` (default ``MAX_IMAGE_PIXELS``) are refused from their header.
    """
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<bytes>")
    budget = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, bytes):
        if not source:
            raise BadImageError(f"{label}: empty (zero-byte) image")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget below decides
            img = Image.open(source)  # reads the header only
        with img:
            width, height = img.size
            if width * height > budget:
                raise BadImageError(
                    f"{label}: {width}x{height} {img.mode} image ({width * height:,} pixels) is above the budget "
                    f"of {budget:,} pixels, not decoded (set REPA_SSL_MAX_IMAGE_PIXELS to raise it)")
            img.load()
            return to_rgb(img)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:  # above PIL's own limit, before the size is known
        raise BadImageError(f"{label}: above the pixel budget, not decoded ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{label}: cannot decode image ({e})") from None
