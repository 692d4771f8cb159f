"""Data pipelines shared by the DINO, CLIP and evaluation applications."""
from .digits import DIGIT_NAMES, load_digits_images
from .folder import RobustImageFolder, SkippingBatch, check_image_dir, collate_skipping
from .images import BadImageError, load_rgb, to_rgb
from .shards import ImageShards, count_shard_samples, expand_shards
from .verification import verification_batch

__all__ = [
    "BadImageError",
    "DIGIT_NAMES",
    "ImageShards",
    "RobustImageFolder",
    "SkippingBatch",
    "check_image_dir",
    "collate_skipping",
    "count_shard_samples",
    "expand_shards",
    "load_digits_images",
    "load_rgb",
    "to_rgb",
    "verification_batch",
]
