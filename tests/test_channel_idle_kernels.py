"""The fast training forms of the channel-idle FFN are eq. 2 (float64), and the layer uses them only where
it should: outputs, gradients and BatchNorm running statistics equal the module calls."""
import copy

import pytest
import torch

from repa_ssl import ChannelIdleMlp
from repa_ssl.layers import channel_idle_kernels
from repa_ssl.layers.channel_idle_kernels import idle_matrix_is_cheaper
from conftest import randomize_batchnorms


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _uses_idle_matrix(mlp: ChannelIdleMlp, tokens: int) -> bool:
    batch_stats = mlp.norm2.training or mlp.norm2.running_mean is None
    return idle_matrix_is_cheaper(mlp.fc1.in_features, mlp.fc1.out_features - mlp.num_active, tokens, batch_stats)


@pytest.mark.parametrize("theta,tokens,as_matrix", [
    (0.25, 15, False), (0.75, 15, False),  # column blocks: small batches
    (0.5, 200, True), (0.75, 200, True),  # idle path as one C x C matrix from the batch statistics
])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fast_training_paths_equal_the_concatenating_reference(theta, tokens, as_matrix, train, momentum):
    """Both fast train-form FFNs (column blocks; the idle channels as a C x C matrix) are the paper's
    eq. 2: outputs, gradients and BatchNorm running statistics included."""
    torch.manual_seed(0)
    fast = randomize_batchnorms(ChannelIdleMlp(16, 64, idle_ratio=theta)).double().train(train)
    fast.norm2.momentum = momentum
    ref = copy.deepcopy(fast)
    if train:
        assert _uses_idle_matrix(fast, tokens) == as_matrix
    x = (torch.randn(tokens // 5, 5, 16, dtype=torch.float64) + 0.5).requires_grad_()  # off-centre tokens
    x_ref = x.detach().clone().requires_grad_()
    k = fast.num_active

    def reference(m, inp):
        h = m.fc1(m.norm1(inp.reshape(-1, 16)))
        h = torch.cat([m.act(h[:, :k]), h[:, k:]], dim=1)
        return inp + m.fc2(m.norm2(h)).view(inp.shape)

    out, expected = fast(x), reference(ref, x_ref)
    assert (out - expected).abs().max().item() <= 1e-10
    out.square().sum().backward()
    expected.square().sum().backward()
    assert (x.grad - x_ref.grad).abs().max().item() <= 1e-10
    for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
        assert (p.grad - p_ref.grad).abs().max().item() <= 1e-10, name
    for (name, b), b_ref in zip(fast.named_buffers(), ref.buffers()):
        assert torch.allclose(b.double(), b_ref.double(), atol=1e-12), name


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


@pytest.mark.parametrize("fast_paths", [True, False])
def test_fast_paths_flag_selects_the_kernels_or_the_module_calls(fast_paths, monkeypatch):
    """``fast_paths=False`` runs eq. 2's module calls (for reading and debugging); both give the same result."""
    from repa_ssl.layers import channel_idle_mlp

    calls = []

    def spy(*args):
        calls.append(args[-1])
        return channel_idle_kernels.fast_channel_idle_ffn(*args)

    monkeypatch.setattr(channel_idle_mlp, "fast_channel_idle_ffn", spy)
    torch.manual_seed(0)
    mlp = randomize_batchnorms(ChannelIdleMlp(16, 64, idle_ratio=0.75, fast_paths=fast_paths)).double().train()
    reference = copy.deepcopy(mlp)
    reference.fast_paths = not fast_paths
    x = torch.randn(40, 5, 16, dtype=torch.float64)
    out = mlp(x)
    assert calls == ([mlp.num_active] if fast_paths else [])
    assert (out - reference(x)).abs().max().item() <= 1e-10
