"""What every evaluation records beside its accuracies, and how it is written (JSON + Markdown)."""
from __future__ import annotations

import datetime
import json
import logging
import platform
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..checkpoint import atomic_write
from ..complexity import count_gmacs, count_params
from ..speed import measure_throughput
from .features import FeatureFn

_logger = logging.getLogger(__name__)

__all__ = ["topk_correct", "tower_costs", "write_results"]


def topk_correct(scores: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """How many rows of ``scores`` (N, C) rank their target first, and within the first five."""
    preds = scores.topk(min(5, scores.shape[1]), dim=1).indices
    correct = preds == targets.to(preds.device)[:, None]
    return int(correct[:, 0].sum()), int(correct.any(dim=1).sum())


def tower_costs(model: torch.nn.Module, fn: FeatureFn, images: torch.Tensor, repeats: int = 5) -> dict[str, Any]:
    """Parameters, GMACs per image and throughput (median of ``repeats`` batches) of the evaluated tower.

    For a CLIP model these are its image tower's (``model.visual``), the part that is fused.
    """
    speed = measure_throughput({"tower": lambda: fn(images)}, batch_size=images.shape[0], repeats=repeats,
                               warmup=1, device=images.device, progress=False)["tower"]
    return dict(
        params_m=count_params(getattr(model, "visual", model)) / 1e6,
        gmacs=count_gmacs(model, tuple(images.shape[1:]), forward=lambda m, x: fn(x)),
        # the RePaViT paper's DINO/supervised tables leave out the two attention matmuls
        gmacs_excl_attention=count_gmacs(model, tuple(images.shape[1:]), include_attention=False,
                                         forward=lambda m, x: fn(x)),
        images_per_s=speed["images_per_s"],
        throughput_batch_size=int(images.shape[0]),
        device=(f"cpu, {torch.get_num_threads()} threads" if images.device.type == "cpu"
                else torch.cuda.get_device_name(images.device)),
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return "–" if v is None else str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(output_dir: str | Path, stem: str, title: str, results: dict[str, Any],
                  metric_header: Sequence[str], metric_rows: Sequence[Sequence[Any]]) -> Path:
    """``<stem>.json`` (everything) and ``<stem>.md`` (accuracy table + tower table) in ``output_dir``."""
    results = dict(results, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   torch=torch.__version__, python=platform.python_version())
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / f"{stem}.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=str))
    tower, costs = results["tower"], results.get("costs") or {}
    fusion: Optional[dict] = tower.get("fusion")
    tower_row = [tower["name"] + (" (fused)" if fusion else ""), tower["kind"], costs.get("params_m"),
                 costs.get("gmacs"), costs.get("gmacs_excl_attention"), costs.get("images_per_s"),
                 fusion.get("max_abs_err") if fusion else None, fusion.get("max_rel_err") if fusion else None]
    md = "\n\n".join([
        f"# {title}",
        markdown_table(metric_header, metric_rows),
        markdown_table(["tower", "source kind", "params (M)", "GMACs", "GMACs excl. attention matmuls",
                        f"images/s ({costs.get('device', '?')}, batch {costs.get('throughput_batch_size')})",
                        "fusion max abs err", "fusion max rel err"], [tower_row]),
        f"Source: `{tower['source']}`. Fusion checked on: {fusion.get('verified_on') if fusion else 'n/a (not fused)'}."
        f" Unreadable images skipped: {results.get('num_skipped', 0)}. {results['date']}.",
    ]) + "\n"
    with atomic_write(out / f"{stem}.md") as tmp:
        tmp.write_text(md)
    _logger.info("%s\nwrote %s", md, out / f"{stem}.json")
    return out / f"{stem}.json"
