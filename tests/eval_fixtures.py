"""Fixtures for the evaluation tests, built exactly as the run-format contracts describe."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
from PIL import Image

import repa_ssl
from conftest import randomize_batchnorms, tiny_vit


def write_image_folder(root: Path, classes: Sequence[str], per_class: int = 3, size: int = 40, seed: int = 0) -> Path:
    """root/<class>/<i>.png: each class a distinct base colour plus noise (real PNG files)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            noise = rng.integers(-40, 40, size=(size, size, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def dino_checkpoint(path: Path, arch: str = "test_repa_vit", idle_ratio: float = 0.75) -> dict:
    """A DINO run checkpoint dict (contract keys), teacher and student with different weights."""
    student = tiny_vit(num_classes=0, idle_ratio=idle_ratio)
    teacher = randomize_batchnorms(tiny_vit(num_classes=0, idle_ratio=idle_ratio), seed=1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    head = {"head.mlp.0.weight": torch.randn(32, 64), "head.last_layer.weight_g": torch.ones(128, 1)}

    def wrapper_state(m):
        return {**{f"backbone.{k}": v for k, v in m.state_dict().items()}, **head}

    ckpt = dict(student=wrapper_state(student), teacher=wrapper_state(teacher), optimizer={}, scaler=None,
                dino_loss={"center": torch.zeros(1, 128)}, epoch=2, iteration=10,
                args=dict(arch=arch, idle_ratio=idle_ratio, idle_schedule="uniform", out_dim=128,
                          global_crop_size=64), rng={})
    repa_ssl.save_checkpoint(ckpt, path)
    return dict(student=student, teacher=teacher)


def clip_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorms(open_clip.create_model("RePa-ViT-Test"), seed).eval()


def clip_train_checkpoint(path: Path, model: torch.nn.Module) -> Path:
    """open_clip_train's checkpoints/epoch_N.pt, DDP-prefixed, plus the run's params.txt."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    repa_ssl.save_checkpoint(dict(epoch=1, name="run", state_dict=state, optimizer={}), path)
    (path.parent.parent / "params.txt").write_text("batch_size: 8\nmodel: RePa-ViT-Test\nlr: 0.0005\n")
    return path


def clip_fused_export(path: Path, model: torch.nn.Module, images: torch.Tensor, source: Path) -> Path:
    """The fused CLIP export: plain fused state dict via save_checkpoint + JSON sidecar."""
    fused = repa_ssl.fuse_model(model)
    report = repa_ssl.verify_fusion(model, fused, images).check()
    repa_ssl.save_checkpoint(fused.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(dict(
        model_name="RePa-ViT-Test-fused", source_model="RePa-ViT-Test", fusion=report.as_dict(),
        source_checkpoint=str(source))))
    return path
