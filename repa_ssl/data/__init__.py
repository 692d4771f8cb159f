"""Data pipelines shared by the DINO, CLIP and evaluation applications."""
from .digits import load_digits_images

__all__ = ["load_digits_images"]
