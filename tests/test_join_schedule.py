"""The join schedule: s from 1 to 0 over a share of training, then 0, from the global iteration alone."""
import argparse
import math

import pytest

from repa_ssl.join_schedule import JoinSchedule, add_join_arguments, check_same_join


def test_cosine_falls_from_one_to_zero_over_the_fraction_then_stays_zero():
    schedule = JoinSchedule(total=100, fraction=0.4)
    s = [schedule(i) for i in range(100)]
    assert schedule.join_iterations == 40
    assert s[0] == pytest.approx(0.5 * (1 + math.cos(math.pi / 40)))  # the first step already joins a little
    assert all(a > b for a, b in zip(s[:40], s[1:40]))  # strictly falling over the join
    assert s[39] == 0.0 and set(s[39:]) == {0.0}  # the last join iteration and all after train the merging form
    assert s[19] == pytest.approx(0.5)  # half-way down at the middle of a cosine


def test_linear_schedule_and_the_state_after_some_iterations():
    schedule = JoinSchedule(total=10, fraction=0.5, shape="linear")
    assert [schedule(i) for i in range(6)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0, 0.0])
    assert schedule.after(0) == 1.0  # an untrained model is the deep model
    assert schedule.after(3) == pytest.approx(0.4) and schedule.after(10) == 0.0


def test_fraction_zero_trains_the_merging_form_from_the_start_and_one_ends_at_the_last_iteration():
    assert {JoinSchedule(total=8, fraction=0.0)(i) for i in range(8)} == {0.0}
    full = JoinSchedule(total=8, fraction=1.0)
    assert full(6) > 0.0 and full(7) == 0.0 and full.after(8) == 0.0


def test_the_schedule_depends_on_the_iteration_only():
    """What a resumed run computes at iteration i equals the uninterrupted run's value."""
    a, b = JoinSchedule(total=50, fraction=0.6), JoinSchedule.from_args(
        {"join_fraction": 0.6, "join_schedule": "cosine"}, total=50)
    assert [a(i) for i in range(50)] == [b(i) for i in range(50)]


@pytest.mark.parametrize("kwargs, match", [(dict(fraction=1.5), r"--join-fraction .* \[0, 1\]"),
                                           (dict(shape="step"), "--join-schedule is one of cosine, linear")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JoinSchedule(total=10, **kwargs)


def test_command_line_flags():
    p = argparse.ArgumentParser()
    add_join_arguments(p)
    args = p.parse_args(["--depth-branches", "2", "--join_fraction", "0.25"])
    assert (args.depth_branches, args.join_fraction, args.join_schedule) == (2, 0.25, "cosine")
    with pytest.raises(SystemExit):
        p.parse_args(["--depth-branches", "0"])


def test_a_resume_under_other_depth_settings_is_refused():
    saved = dict(depth_branches=2, join_fraction=0.5, join_schedule="cosine", epochs=10)
    check_same_join(saved, dict(saved), "ckpt", "use a new --output-dir")  # same: fine
    check_same_join({}, dict(depth_branches=1, join_fraction=0.9), "ckpt", "x")  # no branches either way: fine
    with pytest.raises(ValueError, match=r"ckpt was trained with --depth-branches 2 --join-fraction 0.5 "
                                         r"--join-schedule cosine --epochs 10, not --depth-branches 2 "
                                         r"--join-fraction 0.25 .*"
                                         r"Resume with --depth-branches 2 .*or use a new --output-dir"):
        check_same_join(saved, dict(saved, join_fraction=0.25), "ckpt", "use a new --output-dir")
    with pytest.raises(ValueError, match="--depth-branches 1 .* not --depth-branches 2"):
        check_same_join({}, saved, "ckpt", "x")  # a deep checkpoint does not resume as a branch run
    with pytest.raises(ValueError, match="--epochs 10, not .*--epochs 20"):  # the join spans all iterations
        check_same_join(saved, dict(saved, epochs=20), "ckpt", "x")
