"""Depth merging speed: ``python -m repa_ssl.bench.depth``.

Vanilla ViT-Tiny merged 12 -> 12/K layers (``branch_model`` + ``set_branch_join(0)`` + ``fuse_model``), the RePa
model of the same size fused, and fused and merged, all against the vanilla deep model, at each batch size, in paired
rotating rounds (:func:`repa_ssl.speed.measure_throughput`). Weights are random: speed does not depend on them.
Writes ``results.json`` (every round's seconds), ``results.md`` and ``depth_speedup.png`` to ``--output-dir``.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..checkpoint import atomic_write
from ..cli import HelpFormatter, positive_int
from ..depth import branch_model, set_branch_join
from ..fusion import fuse_model
from ..speed import measure_throughput
from .report import subplots
from .suite import SPECS, ModelSpec, _repa_timm, _timm, complexity_rows, machine_info

_logger = logging.getLogger("repa_ssl.bench.depth")

__all__ = ["DEPTH_SPECS", "DepthBenchConfig", "depth_variants", "run_depth", "to_markdown", "plot_depth"]

DEPTH_SPECS: dict[str, ModelSpec] = {
    "vit_tiny": ModelSpec("ViT-Tiny/16", _timm("vit_tiny_patch16_224"), _repa_timm("repa_vit_tiny_patch16_224")),
    "demo": SPECS["demo"],  # 4 layers
    "tiny": SPECS["tiny"],  # 2 layers: the tests' model
}


@dataclass
class DepthBenchConfig:
    model: str = "vit_tiny"
    branches: list[int] = field(default_factory=lambda: [2, 3, 4])  # K: 12 layers -> 6 / 4 / 3
    theta: float = 0.75  # idle ratio of the RePa model
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    repeats: int = 30
    warmup: int = 2
    threads: int = 0  # 0: torch's default
    device: str = "cpu"
    progress: bool = True


def _merged(model: nn.Module, branches: int) -> nn.Module:
    """The deploy form of ``model`` with every ``branches`` layers merged into one (and channel idle fused)."""
    branch_model(model, branches)
    set_branch_join(model, 0.0)
    return fuse_model(model)


def depth_variants(spec: ModelSpec, branches: Sequence[int], theta: float) -> dict[str, nn.Module]:
    """Name -> eval-mode model: vanilla, vanilla merged per K, RePa fused, RePa fused and merged per K."""
    torch.manual_seed(0)
    vanilla = spec.vanilla().eval()
    depth = len(vanilla.blocks)
    out = {"vanilla": vanilla}
    out.update({f"vanilla merged {depth}→{depth // k}": _merged(spec.vanilla().eval(), k) for k in branches})
    out[f"RePa θ={theta} fused"] = fuse_model(spec.repa(theta).eval())
    out.update({f"RePa θ={theta} fused+merged {depth}→{depth // k}": _merged(spec.repa(theta).eval(), k)
                for k in branches})
    return out


def _paired(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a's time / b's time."""
    return statistics.median(x / y for x, y in zip(a, b))


def _page_faults(run: Callable[[], object], calls: int = 3) -> Optional[float]:
    """Minor page faults per call of ``run`` (memory the allocator took back from the OS): None where unknown."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        run()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def _bench_batch(models: dict[str, nn.Module], batch_size: int, image_size: int, cfg: DepthBenchConfig) -> dict:
    device = torch.device(cfg.device)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)

    def runner(m: nn.Module) -> Callable[[], object]:
        return lambda: m(x)

    runners = {n: runner(m) for n, m in models.items()}
    speed = measure_throughput(runners, batch_size, cfg.repeats, cfg.warmup, device, progress=cfg.progress,
                               baseline="vanilla")
    rows = {}
    for name, s in speed.items():
        # the same model unmerged: the depth gain alone (vanilla for vanilla, RePa fused for RePa)
        unmerged = re.sub(r"[ +]merged .*", "", name)
        rows[name] = dict(layers=len(models[name].blocks), ms=1e3 * s["median_s"], images_per_s=s["images_per_s"],
                          speedup=s["speedup"], speedup_iqr=s["speedup_iqr"], seconds=s["seconds"],
                          page_faults=_page_faults(runners[name]) if device.type == "cpu" else None,
                          vs_unmerged=_paired(speed[unmerged]["seconds"], s["seconds"]) if unmerged != name else None)
    return rows


def run_depth(cfg: DepthBenchConfig, on_result: Optional[Callable[[dict], None]] = None) -> dict:
    """Time every variant at every batch size; ``on_result`` sees the results after each batch size."""
    if cfg.model not in DEPTH_SPECS:
        raise ValueError(f"unknown depth benchmark model {cfg.model!r}; choose from {sorted(DEPTH_SPECS)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spec = DEPTH_SPECS[cfg.model]
    models = {n: m.to(cfg.device) for n, m in depth_variants(spec, cfg.branches, cfg.theta).items()}
    size = spec.image_size
    out = dict(config=asdict(cfg), machine=machine_info(cfg), label=spec.label, image_size=size, complexity={},
               batches={})
    with torch.inference_mode():
        for batch_size in cfg.batch_sizes:
            _logger.info("timing %s at batch %d", spec.label, batch_size)
            out["batches"][str(batch_size)] = _bench_batch(models, batch_size, size, cfg)
            if on_result is not None:
                on_result(out)
    out["complexity"] = complexity_rows(models, size)  # after the timing (see complexity_rows)
    if on_result is not None:
        on_result(out)
    return out


def _ratio(value: Optional[float], iqr=None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}x" + (f" ({iqr[0]:.2f}–{iqr[1]:.2f})" if iqr is not None else "")


def to_markdown(out: dict) -> str:
    cfg, m = out["config"], out["machine"]
    lines = [f"Depth merging, {out['label']} ({out['image_size']} px). Machine: {m['processor']}, {m['threads']} "
             f"threads, {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}, torch {m['torch']}; fp32, "
             f"{cfg['repeats']} paired rotating rounds per batch size. Speed-ups are medians of per-round ratios "
             f"(interquartile range); 'vs unmerged' pairs each merged model with the same model at full depth; "
             f"page faults: minor faults per forward after the timing (memory the allocator had returned to the OS).",
             "",
             "| batch | model | layers | params (M) | GMACs | ms per batch | speed-up vs vanilla | vs unmerged "
             "| page faults |", "|---|---|---|---|---|---|---|---|---|"]
    for batch, rows in out["batches"].items():
        for name, row in rows.items():
            c, faults = out["complexity"].get(name), row["page_faults"]  # counted after all the timing
            arithmetic = "– | –" if c is None else f"{c['params_m']:.2f} | {c['gmacs']:.3g}"
            lines.append(f"| {batch} | {name} | {row['layers']} | {arithmetic} | "
                         f"{row['ms']:.1f} | {_ratio(row['speedup'], row['speedup_iqr'])} | "
                         f"{_ratio(row['vs_unmerged'])} | {'–' if faults is None else round(faults)} |")
    return "\n".join(lines) + "\n"


def plot_depth(out: dict, path: Path) -> Path:
    """Speed-up over vanilla against the number of layers after merging: vanilla and RePa, one line per batch."""
    fig, ax = subplots(figsize=(7, 4.5))
    for i, (batch, rows) in enumerate(out["batches"].items()):
        for family, style in (("vanilla", "-o"), ("RePa", "--s")):
            pts = sorted((row["layers"], row["speedup"]) for name, row in rows.items() if name.startswith(family))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}", label=f"{family}, batch {batch}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.invert_xaxis()
    ax.set_xlabel("layers (deep model on the left, merged to the right)")
    ax.set_ylabel(f"images/s relative to vanilla {out['label']}")
    ax.set_title(f"Depth merging, {out['machine']['threads']} threads, {out['machine']['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[DepthBenchConfig, Path]:
    d = DepthBenchConfig()
    p = argparse.ArgumentParser("python -m repa_ssl.bench.depth", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=d.model, choices=sorted(DEPTH_SPECS), help="vanilla / RePa pair to time")
    p.add_argument("--branches", nargs="+", type=positive_int, default=d.branches,
                   help="layers merged into one (K; must divide the depth)")
    p.add_argument("--theta", type=float, default=d.theta, help="idle ratio θ of the RePa model")
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=d.batch_sizes, help="images per batch")
    p.add_argument("--repeats", type=positive_int, default=d.repeats, help="paired rounds per batch size")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (CPU)")
    p.add_argument("--device", default=d.device, help="where the models run")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/bench/depth"),
                   help="where results.json, results.md and depth_speedup.png go")
    args = p.parse_args(argv)
    out_dir = args.__dict__.pop("output_dir")
    return DepthBenchConfig(**vars(args)), out_dir


def main(argv: Optional[Sequence[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, out_dir = parse_args(argv)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(out: dict) -> None:  # after every batch size, so a long run keeps what it measured
        with atomic_write(out_dir / "results.json") as tmp:
            tmp.write_text(json.dumps(out, indent=2))
        with atomic_write(out_dir / "results.md") as tmp:
            tmp.write_text(to_markdown(out))

    out = run_depth(cfg, on_result=write)
    plot_depth(out, out_dir / "depth_speedup.png")
    _logger.info("results in %s\n%s", out_dir, to_markdown(out))
    return out


if __name__ == "__main__":
    main()
