"""DINO loss and schedules: hand-computed values, skipped same-view pairs, the centre's life cycle."""
import math

import numpy as np
import pytest
import torch

from dino.loss import DINOLoss
from dino.schedules import cosine_scheduler


def _softmax(row, temp):
    e = [math.exp(v / temp) for v in row]
    return [x / sum(e) for x in e]


def test_loss_matches_hand_computation():
    # batch 1, 3 crops (2 global + 1 local), 2 prototypes, centre 0, teacher temp 0.5, student temp 0.1
    student = [[0.1, 0.3], [0.2, -0.1], [0.0, 0.4]]
    teacher = [[1.0, 0.0], [0.0, 1.0]]
    loss_fn = DINOLoss(2, ncrops=3, warmup_teacher_temp=0.5, teacher_temp=0.5, warmup_teacher_temp_epochs=0,
                       nepochs=1)
    loss = loss_fn(torch.tensor(student), torch.tensor(teacher), epoch=0)

    terms = []
    for i in range(2):  # teacher global view i against every student view v != i
        p = _softmax(teacher[i], 0.5)
        for v in range(3):
            if v != i:
                q = _softmax(student[v], 0.1)
                terms.append(-sum(pi * math.log(qi) for pi, qi in zip(p, q)))
    assert len(terms) == 4  # 2 x 3 - 2: the same-view pairs are skipped
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_loss_computes_in_float64_when_given_float64_and_in_float32_from_half_precision():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    loss_fn = DINOLoss(5, 3, 0.04, 0.04, 0, 1)
    loss = loss_fn(student, teacher, 0)
    assert loss.dtype == torch.float64
    p, logq = torch.softmax(teacher / 0.04, -1).chunk(2), torch.log_softmax(student / 0.1, -1).chunk(3)
    terms = [-(p[i] * logq[v]).sum(-1).mean() for i in range(2) for v in range(3) if v != i]
    assert loss.item() == pytest.approx(sum(terms).item() / 4, rel=1e-12)  # float32 is off by ~1e-7
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher.mean(0, keepdim=True).float())
    assert DINOLoss(5, 3, 0.04, 0.04, 0, 1)(student.bfloat16(), teacher.bfloat16(), 0).dtype == torch.float32


def test_same_view_pairs_do_not_count():
    # When the student equals the teacher on its own views, only cross-view pairs carry loss:
    # swapping the teacher's two views must change the loss.
    torch.manual_seed(0)
    s = torch.randn(4 * 4, 8)
    t = s[:8].clone()
    loss_fn = DINOLoss(8, 4, 0.04, 0.04, 0, 1)
    same = loss_fn(s, t, 0).item()
    loss_fn = DINOLoss(8, 4, 0.04, 0.04, 0, 1)
    swapped = loss_fn(s, torch.cat([t[4:], t[:4]]), 0).item()
    assert same != pytest.approx(swapped)


def test_center_is_used_before_its_update_and_saved():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(4, 5) + 3.0
    loss_fn = DINOLoss(5, 3, 0.04, 0.04, 0, 1, center_momentum=0.9)
    first = loss_fn(student, teacher, 0)
    # The first loss used the zero centre ...
    fresh = DINOLoss(5, 3, 0.04, 0.04, 0, 1)
    assert first.item() == pytest.approx(fresh(student, teacher, 0).item())
    # ... and the centre then moved 10 % of the way to the batch mean of the teacher outputs.
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher.mean(0, keepdim=True))
    state = loss_fn.state_dict()
    assert "center" in state
    restored = DINOLoss(5, 3, 0.04, 0.04, 0, 1)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(student, teacher, 0), loss_fn(student, teacher, 0))


def test_teacher_temperature_warms_up_per_epoch():
    loss_fn = DINOLoss(4, 4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4, nepochs=10)
    temps = [loss_fn.teacher_temp(e) for e in range(10)]
    np.testing.assert_allclose(temps[:4], [0.04, 0.05, 0.06, 0.07])
    assert temps[4:] == [pytest.approx(0.07)] * 6


def test_cosine_schedule_warmup_endpoints_and_cosine():
    s = cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=2, warmup_epochs=1)
    assert len(s) == 8
    np.testing.assert_allclose(s[:2], [0.0, 1.0])  # linear warm-up, both end points included
    n = 6
    expected = [0.1 + 0.45 * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    np.testing.assert_allclose(s[2:], expected)
    rising = cosine_scheduler(0.04, 0.4, epochs=3, niter_per_ep=5)  # weight decay rises
    assert rising[0] == pytest.approx(0.04) and np.all(np.diff(rising) > 0)
