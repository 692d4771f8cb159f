"""The deploy FFNs' in-place GELU (repa_ssl/layers/inference_kernels.py): the plain form's numbers, in the hidden
buffer it already has, and never where autograd or a graph capture needs the plain form."""
import copy

import pytest
import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import repa_ssl
from repa_ssl.layers.inference_kernels import linear_then_activation
from conftest import randomize_batchnorms


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_in_place_is_the_plain_gelu_in_the_linears_buffer(approximate):
    fc, act = nn.Linear(24, 96).double(), nn.GELU(approximate=approximate)
    x = torch.randn(64, 24, dtype=torch.float64)
    expected = act(fc(x))
    with torch.inference_mode(), _CountOps() as ops:
        out = linear_then_activation(fc, act, x)
    assert ops.calls.get("aten.gelu_.default") == 1 and "aten.gelu.default" not in ops.calls  # one buffer, not two
    assert torch.equal(out, expected)


def test_autograd_swapped_layers_and_other_activations_get_the_plain_form():
    fc = nn.Linear(16, 16).double()
    x = torch.randn(8, 16, dtype=torch.float64)
    out = linear_then_activation(fc, nn.GELU(), x)
    assert out.grad_fn.name() == "GeluBackward0"  # GELU's backward needs its input: not overwritten
    out.sum().backward()
    assert fc.weight.grad is not None

    class Doubled(nn.GELU):  # a subclass may compute something else: it is called
        def forward(self, h):
            return 2 * super().forward(h)

    with torch.no_grad():
        assert torch.equal(linear_then_activation(fc, Doubled(), x), 2 * nn.functional.gelu(fc(x)))
        identity = nn.Identity()  # a layer whose output is not a new tensor: its input must stay untouched
        before = x.clone()
        assert torch.equal(linear_then_activation(identity, nn.GELU(), x), nn.functional.gelu(before))
        assert torch.equal(x, before)
        with _CountOps() as ops:
            linear_then_activation(fc, nn.ReLU(), x)
        assert "aten.relu.default" in ops.calls


class _CountOps(TorchDispatchMode):
    def __enter__(self):
        self.calls = {}
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] = self.calls.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def _deploy_models() -> list[nn.Module]:
    """A fused RePa tower and a merged vanilla one (timm Mlp) and a fused + merged RePa one, float64."""
    small = dict(img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=3)
    torch.manual_seed(0)
    fused = repa_ssl.fuse_model(randomize_batchnorms(timm.create_model("test_repa_vit", **small)).double().eval())
    merged = []
    for name in ("vit_tiny_patch16_224", "test_repa_vit"):
        model = randomize_batchnorms(timm.create_model(name, **small)).double().eval()
        repa_ssl.set_branch_join(repa_ssl.branch_model(model, 2), 0.0)
        merged.append(repa_ssl.fuse_model(model))
    return [fused, *merged]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["fused", "merged vanilla", "fused+merged"])
def test_deploy_models_give_the_same_numbers_in_inference_as_under_autograd(index):
    """Inference (GELU in place) against the same model with autograd on (the plain form), float64."""
    model = _deploy_models()[index]
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    plain = model(x.clone().requires_grad_())
    with torch.inference_mode(), _CountOps() as ops:
        fast = model(x)
    assert ops.calls.get("aten.gelu_.default") == len(model.blocks)  # every FFN took the in-place kernel
    assert (fast - plain.detach()).abs().max().item() <= 1e-12
    traced = torch.jit.trace(copy.deepcopy(model), (x,))
    assert "gelu_" not in str(traced.graph)  # graphs keep the plain GELU
