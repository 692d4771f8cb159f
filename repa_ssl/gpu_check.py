"""``python -m repa_ssl.gpu_check``: every GPU path of the project, a few steps each, in one command.

    scripts/gpu_check.sh --output-dir outputs/gpu_check         # one CUDA GPU, sized for under 8 minutes
    python -m repa_ssl.gpu_check --cpu-smoke --output-dir /tmp/gc   # the same stages, tiny models, on the CPU

Stages (each timed, with the GPU's peak memory; a failed stage is reported and the next one runs):

1. DINO, fp16 with the GradScaler, then bf16 (``dino.train.train``), each ending with the fused export;
2. k-NN of the fp16 run's teacher on the GPU (``repa_ssl.eval.evaluate_knn``);
3. nccl at world size 1 with the synchronised channel-idle BatchNorm (``repa_ssl.convert_sync_batchnorm``)
   under DDP: a step equals the unsynchronised one, then fp16 steps with the GradScaler stay finite;
4. CLIP, ``--precision amp --use-bn-sync`` (``clip.train.train``), its fused export (``clip.export``) and a
   zero-shot evaluation on the GPU (``repa_ssl.eval.evaluate_zeroshot``);
5. ``repa_ssl.bench`` with bf16 autocast: ViT-B/16 and the CLIP B/16 tower, fused vs vanilla;
6. batch-1 latency of depth merging (``repa_ssl.bench.depth``, fp32): vanilla ViT-Tiny 12 -> 6 / 3 layers, RePa
   θ = 0.75 fused, and fused and merged, against vanilla ViT-Tiny (fewer sequential kernels at batch 1).

At world size 1 the applications take their single-process path (upstream open_clip_train syncs BatchNorm
only when distributed), so stage 3 is where nccl and the synchronised BatchNorm run.

Data: scikit-learn's digits, embedded in the project (an ImageFolder for DINO and the evaluations, webdataset
shards with template captions for CLIP); nothing is downloaded. ``gpu_check.json`` and ``gpu_check.md`` in
``--output-dir`` are rewritten after every stage. Without CUDA it builds and checks every stage's
configuration, writes the report saying CUDA was unavailable and exits 0; ``--cpu-smoke`` runs the stages on
the CPU instead (tiny models, fp32 / bf16, gloo). Exit status 1 when a stage failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from .checkpoint import atomic_write
from .cli import HelpFormatter, positive_int
from .data.write_shards import write_shards

_logger = logging.getLogger("repa_ssl.gpu_check")

__all__ = ["GPUCheckConfig", "GPUCheckReport", "run_checks", "main"]


@dataclass
class GPUCheckConfig:
    """What the check runs; the defaults are sized for one CUDA GPU in under 8 minutes (not yet timed on one)."""

    output_dir: Path = Path("outputs/gpu_check")
    cpu_smoke: bool = False  # tiny models on the CPU instead (no CUDA needed)
    image_size: int = 64  # the digits' size on disk; DINO's global crops
    dino_arch: str = "repa_vit_small_patch16_224"
    dino_batch_size: int = 64
    dino_iterations: int = 8  # per precision
    clip_model: str = "RePa-ViT-B-16"
    clip_batch_size: int = 64
    clip_steps: int = 8
    sync_arch: str = "repa_vit_small_patch16_224"
    bench_models: list[str] = field(default_factory=lambda: ["vit_b16", "clip_b16"])
    bench_repeats: int = 5
    depth_model: str = "vit_tiny"  # repa_ssl.bench.depth model of the batch-1 latency stage
    depth_branches: list[int] = field(default_factory=lambda: [2, 4])
    depth_repeats: int = 50
    seed: int = 0

    def for_cpu_smoke(self) -> "GPUCheckConfig":
        """The same stages with the tiny test models and a few images: seconds on two cores."""
        return GPUCheckConfig(output_dir=self.output_dir, cpu_smoke=True, image_size=32, dino_arch="test_repa_vit",
                              dino_batch_size=4, dino_iterations=2, clip_model="RePa-ViT-Test", clip_batch_size=4,
                              clip_steps=2, sync_arch="test_repa_vit", bench_models=["tiny"], bench_repeats=1,
                              depth_model="tiny", depth_branches=[2], depth_repeats=2, seed=self.seed)

    @property
    def device(self) -> str:
        return "cpu" if self.cpu_smoke else "cuda"


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed | not run
    seconds: float = 0.0
    peak_memory_gib: Optional[float] = None  # torch.cuda.max_memory_allocated during the stage
    figures: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None


@dataclass
class GPUCheckReport:
    """What ``gpu_check.json`` holds; ``to_markdown`` is ``gpu_check.md``."""

    config: dict[str, Any]
    machine: dict[str, Any]
    cuda_available: bool
    note: str = ""
    stages: list[StageResult] = field(default_factory=list)
    bench: Optional[dict[str, Any]] = None  # repa_ssl.bench's results
    depth: Optional[dict[str, Any]] = None  # repa_ssl.bench.depth's results (batch-1 latency)

    @property
    def failed(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "failed"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        from .bench.report import to_markdown as bench_markdown

        m = self.machine
        lines = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
                 f"Machine: {m.get('gpu') or 'no CUDA device'}, torch {m['torch']}, CUDA {m.get('cuda')}, "
                 f"{m['platform']}.", ""]
        if self.note:
            lines += [self.note, ""]
        if self.stages:
            lines += ["| stage | status | seconds | peak GPU memory (GiB) | figures |", "|---|---|---|---|---|"]
            for s in self.stages:
                figures = "; ".join(f"{k} {_short(v)}" for k, v in s.figures.items()) or (s.error or "")
                memory = "–" if s.peak_memory_gib is None else f"{s.peak_memory_gib:.2f}"
                lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {memory} | {figures} |")
        if self.bench and self.bench.get("results"):
            lines += ["", "## repa_ssl.bench", "", bench_markdown(self.bench)]
        if self.depth and self.depth.get("batches"):
            from .bench.depth import to_markdown as depth_markdown

            lines += ["", "## repa_ssl.bench.depth (batch-1 latency)", "", depth_markdown(self.depth)]
        return "\n".join(lines) + "\n"

    def write(self, output_dir: Path) -> None:
        with atomic_write(output_dir / "gpu_check.json") as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2, default=str))
        with atomic_write(output_dir / "gpu_check.md") as tmp:
            tmp.write_text(self.to_markdown())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = dict(platform=platform.platform(), torch=torch.__version__, cuda=torch.version.cuda)
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                    nccl=torch.distributed.is_nccl_available())
    return info


# ----------------------------------------------------------------------------- the stages' configurations

def dino_config(cfg: GPUCheckConfig, precision: str, shards: str, output_dir: Path):
    """A short DINO run on the digits' shards: ``dino_iterations`` steps (one epoch), then the fused export."""
    from dino.train import DINOConfig

    return DINOConfig(
        arch=cfg.dino_arch, data_source="wds", data_path=shards, output_dir=str(output_dir), precision=precision,
        epochs=1,
        batch_size_per_gpu=cfg.dino_batch_size, global_crop_size=cfg.image_size, local_crop_size=cfg.image_size // 2,
        local_crops_number=2, out_dim=1024, head_hidden_dim=512, head_bottleneck_dim=128, warmup_epochs=0,
        train_num_samples=cfg.dino_batch_size * cfg.dino_iterations, num_workers=2, saveckp_freq=0, seed=cfg.seed,
        device=cfg.device)


def clip_config(cfg: GPUCheckConfig, shards: str, output_dir: Path):
    """``clip_steps`` steps of CLIP with mixed precision and synchronised BatchNorm on the digits' shards."""
    from clip.train import CLIPTrainConfig

    return CLIPTrainConfig(
        model=cfg.clip_model, train_data=shards, logs=output_dir, name="clip",
        train_num_samples=cfg.clip_batch_size * cfg.clip_steps, epochs=1, batch_size=cfg.clip_batch_size, lr=1e-4,
        wd=0.1, warmup=1, workers=2, device=cfg.device, precision="fp32" if cfg.cpu_smoke else "amp", seed=cfg.seed,
        extra=("--dataset-type", "webdataset", "--dataset-resampled", "--use-bn-sync", "--save-most-recent",
               "--save-frequency", "0", "--log-every-n-steps", "1"))


def bench_config(cfg: GPUCheckConfig):
    from .bench import BenchConfig

    return BenchConfig(models=list(cfg.bench_models), thetas=[0.75], batch_size=8 if cfg.cpu_smoke else 64,
                       train_batch_size=4 if cfg.cpu_smoke else 64, repeats=cfg.bench_repeats,
                       train_repeats=max(1, cfg.bench_repeats // 2), warmup=1, device=cfg.device,
                       amp=not cfg.cpu_smoke, breakdown=False, ceiling=False, progress=False)


def check_configs(cfg: GPUCheckConfig, work: Path) -> dict[str, Any]:
    """Build every stage's configuration and check it as its command line would (no training)."""
    from clip.train import batchnorm_sync_policy
    from dino.train import get_args_parser
    from open_clip_train.params import parse_args

    from .bench import SPECS

    dino = dino_config(cfg, "fp16", "shards/{00000..00001}.tar", work / "dino_fp16")
    get_args_parser().parse_args(["--arch", dino.arch, "--precision", "bf16"])
    argv, _ = batchnorm_sync_policy(clip_config(cfg, "shards/{00000..00001}.tar", work).argv(), distributed=False)
    parse_args(argv)
    unknown = [m for m in cfg.bench_models if m not in SPECS]
    if unknown:
        raise ValueError(f"unknown --bench-models {unknown}; choose from {sorted(SPECS)}")
    from .bench.depth import DEPTH_SPECS

    depth = depth_config(cfg)
    if depth.model not in DEPTH_SPECS:
        raise ValueError(f"unknown depth benchmark model {depth.model!r}; choose from {sorted(DEPTH_SPECS)}")
    return dict(dino_arch=dino.arch, clip_model=cfg.clip_model, bench_models=" ".join(cfg.bench_models),
                depth_model=depth.model)


# ----------------------------------------------------------------------------- running

class Stages:
    """Runs each stage, recording its time, peak GPU memory, figures or error, and rewrites the report."""

    def __init__(self, report: GPUCheckReport, output_dir: Path, cuda: bool) -> None:
        self.report, self.output_dir, self.cuda = report, output_dir, cuda

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> bool:
        _logger.info("stage: %s", name)
        result = StageResult(name, "ok")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            result.figures = fn() or {}
        except Exception as e:  # a failed stage is a finding; the next stages still run
            result.status, result.error = "failed", f"{type(e).__name__}: {e}"
            _logger.error("stage %s failed:\n%s", name, traceback.format_exc())
        result.seconds = time.perf_counter() - start
        if self.cuda:
            result.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30
        self.report.stages.append(result)
        self.report.write(self.output_dir)
        return result.status == "ok"


def write_digits(cfg: GPUCheckConfig, work: Path) -> tuple[Path, str]:
    """The digits as ``train/``/``val/`` folders, class names and CLIP shards with template captions."""
    from demo import data

    root = data.write_digits_folder(work / "digits", cfg.image_size)
    classnames = data.write_classnames(work / "classnames.txt", data.check_folder(root))
    samples = data.captioned_samples(root / "train", classnames, cfg.seed)
    written = write_shards(samples, work / "shards", samples_per_shard=256, progress=False, overwrite=True)
    return root, data.shard_pattern(written)


def run_dino(cfg: GPUCheckConfig, precision: str, shards: str, work: Path) -> dict[str, Any]:
    from dino.train import train

    result = train(dino_config(cfg, precision, shards, work / f"dino_{precision}"))
    stats = result.last_epoch
    export = json.loads(result.fused_export.with_suffix(".json").read_text()) if result.fused_export else {}
    return dict(precision=result.config.precision, loss=stats.loss if stats else None,
                fused_export=str(result.fused_export), fusion_max_rel_err=export.get("fusion", {}).get("max_rel_err"))


def run_knn(cfg: GPUCheckConfig, digits: Path, checkpoint: Path) -> dict[str, Any]:
    from .distributed import DistEnv
    from .eval import KNNOptions, evaluate_knn, load_tower

    tower = load_tower(checkpoint)
    result = evaluate_knn(tower, KNNOptions(data_path=digits, ks=(10, 20), batch_size=256, num_workers=2),
                          DistEnv(device=torch.device(cfg.device)))
    return {f"top1@{k}": acc["top1"] for k, acc in result.accuracy.items()} | dict(
        images_per_s=result.costs.get("images_per_s"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def one_process_group(backend: str) -> Iterator[None]:
    """A process group of this process alone, as torchrun sets it up (``MASTER_ADDR``/``MASTER_PORT``)."""
    import torch.distributed as dist

    added = {k: v for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())))
             if k not in os.environ}
    os.environ.update(added)
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key in added:
            del os.environ[key]


@contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 and no cuDNN autotuning (which dino.train turns on), so that two runs of a model can be compared."""
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
        (torch.backends.cudnn, "benchmark")
    saved = [getattr(owner, name) for owner, name in flags]
    for owner, name in flags:
        setattr(owner, name, False)
    try:
        yield
    finally:
        for (owner, name), value in zip(flags, saved):
            setattr(owner, name, value)


def run_sync_batchnorm(cfg: GPUCheckConfig) -> dict[str, Any]:
    """DDP over the synchronised BatchNorm at world size 1 computes what the plain model computes; fp16 steps
    with the GradScaler stay finite."""
    import copy

    import timm
    from torch.nn.parallel import DistributedDataParallel as DDP

    from . import convert_sync_batchnorm
    from .precision import autocast_for

    device = torch.device(cfg.device)
    size = cfg.image_size * 2
    torch.manual_seed(cfg.seed)
    plain = timm.create_model(cfg.sync_arch, num_classes=0, img_size=size).to(device).train()
    x = torch.randn(16 if cfg.cpu_smoke else 32, 3, size, size, device=device)
    with one_process_group("gloo" if cfg.cpu_smoke else "nccl"):
        synced = convert_sync_batchnorm(copy.deepcopy(plain))
        ddp = DDP(synced, device_ids=None if cfg.cpu_smoke else [device.index or 0])
        with exact_float32():
            out, ref = ddp(x), plain(x)
            out.square().mean().backward()
            ref.square().mean().backward()
        errors = dict(output=_max_rel(out, ref))
        errors["grads"] = max(_max_rel(p.grad, q.grad) for p, q in zip(synced.parameters(), plain.parameters()))
        errors["running_stats"] = max(_max_rel(b.float(), c.float()) for (n, b), c in
                                      zip(synced.named_buffers(), plain.buffers()) if "running" in n)
        precision = "fp32" if cfg.cpu_smoke else "fp16"  # fp16 and bf16 training need a GPU
        autocast, scaler = autocast_for(precision, device)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
        losses = []
        for _ in range(3):
            with autocast():
                loss = ddp(x).float().square().mean()
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            losses.append(loss.item())
    kinds = sorted({type(m).__name__ for m in synced.modules() if "BatchNorm" in type(m).__name__})
    if max(errors.values()) > 1e-3 or not all(map(math.isfinite, losses)):
        raise RuntimeError(f"synchronised BatchNorm at world size 1 differs from the plain model ({errors}) or "
                           f"its {precision} loss is not finite ({losses})")
    return {"batchnorms": ",".join(kinds), **{f"max_rel_error_{k}": v for k, v in errors.items()},
            f"{precision}_loss": losses[-1]}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run_clip(cfg: GPUCheckConfig, shards: str, digits: Path, work: Path) -> dict[str, Any]:
    from clip.export import export_fused_clip
    from clip.train import train

    from .eval import ZeroShotOptions, evaluate_zeroshot, load_tower

    result = train(clip_config(cfg, shards, work / "clip"))
    fused = work / "clip_fused.pt"
    export = export_fused_clip(result.checkpoint, cfg.clip_model, fused, digits / "val")
    tower = load_tower(fused, clip=True)
    options = ZeroShotOptions(data=digits / "val", classnames=work / "classnames.txt", templates="simple",
                              batch_size=256, num_workers=2)
    zeroshot = evaluate_zeroshot(tower, options, _env(cfg))
    return dict(checkpoint=str(result.checkpoint), fusion_max_rel_err=export.max_rel_err,
                zeroshot_top1=zeroshot.accuracy["all_classes"]["top1"])


def _env(cfg: GPUCheckConfig):
    from .distributed import DistEnv

    return DistEnv(device=torch.device(cfg.device))


def run_bench(cfg: GPUCheckConfig, report: GPUCheckReport) -> dict[str, Any]:
    from .bench import run_suite

    report.bench = run_suite(bench_config(cfg))
    figures = {}
    for res in report.bench["results"]:
        for name, row in res["rows"].items():
            if name != "vanilla":
                figures[f"{res['label']} {name} speed-up"] = row["speedup"]
        for name, step in res.get("train_step_s", {}).items():
            if name != "vanilla":
                figures[f"{res['label']} {name} train step ratio"] = step["ratio"]
    return figures


def depth_config(cfg: GPUCheckConfig):
    from .bench.depth import DepthBenchConfig

    return DepthBenchConfig(model=cfg.depth_model, branches=list(cfg.depth_branches), batch_sizes=[1],
                            repeats=cfg.depth_repeats, warmup=5 if not cfg.cpu_smoke else 1, device=cfg.device,
                            progress=False)


def run_depth_latency(cfg: GPUCheckConfig, report: GPUCheckReport) -> dict[str, Any]:
    """Batch-1 latency (ms) of each depth variant and its speed-up over the deep vanilla model."""
    from .bench.depth import run_depth

    report.depth = run_depth(depth_config(cfg))
    rows = report.depth["batches"]["1"]
    return {f"{name} ms": row["ms"] for name, row in rows.items()} | {
        f"{name} speed-up": row["speedup"] for name, row in rows.items() if name != "vanilla"}


def run_checks(cfg: GPUCheckConfig) -> GPUCheckReport:
    """Every stage that can run here; the report is written after each."""
    cuda = torch.cuda.is_available()
    if cfg.cpu_smoke:
        cfg = cfg.for_cpu_smoke()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "runs"
    report = GPUCheckReport(config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                            machine=machine_info(), cuda_available=cuda)
    stages = Stages(report, out, cuda and not cfg.cpu_smoke)
    if not cuda and not cfg.cpu_smoke:
        report.note = ("CUDA is unavailable here: nothing ran on a GPU. The stages' configurations were built and "
                       "checked; run this on a CUDA machine (or add --cpu-smoke for the CPU-sized stages).")
        _logger.warning(report.note)
        stages.run("configurations", lambda: check_configs(cfg, work))
        return report
    if cfg.cpu_smoke:
        report.note = "CPU smoke run (--cpu-smoke): tiny models, fp32 on the CPU, gloo; no GPU figures."
    stages.run("configurations", lambda: check_configs(cfg, work))
    data: dict[str, Any] = {}

    def write_data() -> dict[str, Any]:
        data["digits"], data["shards"] = write_digits(cfg, work)
        return dict(folder=str(data["digits"]), shards=data["shards"])

    if stages.run("digits: folder and shards", write_data):
        digits, shards = data["digits"], data["shards"]
        precisions = ("fp32",) if cfg.cpu_smoke else ("fp16", "bf16")  # fp16 and bf16 training need a GPU
        for precision in precisions:
            stages.run(f"DINO {precision} + fused export", lambda p=precision: run_dino(cfg, p, shards, work))
        stages.run("k-NN of the DINO teacher",
                   lambda: run_knn(cfg, digits, work / f"dino_{precisions[0]}" / "checkpoint.pth"))
        stages.run("CLIP --use-bn-sync + export + zero-shot", lambda: run_clip(cfg, shards, digits, work))
    stages.run("synchronised BatchNorm, world size 1", lambda: run_sync_batchnorm(cfg))
    stages.run("repa_ssl.bench" + ("" if cfg.cpu_smoke else " --device cuda --amp"), lambda: run_bench(cfg, report))
    stages.run("depth merging, batch-1 latency", lambda: run_depth_latency(cfg, report))
    return report


def parse_args(argv: Optional[Sequence[str]] = None) -> GPUCheckConfig:
    d = GPUCheckConfig()
    p = argparse.ArgumentParser("python -m repa_ssl.gpu_check", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output-dir", type=Path, default=d.output_dir, help="gpu_check.json, gpu_check.md and the runs")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the stages on the CPU with the tiny test models, in fp32 (the model flags are ignored)")
    p.add_argument("--dino-arch", default=d.dino_arch, help="timm name of DINO's backbone")
    p.add_argument("--dino-iterations", type=positive_int, default=d.dino_iterations, help="DINO steps per precision")
    p.add_argument("--clip-model", default=d.clip_model, help="OpenCLIP config name of the CLIP run")
    p.add_argument("--clip-steps", type=positive_int, default=d.clip_steps, help="CLIP training steps")
    p.add_argument("--bench-models", nargs="+", default=d.bench_models, help="repa_ssl.bench models to time")
    p.add_argument("--bench-repeats", type=positive_int, default=d.bench_repeats, help="timed rounds per benchmark")
    p.add_argument("--depth-repeats", type=positive_int, default=d.depth_repeats,
                   help="paired rounds of the depth-merging batch-1 latency")
    p.add_argument("--seed", type=int, default=d.seed)
    args = p.parse_args(argv)
    from .bench import SPECS

    unknown = [m for m in args.bench_models if m not in SPECS]
    if unknown:
        p.error(f"unknown --bench-models {' '.join(unknown)}; choose from {' '.join(sorted(SPECS))}")
    return GPUCheckConfig(**vars(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_checks(cfg)
    _logger.info("report: %s\n%s", Path(cfg.output_dir) / "gpu_check.md", report.to_markdown())
    if report.failed:
        _logger.error("failed stages: %s", ", ".join(report.failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
