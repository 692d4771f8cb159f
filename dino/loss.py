"""The DINO loss: cross-entropy between the centred, sharpened teacher and the student.

Same interface as the reference ``DINOLoss`` so results are comparable; the centre is a
buffer, so it lives in ``state_dict()`` and is checkpointed with the run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repa_ssl.distributed import all_reduce_mean

from .schedules import teacher_temp_schedule

__all__ = ["DINOLoss"]


def _loss_dtype(*outputs: torch.Tensor) -> torch.dtype:
    """float32 for half-precision head outputs (softmax under autocast is float32), float64 kept as given."""
    dtype = torch.float32
    for t in outputs:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class DINOLoss(nn.Module):
    """Sum over (teacher global view i, student view v != i) of ``-p_t log p_s``, averaged.

    ``student_output`` is crop-major (B rows of crop 0, then crop 1, ...) for ``ncrops``
    crops; ``teacher_output`` holds the 2 global crops. The teacher temperature follows a
    per-epoch linear warm-up. After the loss is computed, the centre moves towards the batch
    mean of the raw teacher outputs (averaged over all processes).
    """

    center: torch.Tensor

    def __init__(
            self,
            out_dim: int,
            ncrops: int,
            warmup_teacher_temp: float,
            teacher_temp: float,
            warmup_teacher_temp_epochs: int,
            nepochs: int,
            student_temp: float = 0.1,
            center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        dtype = _loss_dtype(student_output, teacher_output)
        student_logp = F.log_softmax(student_output.to(dtype) / self.student_temp, dim=-1).chunk(self.ncrops)
        temp = self.teacher_temp(epoch)
        teacher_p = F.softmax((teacher_output.to(dtype) - self.center) / temp, dim=-1).detach().chunk(2)

        total_loss, n_loss_terms = 0.0, 0
        for iq, q in enumerate(teacher_p):
            for v, logp in enumerate(student_logp):
                if v == iq:
                    continue  # the student's view of the same crop is not a target
                total_loss = total_loss + torch.sum(-q * logp, dim=-1).mean()
                n_loss_terms += 1
        self.update_center(teacher_output)
        return total_loss / n_loss_terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the batch mean of the teacher outputs, identical on every process."""
        batch_center = all_reduce_mean(teacher_output.to(_loss_dtype(teacher_output)).mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
