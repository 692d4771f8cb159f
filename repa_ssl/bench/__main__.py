"""``python -m repa_ssl.bench``: the benchmark suite from the command line."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from ..cli import HelpFormatter
from .report import plot_breakdown, plot_speedup, to_markdown
from .suite import SPECS, BenchConfig, run_suite

_logger = logging.getLogger("repa_ssl.bench")


def parse_args(argv=None) -> tuple[BenchConfig, Path]:
    d = BenchConfig()
    p = argparse.ArgumentParser("python -m repa_ssl.bench", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", default=d.models, choices=sorted(SPECS), help="models to time")
    p.add_argument("--thetas", nargs="+", type=float, default=d.thetas, help="idle ratios θ of the RePa models")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per inference batch")
    p.add_argument("--train-batch-size", type=int, default=d.train_batch_size, help="images per training step")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed inference repeats per model")
    p.add_argument("--train-repeats", type=int, default=d.train_repeats, help="timed training steps per model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the models run")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model before timing")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training-step comparison")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the per-layer latency breakdown")
    p.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                   help="skip timing the fused models' bare GEMMs + attention (the bound for any exact fused layout)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/bench"),
                   help="where results.json, results.md and the plots go")
    args = p.parse_args(argv)
    out_dir = args.__dict__.pop("output_dir")
    return BenchConfig(**vars(args)), out_dir


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, out_dir = parse_args(argv)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(out: dict) -> None:  # after every model, so a long run keeps what it measured
        with atomic_write(out_dir / "results.json") as tmp:
            tmp.write_text(json.dumps(out, indent=2))
        with atomic_write(out_dir / "results.md") as tmp:
            tmp.write_text(to_markdown(out))

    out = run_suite(cfg, on_result=write)
    plot_breakdown(out, out_dir / "latency_breakdown.png") if cfg.breakdown else None
    plot_speedup(out, out_dir / "speedup_vs_theta.png")
    _logger.info("results in %s\n%s", out_dir, to_markdown(out))
    return out


if __name__ == "__main__":
    main()
