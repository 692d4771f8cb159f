"""Merged blocks run their wide FFN over token chunks (fewer page faults, docs/performance.md "Depth"), exactly,
and only in eager mode: traced, exported and FX graphs stay one graph for every batch size."""
import copy

import pytest
import timm
import torch
from torch import nn

import repa_ssl
from repa_ssl.layers.branch_group import MAX_FFN_TOKENS, MergedBlock, MergedRepaBlock
from conftest import randomize_batchnorms

SMALL = dict(img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=3)  # 17 tokens an image


def _merged(name: str, branches: int = 2) -> tuple[nn.Module, nn.Module]:
    """(branch form at s = 0, its merged form), float64, with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = randomize_batchnorms(timm.create_model(name, **SMALL)).double().eval()
    repa_ssl.set_branch_join(repa_ssl.branch_model(model, branches), 0.0)
    return model, repa_ssl.fuse_model(copy.deepcopy(model))


def _images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n), dtype=torch.float64)


def _count_ffn_calls(model: nn.Module) -> list[int]:
    calls = [0]
    for block in model.blocks:
        block.mlp.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name,kind", [("vit_tiny_patch16_224", MergedBlock), ("test_repa_vit", MergedRepaBlock)])
@torch.no_grad()
def test_the_merged_ffn_runs_over_token_chunks_and_stays_exact(name, kind):
    branched, merged = _merged(name)
    assert all(type(b) is kind and b.max_ffn_tokens == MAX_FFN_TOKENS for b in merged.blocks)
    x = _images(2)  # 34 tokens
    whole = merged(x)
    for block in merged.blocks:
        block.max_ffn_tokens = 8
    calls = _count_ffn_calls(merged)
    chunked = merged(x)
    assert calls[0] == 5 * len(merged.blocks)  # ceil(34 / 8) chunks in each block
    assert (chunked - branched(x)).abs().max() <= 1e-10 and (chunked - whole).abs().max() <= 1e-10


@torch.no_grad()
def test_traced_exported_and_fx_graphs_do_not_chunk_and_serve_every_batch_size():
    """A graph recorded at one batch size must not keep that batch's chunk count (or refuse to trace at all)."""
    _, merged = _merged("test_repa_vit")
    merged = merged.float()
    for block in merged.blocks:
        block.max_ffn_tokens = 8
    small, large = _images(2).float(), _images(5).float()  # export specialises a batch of 1
    batch = torch.export.Dim("batch", min=1, max=64)
    graphs = dict(trace=torch.jit.trace(merged, (small,)), fx=torch.fx.symbolic_trace(merged),
                  export=torch.export.export(merged, (small,), dynamic_shapes=({0: batch},)).module(),
                  script=torch.jit.script(merged))
    for graph in graphs.values():
        torch.testing.assert_close(graph(large), merged(large), rtol=1e-5, atol=1e-5)
    calls = _count_ffn_calls(merged)
    graphs["fx"] = torch.fx.symbolic_trace(merged)  # traced after the hooks: counts its FFN calls
    graphs["fx"](large)
    assert calls[0] == len(merged.blocks)
