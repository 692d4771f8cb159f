"""timm model family of channel-idle ViTs; importing it registers the entrypoints."""
from .names import REPA_NAMES, RepaName, find_repa_name, is_repa_name, repa_model_names, repa_variant_name
from .repa_vit import DEMO_VIT_ARGS, TEST_VIT_ARGS, RepaVisionTransformer, checkpoint_filter_fn

__all__ = [
    "DEMO_VIT_ARGS", "REPA_NAMES", "TEST_VIT_ARGS", "RepaName", "RepaVisionTransformer", "checkpoint_filter_fn",
    "find_repa_name", "is_repa_name", "repa_model_names", "repa_variant_name",
]
