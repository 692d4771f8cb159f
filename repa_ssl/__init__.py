"""RePa-SSL: channel-idle, reparameterizable ViTs for DINO and OpenCLIP pretraining.

Importing this package registers the ``repa_vit_*`` timm models and the ``RePa-ViT-*``
OpenCLIP configs, so ``timm.create_model`` and ``open_clip.create_model`` know them.
"""
from . import models  # noqa: F401  (registers the timm entrypoints)
from .checkpoint import CheckpointError, load_checkpoint, load_fused_tower, save_checkpoint, save_fused_tower
from .complexity import count_gmacs, count_params
from .depth import BranchGroup, branch_join, branch_model, branch_state_dict, join_stages, set_branch_join
from .factory import UnknownModelError, create_model
from .fusion import FusionError, FusionReport, fuse_model, has_unfused_repa_layers, is_fused, verify_fusion
from .layers import ChannelIdleMlp, ReparamChannelIdleMlp, RepaBlock, StateDictFormError
from .models import RepaVisionTransformer, find_repa_name, is_repa_name, repa_model_names, repa_variant_name
from .open_clip_models import fused_model_name, register_open_clip_configs, repa_clip_model_names
from .sync_batchnorm import convert_sync_batchnorm

register_open_clip_configs()

__version__ = "0.1.0"

__all__ = [
    "BranchGroup",
    "ChannelIdleMlp",
    "CheckpointError",
    "FusionError",
    "FusionReport",
    "RepaBlock",
    "RepaVisionTransformer",
    "ReparamChannelIdleMlp",
    "StateDictFormError",
    "UnknownModelError",
    "branch_join",
    "branch_model",
    "branch_state_dict",
    "convert_sync_batchnorm",
    "count_gmacs",
    "count_params",
    "create_model",
    "find_repa_name",
    "fuse_model",
    "fused_model_name",
    "has_unfused_repa_layers",
    "is_fused",
    "is_repa_name",
    "join_stages",
    "load_checkpoint",
    "load_fused_tower",
    "register_open_clip_configs",
    "repa_clip_model_names",
    "repa_model_names",
    "repa_variant_name",
    "save_checkpoint",
    "save_fused_tower",
    "set_branch_join",
    "verify_fusion",
]
