"""A training step of the train form under each training option (``torch.compile``, autocast bf16 / fp16,
gradient checkpointing) runs the fast channel-idle kernels and computes what the eager fp32 step computes:
outputs, gradients and BatchNorm running statistics (kept in fp32)."""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import pytest
import torch
from torch import nn

from repa_ssl import ChannelIdleMlp
from conftest import tiny_vit

# batch 1: 17 tokens per image, too few for the C x C idle matrix; batch 4: enough (tests/test_models.py)
PATHS = pytest.mark.parametrize("batch,kernel", [(1, "ffn_column_blocks"), (4, "ffn_idle_as_matrix")],
                                ids=["column_blocks", "idle_matrix"])
# in eager float32 training the idle-matrix path runs as the one autograd function that keeps less for backward
EAGER_PATHS = pytest.mark.parametrize("batch,kernel", [(1, "ffn_column_blocks"), (4, "lean_train_ffn")],
                                      ids=["column_blocks", "lean_idle_matrix"])


def _step(model: nn.Module, x: torch.Tensor, autocast: torch.dtype | None = None,
          forward: Callable | None = None) -> dict[str, torch.Tensor]:
    """One training forward (``forward``, default ``model``) and backward; the output, the gradients and the
    BatchNorm buffers it leaves in ``model``."""
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        out = (model if forward is None else forward)(x)
    out.float().square().mean().backward()
    result = {"output": out.detach().float()}
    result.update({f"{n}.grad": p.grad for n, p in model.named_parameters()})
    result.update({n: b for n, b in model.named_buffers() if not n.endswith("num_batches_tracked")})
    return result


def _reference(batch: int) -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    model = tiny_vit().train()
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, x, _step(copy.deepcopy(model), x)


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float, atol: float):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name].float(), value.float(), rtol=rtol, atol=atol, msg=name)


@PATHS
def test_compiled_training_step_matches_eager_and_runs_the_fast_kernels(batch, kernel, kernel_calls):
    """``torch.compile`` traces the fast kernels in one graph (no break), with the running-statistics update.

    The ``aot_eager`` backend (Dynamo + AOTAutograd's functionalised graph, where an in-place buffer update could
    get lost) keeps the test to seconds; inductor only lowers that graph."""
    model, x, expected = _reference(batch)
    kernel_calls.clear()
    got = _step(model, x, forward=torch.compile(model, backend="aot_eager", fullgraph=True))
    assert kernel_calls and set(kernel_calls) == {kernel}
    _assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert all(int(v) == 1 for n, v in model.named_buffers() if n.endswith("num_batches_tracked"))


def _relative_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], suffix: str) -> float:
    """Of all outputs or all gradients together; of the running statistics, the largest of any channel."""
    names = [n for n in expected if n.endswith(suffix)]
    if "running" in suffix:
        return max(((got[n] - expected[n]).abs() / (expected[n].abs() + 1e-3)).max().item() for n in names)
    diff = torch.cat([(got[n].float() - expected[n].float()).flatten() for n in names])
    return (diff.norm() / torch.cat([expected[n].float().flatten() for n in names]).norm()).item()


@PATHS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_training_step_runs_the_fast_kernels_with_fp32_statistics(batch, kernel, dtype, kernel_calls):
    """Under CPU autocast the fast kernels run, the BatchNorm statistics are taken and kept in fp32 (running
    statistics), and the output, the gradients and the running statistics are as close to the fp32 step's as those
    of eq. 2's module calls under the same autocast."""
    model, x, expected = _reference(batch)
    module_calls = copy.deepcopy(model)
    for mlp in module_calls.modules():
        if isinstance(mlp, ChannelIdleMlp):
            mlp.fast_paths = False
    kernel_calls.clear()
    got = _step(model, x, autocast=dtype)
    assert kernel_calls and set(kernel_calls) == {kernel}
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "running" in n)
    baseline = _step(module_calls, x, autocast=dtype)
    for suffix in ("output", ".grad", ".running_mean", ".running_var"):
        error, baseline_error = _relative_error(got, expected, suffix), _relative_error(baseline, expected, suffix)
        assert error < 0.03 and error <= 1.25 * baseline_error, (suffix, error, baseline_error)


@EAGER_PATHS
def test_gradient_checkpointing_runs_the_fast_kernels(batch, kernel, kernel_calls):
    """Checkpointing re-runs each block's forward in backward: the fast kernels, again, on both passes."""
    model, x, expected = _reference(batch)
    model.set_grad_checkpointing(True)
    kernel_calls.clear()
    got = _step(model, x)
    assert kernel_calls == [kernel] * 4  # 2 blocks, forward and recomputation
    _assert_close(got, expected, rtol=1e-4, atol=1e-6)
