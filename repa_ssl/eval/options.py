"""What every evaluation shares: its loading and fusion options, its first step and the shape of its result.

Each evaluation (``evaluate_knn``, ``evaluate_linear``, ``evaluate_zeroshot``) takes a loaded
``Tower`` and its options (a subclass of ``EvalOptions``), fuses the tower on the first batch
(``fuse_on_first_batch``) and returns an ``EvalResult`` subclass whose ``to_json()`` is what the
command line writes to ``<stem>.json``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from torch import nn
from torch.utils.data import DataLoader

from ..distributed import DistEnv
from ..fusion import DEFAULT_RTOL
from .data import first_batch
from .features import FeatureFn
from .results import tower_costs, write_results
from .towers import Tower, fuse_and_verify

__all__ = ["EvalOptions", "EvalResult", "default_env", "fuse_on_first_batch"]


@dataclass(kw_only=True)
class EvalOptions:
    """How images are loaded, and how the fused tower is checked and timed."""

    batch_size: int = 128  # images per process
    num_workers: int = 8
    resize_size: Optional[int] = None  # resize before the centre crop (default: crop x 256/224)
    fusion_rtol: float = DEFAULT_RTOL  # max relative error of the fused vs the train form on the first batch
    throughput_repeats: int = 5  # timed batches for the throughput figure
    seed: int = 0


@dataclass
class EvalResult:
    """What every evaluation reports besides its accuracies: the tower, its fusion check and costs."""

    tower: dict[str, Any]  # Tower.summary(): name, kind, source, image size, fusion check
    costs: dict[str, Any]  # tower_costs(): parameters, GMACs, images/s of the fused tower
    num_skipped: int  # unreadable images skipped

    evaluation: ClassVar[str]
    stem: ClassVar[str]  # <stem>.json and <stem>.md

    def to_json(self) -> dict[str, Any]:
        return dict(evaluation=self.evaluation, **asdict(self))

    def title(self) -> str:
        return f"{self.evaluation}, {self.tower['name']}"

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """Header and rows of the Markdown accuracy table."""
        raise NotImplementedError

    def write(self, output_dir: str | Path, extra: Optional[dict[str, Any]] = None) -> Path:
        """``<stem>.json`` and ``<stem>.md`` in ``output_dir``; ``extra`` (e.g. the command line) joins the JSON."""
        return write_results(output_dir, self.stem, self.title(), dict(self.to_json(), **(extra or {})),
                             *self.table())


def default_env(tower: Tower, env: Optional[DistEnv]) -> DistEnv:
    """``env``, or a single process on the device the tower's weights are on."""
    return env or DistEnv(device=next(tower.model.parameters()).device)


def fuse_on_first_batch(tower: Tower, loader: DataLoader, env: DistEnv, options: EvalOptions,
                        feature_fn: Callable[[nn.Module], FeatureFn]) -> tuple[FeatureFn, dict[str, Any]]:
    """Fuse + verify on the first batch of ``loader``; return the fused tower's feature function and costs."""
    images = first_batch(loader, env.device)
    fuse_and_verify(tower, images, rtol=options.fusion_rtol)
    fn = feature_fn(tower.model)
    return fn, tower_costs(tower.model, fn, images, repeats=options.throughput_repeats)
