"""The fast training forms of the channel-idle FFN are eq. 2 (float64), and the layer uses them only where
it should: outputs, gradients and BatchNorm running statistics equal the module calls."""
import copy

import pytest
import torch

from torch import nn

from repa_ssl import ChannelIdleMlp
from repa_ssl.bench.memory import saved_activation_bytes
from repa_ssl.layers import channel_idle_mlp
from repa_ssl.layers.channel_idle_kernels import idle_matrix_is_cheaper
from conftest import randomize_batchnorms


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _uses_idle_matrix(mlp: ChannelIdleMlp, tokens: int) -> bool:
    batch_stats = mlp.norm2.training or mlp.norm2.running_mean is None
    return idle_matrix_is_cheaper(mlp.fc1.in_features, mlp.fc1.out_features - mlp.num_active, tokens, batch_stats)


KERNEL = {"columns": "ffn_column_blocks", "matrix": "ffn_idle_as_matrix", "lean": "lean_train_ffn"}


@pytest.mark.parametrize("theta,tokens,path,train", [
    *[(theta, 15, "columns", train) for theta in (0.25, 0.75) for train in (True, False)],  # small batches
    # the idle path as one C x C matrix from the batch statistics, or from the running statistics in evaluation
    *[(theta, 200, "matrix", train) for theta in (0.5, 0.75) for train in (True, False)],
    (0.5, 200, "lean", True), (0.75, 200, "lean", True),  # the same in training as one autograd function
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fast_training_paths_equal_the_concatenating_reference(theta, tokens, path, train, momentum, kernel_calls,
                                                               monkeypatch):
    """The fast train-form FFNs (column blocks; the idle channels as a C x C matrix, through autograd or as the
    lean autograd function) are the paper's eq. 2: outputs, gradients and BatchNorm running statistics included."""
    if path == "matrix":
        monkeypatch.setattr(channel_idle_mlp, "lean_train_ffn_applies", lambda *args: False)
    torch.manual_seed(0)
    fast = randomize_batchnorms(ChannelIdleMlp(16, 64, idle_ratio=theta)).double().train(train)
    fast.norm1.momentum = fast.norm2.momentum = momentum
    ref = copy.deepcopy(fast)
    if train:
        assert _uses_idle_matrix(fast, tokens) == (path != "columns")
    x = (torch.randn(tokens // 5, 5, 16, dtype=torch.float64) + 0.5).requires_grad_()  # off-centre tokens
    x_ref = x.detach().clone().requires_grad_()
    k = fast.num_active

    def reference(m, inp):
        h = m.fc1(m.norm1(inp.reshape(-1, 16)))
        h = torch.cat([m.act(h[:, :k]), h[:, k:]], dim=1)
        return inp + m.fc2(m.norm2(h)).view(inp.shape)

    for _ in range(2):  # two steps: the second normalises with the first's running statistics in its shifts
        out, expected = fast(x), reference(ref, x_ref)
        assert (out - expected).abs().max().item() <= 1e-10
        grad = torch.randn_like(out)
        (out * grad).sum().backward()
        (expected * grad).sum().backward()
    assert kernel_calls == [KERNEL[path]] * 2 if train else kernel_calls
    assert (x.grad - x_ref.grad).abs().max().item() <= 1e-10
    for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
        assert (p.grad - p_ref.grad).abs().max().item() <= 1e-10, name
    for (name, b), b_ref in zip(fast.named_buffers(), ref.buffers()):
        assert torch.allclose(b.double(), b_ref.double(), atol=1e-12), name


@pytest.mark.parametrize("bias,affine,track_running_stats", [
    (False, True, True), (True, False, True), (True, True, False), (False, False, False)])
def test_lean_training_kernel_without_biases_affine_or_running_statistics(bias, affine, track_running_stats,
                                                                          kernel_calls):
    torch.manual_seed(0)
    fast = ChannelIdleMlp(16, 64, idle_ratio=0.75, bias=bias).double().train()
    for name in ("norm1", "norm2"):
        norm = nn.BatchNorm1d(getattr(fast, name).num_features, affine=affine, track_running_stats=track_running_stats)
        setattr(fast, name, randomize_batchnorms(norm) if affine and track_running_stats else norm.double())
    fast.double()
    ref = copy.deepcopy(fast)
    ref.fast_paths = False
    x = (torch.randn(40, 5, 16, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, expected = fast(x), ref(x_ref)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (expected * grad).sum().backward()
    assert kernel_calls == ["lean_train_ffn"]
    assert (out - expected).abs().max().item() <= 1e-10
    assert (x.grad - x_ref.grad).abs().max().item() <= 1e-10
    for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
        assert (p.grad - p_ref.grad).abs().max().item() <= 1e-10, name
    for (name, b), b_ref in zip(fast.named_buffers(), ref.buffers()):
        assert torch.allclose(b.double(), b_ref.double(), atol=1e-12), name


@pytest.mark.parametrize("theta", [0.5, 0.75])
def test_lean_training_kernel_keeps_only_the_input_and_active_pre_activations(theta, monkeypatch):
    """What a training forward keeps for backward: the FFN input and the active channels before the activation
    (plus per-channel statistics and weight-sized matrices), not norm1's output, the activations or norm2's."""
    torch.manual_seed(0)
    mlp = ChannelIdleMlp(64, 256, idle_ratio=theta).train()
    x = torch.randn(8, 50, 64, requires_grad=True)
    k, c, n = mlp.num_active, 64, 400
    assert _uses_idle_matrix(mlp, n)
    lean = saved_activation_bytes(mlp, x)
    assert lean <= 4 * (n * c + n * k + (256 - k) * c + c * c + 8 * 256)  # + W_idle Σ, the idle matrix, statistics
    monkeypatch.setattr(channel_idle_mlp, "lean_train_ffn_applies", lambda *args: False)
    assert saved_activation_bytes(mlp, x) >= lean + 4 * n * (c + k)  # through autograd: norm1's output, act(h), ...


def test_matrix_training_path_keeps_batchnorm_statistics_in_fp32_under_autocast():
    torch.manual_seed(0)
    mlp = randomize_batchnorms(ChannelIdleMlp(32, 128, idle_ratio=0.75)).train()
    x = torch.randn(8, 50, 32)
    assert _uses_idle_matrix(mlp, 400)
    full = mlp(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = mlp(x)
    assert _max_rel(low.float(), full.detach()) < 0.05


def test_two_forwards_before_one_backward_as_in_multi_crop_training():
    """DINO runs global and local crops through the student before one backward: the running-statistics
    update of the second call must not invalidate the first call's saved tensors."""
    mlp = randomize_batchnorms(ChannelIdleMlp(32, 128, idle_ratio=0.75)).train()
    assert _uses_idle_matrix(mlp, 400)
    loss = mlp(torch.randn(8, 50, 32)).square().mean() + mlp(torch.randn(8, 50, 32)).square().mean()
    loss.backward()
    assert mlp.fc1.weight.grad is not None and mlp.norm2.num_batches_tracked.item() == 2


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("fast_paths", [True, False])
def test_fast_paths_flag_selects_the_kernels_or_the_module_calls(fast_paths, train, kernel_calls):
    """``fast_paths=False`` runs eq. 2's module calls (for reading and debugging); both give the same result."""
    torch.manual_seed(0)
    mlp = randomize_batchnorms(ChannelIdleMlp(16, 64, idle_ratio=0.75, fast_paths=fast_paths)).double().train(train)
    reference = copy.deepcopy(mlp)
    reference.fast_paths = not fast_paths
    x = torch.randn(40, 5, 16, dtype=torch.float64)
    out = mlp(x)
    assert kernel_calls == ([KERNEL["lean" if train else "matrix"]] if fast_paths else [])
    assert (out - reference(x)).abs().max().item() <= 1e-10


def test_lean_training_kernel_refuses_a_backward_after_its_weights_changed_in_place(kernel_calls):
    """As autograd does for its own functions: a backward with other weights than the forward's would be wrong."""
    mlp = ChannelIdleMlp(32, 128, idle_ratio=0.75).train()
    out = mlp(torch.randn(8, 50, 32))
    assert kernel_calls == ["lean_train_ffn"]
    with torch.no_grad():
        mlp.fc1.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
