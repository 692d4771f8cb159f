"""Building blocks of channel-idle (RePa) vision transformers."""
from .block import RepaBlock
from .channel_idle_mlp import ChannelIdleMlp, ReparamChannelIdleMlp, StateDictFormError
from .idle_ratio import linear_idle_ratios, num_active_channels, resolve_idle_ratios

__all__ = [
    "ChannelIdleMlp",
    "ReparamChannelIdleMlp",
    "RepaBlock",
    "StateDictFormError",
    "linear_idle_ratios",
    "num_active_channels",
    "resolve_idle_ratios",
]
