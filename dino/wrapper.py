"""Run a backbone once per crop resolution and the head once on all crops."""
from __future__ import annotations

from itertools import groupby
from typing import Sequence, Union

import torch
from torch import nn

__all__ = ["MultiCropWrapper"]


class MultiCropWrapper(nn.Module):
    """``head(cat(backbone(cat(crops of one resolution)) for each resolution))``.

    Consecutive crops of the same size are concatenated into one backbone batch (2 global,
    then N local), so the output is crop-major: B rows of crop 0, then crop 1, and so on.
    State-dict keys are ``backbone.*`` and ``head.*``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = [
            self.backbone(torch.cat(list(group)))
            for _, group in groupby(crops, key=lambda crop: tuple(crop.shape[-2:]))
        ]
        return self.head(torch.cat(features))
