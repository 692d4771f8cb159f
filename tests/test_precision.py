"""``--precision``: ``auto`` is resolved in one place, the same for DINO training and the benchmarks."""
import pytest
import torch

from repa_ssl.precision import autocast, autocast_for, resolve_precision


def test_auto_is_fp16_on_gpu_and_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp16"  # the reference DINO's use_fp16
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="one of auto, fp32, fp16, bf16, got 'fp8'"):
        resolve_precision("fp8", "cpu")


def test_cpu_training_runs_in_fp32_and_refuses_half_precision_with_the_fix():
    context, scaler = autocast_for("auto", torch.device("cpu"))
    with context():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert scaler is None
    with pytest.raises(ValueError, match="--precision bf16 needs a GPU; on CPU use --precision fp32"):
        autocast_for("bf16", torch.device("cpu"))


def test_bf16_autocast_computes_in_bf16():
    with autocast("bf16", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
