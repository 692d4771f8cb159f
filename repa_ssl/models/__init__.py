"""timm model family of channel-idle ViTs; importing it registers the entrypoints."""
from .repa_vit import RepaVisionTransformer, checkpoint_filter_fn

__all__ = ["RepaVisionTransformer", "checkpoint_filter_fn"]
