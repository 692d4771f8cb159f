"""Merged blocks run a wide FFN over token chunks (fewer page faults, docs/performance.md "Depth"), exactly, only
when its hidden activations exceed the budget, and only in eager mode: traced, exported and FX graphs stay one
graph for every batch size."""
import copy

import pytest
import timm
import torch
from torch import nn

import repa_ssl
from repa_ssl.layers.branch_group import MAX_FFN_HIDDEN, MergedBlock, MergedRepaBlock
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
    for block in model.blocks:  # timm's Mlp runs part by part (GELU in place), a fused channel-idle FFN whole
        getattr(block.mlp, "fc1", block.mlp).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name,kind", [("vit_tiny_patch16_224", MergedBlock), ("test_repa_vit", MergedRepaBlock)])
@torch.no_grad()
def test_the_merged_ffn_runs_over_token_chunks_and_stays_exact(name, kind):
    branched, merged = _merged(name)
    assert all(type(b) is kind and b.max_ffn_hidden == MAX_FFN_HIDDEN for b in merged.blocks)
    x = _images(2)  # 34 tokens
    calls = _count_ffn_calls(merged)
    whole = merged(x)
    assert calls[0] == len(merged.blocks)  # far under the budget: one call
    for block in merged.blocks:
        block.max_ffn_hidden = 8 * block.ffn_hidden  # 8 tokens' hidden activations
    calls[0] = 0
    chunked = merged(x)
    assert calls[0] == 5 * len(merged.blocks)  # ceil(34 / 8) chunks in each block
    assert (chunked - branched(x)).abs().max() <= 1e-10 and (chunked - whole).abs().max() <= 1e-10


@torch.no_grad()
@torch.no_grad()
def test_the_chunk_budget_counts_hidden_activations_so_a_narrow_fused_ffn_runs_whole():
    """Chunks cost smaller GEMMs and a concatenation: only an FFN whose hidden layer is wide pays them. At the same
    budget the vanilla merged FFN (K x 4C hidden) splits, the fused RePa one (its K(1 - θ) x 4C active channels)
    does not."""
    vanilla, repa = _merged("vit_tiny_patch16_224")[1], _merged("test_repa_vit")[1]
    assert vanilla.blocks[0].ffn_hidden == vanilla.blocks[0].mlp.fc1.out_features == 2 * 4 * 48
    assert repa.blocks[0].ffn_hidden == repa.blocks[0].mlp.num_active < vanilla.blocks[0].ffn_hidden
    calls = [_count_ffn_calls(m) for m in (vanilla, repa)]
    for m in (vanilla, repa):
        for block in m.blocks:
            block.max_ffn_hidden = 17 * repa.blocks[0].ffn_hidden  # one image of the fused FFN's activations
        m(_images(1))
    assert calls[0][0] > len(vanilla.blocks) and calls[1][0] == len(repa.blocks)


def test_traced_exported_and_fx_graphs_do_not_chunk_and_serve_every_batch_size():
    """A graph recorded at one batch size must not keep that batch's chunk count (or refuse to trace at all)."""
    _, merged = _merged("test_repa_vit")
    merged = merged.float()
    for block in merged.blocks:
        block.max_ffn_hidden = 8 * block.ffn_hidden
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
