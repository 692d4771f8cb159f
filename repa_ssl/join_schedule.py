"""The join schedule of a depth-branch run: s from 1 (the deep model) to 0 (the form that merges).

``dino.train`` and ``clip.train`` set ``repa_ssl.set_branch_join(model, s)`` before every iteration
with ``s = JoinSchedule(...)(iteration)``. The value depends on the global iteration and the run's
settings only, so a resumed run continues the same curve: a checkpoint holds its iteration and the
settings (``--depth-branches``, ``--join-fraction``, ``--join-schedule``, and ``--epochs``, since the
join spans a share of all the run's iterations), and a resume with other settings is refused
(``check_same_join``).

s falls over the first ``fraction`` of the run's iterations and is 0 from the last of them on, so
the end of the run trains, and saves, the form that merges; ``fraction`` 0 trains that form from the start.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Mapping

from .cli import positive_int

__all__ = ["JOIN_ARGS", "JOIN_SCHEDULES", "JoinSchedule", "add_join_arguments", "check_same_join"]

JOIN_SCHEDULES = ("cosine", "linear")
# The settings a checkpoint's join continues only under (as a run's argument names), and their defaults.
JOIN_ARGS = ("depth_branches", "join_fraction", "join_schedule", "epochs")
_DEFAULTS = dict(depth_branches=1, join_fraction=0.5, join_schedule="cosine")


@dataclass(frozen=True)
class JoinSchedule:
    """s for each global iteration of a run of ``total`` iterations.

    Over the first ``round(fraction * total)`` iterations s falls from 1 towards 0, along half a cosine
    (``cosine``) or a straight line (``linear``), reaching 0 at the last of them; later iterations train at 0.
    """

    total: int
    fraction: float = 0.5
    shape: str = "cosine"

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"--join-fraction is the share of training over which the branches join, in [0, 1]; "
                             f"got {self.fraction}")
        if self.shape not in JOIN_SCHEDULES:
            raise ValueError(f"--join-schedule is one of {', '.join(JOIN_SCHEDULES)}, not {self.shape!r}")

    @property
    def join_iterations(self) -> int:
        """How many iterations the join lasts (the last of them trains at s = 0)."""
        return min(self.total, round(self.fraction * self.total))

    def __call__(self, iteration: int) -> float:
        """The s global iteration ``iteration`` (from 0) trains at."""
        span = self.join_iterations
        t = 1.0 if iteration + 1 >= span else (iteration + 1) / span
        return 1.0 - t if self.shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))

    def after(self, iterations_done: int) -> float:
        """The s of a model saved after ``iterations_done`` iterations: 1 before any, else the last one's."""
        return 1.0 if iterations_done <= 0 else self(iterations_done - 1)

    @classmethod
    def from_args(cls, args: Mapping[str, Any], total: int) -> "JoinSchedule":
        """The schedule of a run whose (checkpoint) arguments are ``args``."""
        return cls(total, float(args.get("join_fraction", _DEFAULTS["join_fraction"])),
               str(args.get("join_schedule", _DEFAULTS["join_schedule"])))


def add_join_arguments(parser: argparse.ArgumentParser, depth_branches: int = 1, join_fraction: float = 0.5,
                       join_schedule: str = "cosine") -> None:
    """``--depth-branches``, ``--join-fraction``, ``--join-schedule`` (and their ``_`` spellings)."""
    def add(name: str, **kwargs: Any) -> None:
        parser.add_argument(f"--{name}", f"--{name.replace('-', '_')}", **kwargs)

    add("depth-branches", type=positive_int, default=depth_branches,
        help="K: train K parallel branches in each group of K consecutive blocks (K divides the depth), joined "
             "by the join schedule and merged at export into one wide block per group (depth D/K); 1: off")
    add("join-fraction", type=float, default=join_fraction,
        help="share of the run's iterations over which the join s falls from 1 (the deep model) to 0 (the "
             "form that merges); the rest trains at 0")
    add("join-schedule", choices=JOIN_SCHEDULES, default=join_schedule, help="how s falls over the join")


def check_same_join(saved: Mapping[str, Any], now: Mapping[str, Any], source: str, fix: str) -> None:
    """Refuse (``ValueError``) to continue ``source``'s join under other depth-branch settings.

    ``saved`` and ``now`` are run arguments (missing: 1 branch, the defaults); ``fix`` is how to start afresh
    instead (e.g. "use a new --output-dir").
    """
    was, will = ({k: args.get(k, _DEFAULTS.get(k)) for k in JOIN_ARGS} for args in (saved, now))
    if was["depth_branches"] == will["depth_branches"] == 1 or was == will:
        return

    def flags(values: dict[str, Any]) -> str:
        return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())

    raise ValueError(f"{source} was trained with {flags(was)}, not {flags(will)}: the branches and their join s "
                     f"at each iteration follow from those settings. Resume with {flags(was)}, or {fix}.")
