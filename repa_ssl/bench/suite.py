"""What the benchmark measures, for which models, and how (interleaved, warm-up, medians)."""
from __future__ import annotations

import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import open_clip
import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..complexity import count_gmacs, count_params
from ..fusion import fuse_model
from ..models import DEMO_VIT_ARGS, TEST_VIT_ARGS, repa_variant_name
from ..precision import autocast
from ..speed import measure_throughput
from .breakdown import latency_breakdown
from .ceiling import ceiling_runner
from .memory import saved_activation_bytes

_logger = logging.getLogger(__name__)

__all__ = ["ModelSpec", "SPECS", "BenchConfig", "run_suite", "machine_info"]


def _timm(name: str, **kwargs) -> Callable[..., nn.Module]:
    def build(**extra) -> nn.Module:
        return timm.create_model(name, num_classes=0, **kwargs, **extra)
    return build


def _clip_tower(name: str) -> Callable[..., nn.Module]:
    def build() -> nn.Module:
        return open_clip.create_model(name).visual
    return build


@dataclass(frozen=True)
class ModelSpec:
    """A vanilla model and the RePa model of the same size."""

    label: str
    vanilla: Callable[[], nn.Module]
    repa: Callable[[float], nn.Module]  # train form at idle ratio θ
    image_size: int = 224
    trainable: bool = True  # whether the training-step comparison applies


def _repa_timm(name: str, **kwargs) -> Callable[[float], nn.Module]:
    return lambda theta: _timm(name, **kwargs)(idle_ratio=theta)


def _repa_clip(name: str) -> Callable[[float], nn.Module]:
    return lambda theta: _clip_tower(repa_variant_name(name, idle_ratio=theta))()  # θ is in OpenCLIP names


SPECS: dict[str, ModelSpec] = {
    "vit_s16": ModelSpec("ViT-S/16", _timm("vit_small_patch16_224"), _repa_timm("repa_vit_small_patch16_224")),
    "vit_b16": ModelSpec("ViT-B/16", _timm("vit_base_patch16_224"), _repa_timm("repa_vit_base_patch16_224")),
    "vit_l16": ModelSpec("ViT-L/16", _timm("vit_large_patch16_224"), _repa_timm("repa_vit_large_patch16_224")),
    "clip_b16": ModelSpec("CLIP B/16 tower", _clip_tower("ViT-B-16"), _repa_clip("RePa-ViT-B-16"), trainable=False),
    "clip_b32": ModelSpec("CLIP B/32 tower", _clip_tower("ViT-B-32"), _repa_clip("RePa-ViT-B-32"), trainable=False),
    "tiny": ModelSpec("tiny test ViT", _timm("vit_tiny_patch16_224", **TEST_VIT_ARGS), _repa_timm("test_repa_vit"),
                      image_size=TEST_VIT_ARGS["img_size"]),
    "demo": ModelSpec("demo ViT (python -m demo)", _timm("vit_tiny_patch16_224", **DEMO_VIT_ARGS),
                      _repa_timm("demo_repa_vit"), image_size=DEMO_VIT_ARGS["img_size"]),
}


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["vit_s16", "vit_b16", "vit_l16", "clip_b16", "clip_b32"])
    thetas: list[float] = field(default_factory=lambda: [0.5, 0.75])
    batch_size: int = 8
    train_batch_size: int = 32
    repeats: int = 10
    warmup: int = 2
    train_repeats: int = 5
    threads: int = 0  # 0: torch's default
    device: str = "cpu"
    amp: bool = False  # bf16 autocast (GPU)
    compile: bool = False  # torch.compile every model before timing
    train: bool = True
    breakdown: bool = True
    ceiling: bool = True  # also time the fused model's bare GEMMs + attention (bench/ceiling.py)
    progress: bool = True


def machine_info(cfg: BenchConfig) -> dict:
    info = dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        device=cfg.device,
    )
    if cfg.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device))
    return info


def _autocast(cfg: BenchConfig):
    return autocast("bf16" if cfg.amp else "fp32", cfg.device)


def _prepare(model: nn.Module, cfg: BenchConfig) -> nn.Module:
    model = model.to(cfg.device).eval()
    return torch.compile(model) if cfg.compile else model


def _train_step_times(models: dict[str, nn.Module], cfg: BenchConfig, image_size: int,
                      wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> dict[str, dict]:
    """Forward + backward + AdamW step on a 1000-class linear head, interleaved; ratios paired per round.

    ``wrap`` sees each backbone + head (e.g. to put it under DDP) before its optimizer is built.
    """
    device = torch.device(cfg.device)
    x = torch.randn(cfg.train_batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, 1000, (cfg.train_batch_size,), device=device)
    steps = {}
    for name, backbone in models.items():
        model = wrap(nn.Sequential(backbone, nn.Linear(backbone.num_features, 1000)).to(device).train())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            with _autocast(cfg):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps[name] = step
    timed = measure_throughput(steps, cfg.train_batch_size, cfg.train_repeats, warmup=1, device=device,
                               progress=cfg.progress, baseline="vanilla", inference=False)
    # the ratio reported is time / vanilla time, the inverse of the paired speed-up
    return {n: dict(seconds=t["median_s"], ratio=1.0 / t["speedup"],
                    ratio_iqr=tuple(1.0 / r for r in reversed(t["speedup_iqr"]))) for n, t in timed.items()}


def _train_memory(models: dict[str, nn.Module], cfg: BenchConfig, image_size: int) -> dict[str, dict]:
    """Activation memory of a training forward (backbone + 1000-class head), and its ratio to vanilla's.

    On the CPU the bytes saved for backward (:func:`~repa_ssl.bench.memory.saved_activation_bytes`); on a GPU
    the peak memory allocated during forward + backward beyond what the model and its gradients hold.
    """
    device = torch.device(cfg.device)
    x = torch.randn(cfg.train_batch_size, 3, image_size, image_size, device=device)
    measured = {}
    for name, backbone in models.items():
        model = nn.Sequential(backbone, nn.Linear(backbone.num_features, 1000)).to(device).train()
        if device.type == "cuda":
            model(x).float().sum().backward()  # gradients allocated, kernels warmed
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            with _autocast(cfg):
                out = model(x)
            out.float().sum().backward()
            measured[name] = torch.cuda.max_memory_allocated(device) - base
        else:
            with _autocast(cfg):
                measured[name] = saved_activation_bytes(model, x)
    return {n: dict(memory_mb=b / 2 ** 20, memory_ratio=b / measured["vanilla"], memory="peak allocated"
                    if device.type == "cuda" else "saved for backward") for n, b in measured.items()}


def complexity_rows(models: dict[str, nn.Module], image_size: int) -> dict[str, dict]:
    """Name -> params (M) and GMACs of each model. Benchmarks count them after timing: torch's FLOP counter leaves
    the process's heap such that glibc then trims what larger models free, and the timed forwards page-fault
    (docs/performance.md, "Depth merging")."""
    return {name: dict(params_m=count_params(m) / 1e6, gmacs=count_gmacs(m, (3, image_size, image_size)))
            for name, m in models.items()}


def bench_model(key: str, cfg: BenchConfig) -> dict:
    """All measurements for one model size: vanilla, and train/fused form per θ."""
    spec = SPECS[key]
    size = spec.image_size
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    variants: dict[str, nn.Module] = {"vanilla": spec.vanilla()}
    trains: dict[str, nn.Module] = {}
    for theta in cfg.thetas:
        train_form = spec.repa(theta).eval()
        trains[f"train θ={theta}"] = train_form
        variants[f"train θ={theta}"] = train_form
        variants[f"fused θ={theta}"] = fuse_model(train_form)
    prepared = {name: _prepare(m, cfg) for name, m in variants.items()}
    x = torch.randn(cfg.batch_size, 3, size, size, device=device)

    def runner(m: nn.Module) -> Callable[[], object]:
        def run():
            with _autocast(cfg):
                return m(x)
        return run

    runners = {n: runner(m) for n, m in prepared.items()}
    if cfg.ceiling:
        for theta in cfg.thetas:
            name = f"ceiling θ={theta}"
            try:
                runners[name] = ceiling_runner(variants[f"fused θ={theta}"], x)
            except TypeError as e:  # not a RePa ViT layout the ceiling knows
                _logger.info("no ceiling for %s: %s", spec.label, e)
    speed = measure_throughput(runners, cfg.batch_size, cfg.repeats, cfg.warmup, device, progress=cfg.progress,
                               baseline="vanilla")
    rows = complexity_rows(variants, size)  # after the timing: see complexity_rows
    for name in runners:
        if name.startswith("ceiling"):
            rows[name] = dict(rows[name.replace("ceiling", "fused")])
        rows[name].update({k: speed[name][k] for k in ("images_per_s", "speedup", "speedup_iqr", "seconds")})
    result = dict(key=key, label=spec.label, image_size=size, rows=rows)

    if cfg.breakdown:
        with _autocast(cfg):
            result["breakdown"] = {n: latency_breakdown(variants[n].to(device), x) for n in variants}
    if cfg.train and spec.trainable:
        step_models = {"vanilla": spec.vanilla(), **{n: spec.repa(float(n.split("=")[1])) for n in trains}}
        memory = _train_memory(step_models, cfg, size)
        result["train_step_s"] = _train_step_times(step_models, cfg, size)
        for name, row in result["train_step_s"].items():
            row.update(memory[name])
    return result


def run_suite(cfg: BenchConfig, on_result: Optional[Callable[[dict], None]] = None) -> dict:
    """Run every configured model; ``on_result`` sees each model's result as soon as it is done."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    unknown = [m for m in cfg.models if m not in SPECS]
    if unknown:
        raise ValueError(f"unknown benchmark model(s) {unknown}; choose from {sorted(SPECS)}")
    out = dict(config=asdict(cfg), machine=machine_info(cfg), results=[])
    for key in tqdm(cfg.models, desc="models", disable=not cfg.progress):
        _logger.info("benchmarking %s", SPECS[key].label)
        result = bench_model(key, cfg)
        out["results"].append(result)
        if on_result is not None:
            on_result(out)
    return out
