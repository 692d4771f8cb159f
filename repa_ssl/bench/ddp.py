"""``torchrun --nproc_per_node 2 -m repa_ssl.bench.ddp``: the training step under DDP, RePa vs vanilla.

Each process runs one thread and its own batch. The vanilla timm ViT goes under DDP as it is; the RePa
train form goes through ``repa_ssl.convert_sync_batchnorm`` first, so its FFN BatchNorms take their batch
statistics over every process, as a multi-GPU run would. The steps (forward + backward + AdamW on a
1000-class head) are timed in paired, rotating rounds (``repa_ssl.bench.suite``); rank 0 reports the median
per-round ratio to vanilla with its interquartile range, and the elements the synchronised BatchNorms
all-reduce per step beside torch's SyncBatchNorm figure for the same layers. DDP's gradient all-reduce is
left out of the count: it sends every parameter's gradient, the same for both models up to the parameter
counts, and runs in DDP's reducer, not through ``dist.all_reduce``.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..checkpoint import atomic_write
from ..cli import HelpFormatter
from ..distributed import init_distributed, shutdown
from ..sync_batchnorm import SyncChannelIdleBatchNorm, convert_sync_batchnorm
from .report import _ratio
from .suite import SPECS, BenchConfig, _train_step_times, machine_info

_logger = logging.getLogger("repa_ssl.bench.ddp")

__all__ = ["DDPBenchConfig", "AllReduceCounter", "torch_sync_batchnorm_elements", "run", "to_markdown", "main"]


@dataclass
class DDPBenchConfig:
    model: str = "vit_s16"
    thetas: list[float] = field(default_factory=lambda: [0.5, 0.75])
    batch_size: int = 16  # per process
    rounds: int = 7


class AllReduceCounter:
    """Counts the elements every ``dist.all_reduce`` call sends while installed (``with`` or by assignment)."""

    def __init__(self) -> None:
        self.elements, self.original = 0, dist.all_reduce

    def __call__(self, tensor: torch.Tensor, *args, **kwargs):
        self.elements += tensor.numel()
        return self.original(tensor, *args, **kwargs)

    def __enter__(self) -> "AllReduceCounter":
        dist.all_reduce = self
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self.original


def torch_sync_batchnorm_elements(channels: list[int]) -> tuple[int, int]:
    """Elements torch's SyncBatchNorm sends per process and call for BatchNorms of these widths:
    mean, invstd and a count per layer forward (all_gather), two sums per channel backward (all_reduce)."""
    return sum(2 * c + 1 for c in channels), sum(2 * c for c in channels)


def _sync_elements(model: nn.Module, x: torch.Tensor) -> dict:
    """All-reduced elements of one forward + backward of ``model`` (every process must call it alike)."""
    with AllReduceCounter() as counter:
        out = model(x)
        forward = counter.elements
        out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    channels = [m.num_features for m in model.modules() if isinstance(m, SyncChannelIdleBatchNorm)]
    torch_fwd, torch_bwd = torch_sync_batchnorm_elements(channels)
    return dict(forward=forward, backward=counter.elements - forward, total=counter.elements,
                synchronised_batchnorms=len(channels), torch_sync_batchnorm=torch_fwd + torch_bwd)


def run(cfg: DDPBenchConfig, rank: int) -> dict:
    """Time the DDP training step of vanilla and RePa (per θ) in this process of the initialised group."""
    spec = SPECS[cfg.model]
    torch.manual_seed(0)
    models = {"vanilla": spec.vanilla(), **{f"RePa θ={t}": spec.repa(t) for t in cfg.thetas}}
    wrapped: list[nn.Module] = []

    def wrap(model: nn.Module) -> nn.Module:  # vanilla has no BatchNorm: the conversion leaves it as it is
        wrapped.append(DDP(convert_sync_batchnorm(model)))
        return wrapped[-1]

    bench_cfg = BenchConfig(train_batch_size=cfg.batch_size, train_repeats=cfg.rounds, threads=1,
                            progress=rank == 0)
    torch.manual_seed(1 + rank)  # each process its own batch, the same in every round
    steps = _train_step_times(models, bench_cfg, spec.image_size, wrap=wrap)
    x = torch.randn(cfg.batch_size, 3, spec.image_size, spec.image_size)
    for (name, row), model in zip(steps.items(), wrapped):
        row["all_reduced_elements"] = _sync_elements(model, x)
    machine = dict(machine_info(bench_cfg), world_size=dist.get_world_size(), backend=dist.get_backend())
    return dict(config=vars(cfg), machine=machine, label=spec.label, image_size=spec.image_size, rows=steps)


def to_markdown(out: dict) -> str:
    cfg, machine = out["config"], out["machine"]
    head = (f"{out['label']} ({out['image_size']} px), DDP over {machine['world_size']} processes "
            f"({machine['backend']}, {machine['threads']} thread each) on {machine['processor']}, torch "
            f"{machine['torch']}; batch {cfg['batch_size']} per process, forward + backward + AdamW, "
            f"{cfg['rounds']} paired rounds. Ratio: median of per-round ratios to vanilla (IQR). Elements: "
            f"what the synchronised BatchNorms all-reduce per process and step (forward + backward), beside "
            f"torch's SyncBatchNorm figure for the same layers; DDP's gradient all-reduce is left out.\n")
    lines = [head, "| variant | s / step (rank 0) | step time vs vanilla | BatchNorm all-reduce elements "
                   "(fwd + bwd) | torch SyncBatchNorm |", "|---|---|---|---|---|"]
    for name, row in out["rows"].items():
        n = row["all_reduced_elements"]
        lines.append(f"| {name} | {row['seconds']:.2f} | {_ratio(row['ratio'], row['ratio_iqr'])} | "
                     f"{n['total']:,} ({n['forward']:,} + {n['backward']:,}) | {n['torch_sync_batchnorm']:,} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> tuple[DDPBenchConfig, Path]:
    d = DDPBenchConfig()
    p = argparse.ArgumentParser("python -m repa_ssl.bench.ddp", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=d.model, choices=sorted(k for k, s in SPECS.items() if s.trainable),
                   help="model size (tiny: the test ViT)")
    p.add_argument("--thetas", nargs="+", type=float, default=d.thetas, help="idle ratios θ of the RePa models")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per process and step")
    p.add_argument("--rounds", type=int, default=d.rounds, help="timed rounds (one step of each model per round)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/bench_ddp"),
                   help="where rank 0 writes results.json and results.md")
    args = p.parse_args(argv)
    out_dir = args.__dict__.pop("output_dir")
    return DDPBenchConfig(**vars(args)), out_dir


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    """Rank 0 returns the results (and writes them); the other processes return None."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, out_dir = parse_args(argv)
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    if not env.distributed:
        raise SystemExit("run it under torchrun with several processes, e.g. "
                         "torchrun --nproc_per_node 2 -m repa_ssl.bench.ddp")
    out = run(cfg, env.rank)  # on an error this process exits and torchrun stops the others
    shutdown()
    if not env.is_main:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    with atomic_write(out_dir / "results.md") as tmp:
        tmp.write_text(to_markdown(out))
    _logger.info("results in %s\n%s", out_dir, to_markdown(out))
    return out


if __name__ == "__main__":
    main()
