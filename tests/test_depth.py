"""Depth reparameterization is exact: the branch form at join s = 1 is the deep model, the merged (fused) model
is the branch form at s = 0 (float64, <= 1e-10), for RePa ViTs, vanilla timm ViTs and OpenCLIP towers."""
import copy

import open_clip
import pytest
import timm
import torch
from torch import nn

import repa_ssl
from repa_ssl import BranchGroup, FusionError
from repa_ssl.export import check_onnx, export_onnx
from repa_ssl.models import repa_variant_name
from conftest import randomize_batchnorms

# Narrow 12-layer models (32 px, patch 8): the structure of ViT-Tiny/Small and OpenCLIP B/16, a fraction of the cost.
NARROW = dict(img_size=32, patch_size=8, depth=12, embed_dim=48, num_heads=3, init_values=0.5)
LINEAR_THETAS = [0.0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0, 0.9, 0.1, 0.6]


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial LayerNorm affines, biases and BatchNorm statistics, so that every fold is exercised."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=g) * 0.3)
    return randomize_batchnorms(model).double().eval()


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return _randomize(timm.create_model(name, **dict(NARROW, **kwargs)))


def _openclip_b16_narrow(depth: int = 12) -> nn.Module:
    """OpenCLIP's ViT-B-16 config (ResidualAttentionBlock, nn.MultiheadAttention, token pooling), narrow."""
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, width=48, layers=depth, head_width=16, ls_init_value=0.5)
    text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return _randomize(open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text))


MODELS = {  # kind -> model of a given depth
    "repa-theta0": lambda depth=12: _timm("test_repa_vit", depth=depth, idle_ratio=0.0),
    "repa-theta0.5": lambda depth=12: _timm("test_repa_vit", depth=depth, idle_ratio=0.5),
    "repa-theta0.75": lambda depth=12: _timm("test_repa_vit", depth=depth, idle_ratio=0.75),
    "repa-theta1": lambda depth=12: _timm("test_repa_vit", depth=depth, idle_ratio=1.0),
    "repa-per-layer-theta": lambda depth=12: _timm("test_repa_vit", depth=depth, idle_ratio=LINEAR_THETAS[:depth]),
    "repa-avg-pool": lambda depth=12: _timm("test_repa_vit", depth=depth, global_pool="avg"),
    "vit-tiny": lambda depth=12: _timm("vit_tiny_patch16_224", depth=depth, qkv_bias=False),
    "vit-small-avg-pool": lambda depth=12: _timm("vit_small_patch16_224", depth=depth, embed_dim=96, num_heads=6,
                                                 global_pool="avg"),
    "openclip-b16": _openclip_b16_narrow,
}


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n), dtype=torch.float64)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.encode_image(x) if hasattr(model, "encode_image") else model(x)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _blocks(model: nn.Module) -> nn.Module:
    return model.visual.transformer.resblocks if hasattr(model, "visual") else model.blocks


# (kind, K, depth): every K at depth 12 for the acceptance models (RePa θ = 0.75, vanilla ViT-Tiny) and the
# OpenCLIP B/16 tower; two groups of one K for the others (suite time).
CASES = [("repa-theta0.75", 2, 12), ("repa-theta0.75", 3, 12), ("repa-theta0.75", 4, 12), ("vit-tiny", 2, 12),
         ("vit-tiny", 3, 12), ("vit-tiny", 4, 12), ("openclip-b16", 3, 12), ("openclip-b16", 2, 4),
         ("repa-theta0", 3, 6), ("repa-theta0.5", 4, 8), ("repa-theta1", 2, 4), ("repa-per-layer-theta", 4, 8),
         ("repa-avg-pool", 2, 4), ("vit-small-avg-pool", 3, 6)]


@pytest.mark.parametrize("kind,branches,depth", CASES, ids=[f"{kind}-K{k}-depth{d}" for kind, k, d in CASES])
@torch.no_grad()
def test_branch_form_is_the_deep_model_at_s1_and_the_merged_model_at_s0(kind, branches, depth):
    model = MODELS[kind](depth)
    x = _images()
    deep = _forward(model, x)
    branched = repa_ssl.branch_model(copy.deepcopy(model), branches=branches)
    assert repa_ssl.branch_join(branched) == 1.0 and len(_blocks(branched)) == depth // branches
    assert _max_err(_forward(branched, x), deep) <= 1e-10

    repa_ssl.set_branch_join(branched, 0.0)
    joined = _forward(branched, x)
    assert _max_err(joined, deep) > 1e-3  # the join changed the function
    merged = repa_ssl.fuse_model(branched)
    assert not any(isinstance(m, BranchGroup) for m in merged.modules())
    assert len(_blocks(merged)) == depth // branches
    assert _blocks(merged)[0].attn.num_heads == branches * _blocks(model)[0].attn.num_heads
    assert _max_err(_forward(merged, x), joined) <= 1e-10
    assert repa_ssl.verify_fusion(branched, merged, x).max_rel_err <= 1e-10


def test_the_evaluation_fusion_gate_merges_a_branched_vanilla_tower_and_verifies_it():
    from repa_ssl.eval.towers import Tower, fuse_and_verify

    model = repa_ssl.branch_model(MODELS["vit-tiny"](), branches=4)
    repa_ssl.set_branch_join(model, 0.0)
    x = _images()
    tower = fuse_and_verify(Tower(model, "vit_tiny_patch16_224", "model_name", "test", 32, (0.5,) * 3, (0.5,) * 3), x)
    assert len(tower.model.blocks) == 3 and tower.fusion["ok"] and tower.fusion["max_rel_err"] <= 1e-10
    with torch.no_grad():
        assert _max_err(tower.model(x), model(x)) <= 1e-10


def test_the_repa_clip_tower_branches_and_its_text_tower_stays():
    torch.manual_seed(0)
    clip = _randomize(open_clip.create_model("RePa-ViT-Test"))
    x, text = _images(size=64), open_clip.get_tokenizer("RePa-ViT-Test")(["a photo of a seven"])
    with torch.no_grad():
        deep_image, deep_text = clip.encode_image(x), clip.encode_text(text)
        repa_ssl.branch_model(clip, branches=2)
        assert not any(isinstance(m, BranchGroup) for m in clip.transformer.modules())
        assert _max_err(clip.encode_image(x), deep_image) <= 1e-10
        repa_ssl.set_branch_join(clip, 0.0)
        merged = repa_ssl.fuse_model(clip)
        assert _max_err(merged.encode_image(x), clip.encode_image(x)) <= 1e-10
        assert torch.equal(merged.encode_text(text), deep_text)


@torch.no_grad()
def test_the_join_has_no_jump_where_the_stages_meet():
    """At s = 0.5 stage 1 (λ = 0) and stage 2 (μ = 0) are the same function: the schedule is continuous."""
    branched = repa_ssl.branch_model(MODELS["repa-theta0.75"](), branches=3)
    repa_ssl.set_branch_join(branched, 0.5)
    x = _images()
    parallel = branched(x)
    for group in branched.blocks:
        group.parallel = False
    assert _max_err(branched(x), parallel) <= 1e-10
    repa_ssl.set_branch_join(branched, 0.5 + 1e-9)
    assert not branched.blocks[0].parallel and _max_err(branched(x), parallel) <= 1e-6
    assert repa_ssl.join_stages(0.75) == (0.5, 0.0) and repa_ssl.join_stages(0.25) == (0.0, 0.5)


@pytest.mark.parametrize("fuse", [repa_ssl.fuse_model, timm.utils.reparameterize_model], ids=["repa_ssl", "timm"])
def test_fusion_before_the_join_is_finished_is_refused(fuse):
    branched = repa_ssl.branch_model(MODELS["vit-tiny"](), branches=2)
    repa_ssl.set_branch_join(branched, 0.5)
    with pytest.raises(FusionError, match="join s = 0.5; merging needs s = 0: finish the join schedule"):
        fuse(branched)
    assert repa_ssl.branch_join(branched) == 0.5 and len(branched.blocks) == 6  # untouched


def test_a_branch_form_trains_and_its_checkpoint_restores_the_join():
    torch.manual_seed(0)
    model = timm.create_model("test_repa_vit", depth=4, depth_branches=2).train()
    repa_ssl.set_branch_join(model, 0.3)
    model(_images(size=64).float()).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    restored = timm.create_model("test_repa_vit", depth=4, depth_branches=2)
    assert repa_ssl.branch_join(restored) == 1.0
    restored.load_state_dict(model.state_dict())
    assert repa_ssl.branch_join(restored) == pytest.approx(0.3) and restored.blocks[0].parallel
    x = _images(size=64).float()
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_create_model_builds_the_branch_form_at_s1_from_the_deep_models_initialisation():
    torch.manual_seed(0)
    deep = timm.create_model("test_repa_vit", depth=4)
    torch.manual_seed(0)
    branched = timm.create_model("test_repa_vit", depth=4, depth_branches=2)
    assert repa_ssl.branch_join(branched) == 1.0 and len(branched.blocks) == 2
    assert [f["module"] for f in branched.feature_info] == ["blocks.0", "blocks.1"]
    x = _images(size=64).float()
    with torch.no_grad():
        torch.testing.assert_close(branched.eval()(x), deep.eval()(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="depth_branches=3 must divide the depth 4"):
        timm.create_model("test_repa_vit", depth=4, depth_branches=3)


def test_a_deep_checkpoint_loads_into_the_branch_form(tmp_path):
    """timm's pretrained machinery (e.g. the authors' checkpoints) fills the branch form; so does branch_state_dict."""
    deep = _randomize(timm.create_model("test_repa_vit", depth=4)).float()
    torch.save(deep.state_dict(), tmp_path / "deep.pth")
    branched = timm.create_model("test_repa_vit", depth=4, depth_branches=2, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "deep.pth"))).eval()
    again = timm.create_model("test_repa_vit", depth=4, depth_branches=2).eval()
    again.load_state_dict(repa_ssl.branch_state_dict(deep.state_dict(), branches=2))
    x = _images(size=64).float()
    with torch.no_grad():
        ref = deep(x)
        torch.testing.assert_close(branched(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again(x), ref, rtol=1e-5, atol=1e-5)
    assert repa_ssl.branch_join(branched) == 1.0
    state = again.state_dict()
    assert repa_ssl.branch_state_dict(state, branches=2) is state  # already in branch form


@pytest.mark.parametrize("idle_ratio", [0.75, [0.0, 0.5, 1.0, 0.75]], ids=["uniform", "per-layer"])
def test_a_merged_checkpoint_loads_into_the_directly_built_deploy_form(idle_ratio):
    torch.manual_seed(0)
    branched = _randomize(timm.create_model("test_repa_vit", depth=4, depth_branches=2, idle_ratio=idle_ratio))
    repa_ssl.set_branch_join(branched, 0.0)
    merged = repa_ssl.fuse_model(branched)
    direct = timm.create_model("test_repa_vit", depth=4, depth_branches=2, idle_ratio=idle_ratio,
                               inference_mode=True).double().eval()
    assert repa_ssl.is_fused(direct) and len(direct.blocks) == 2
    direct.load_state_dict(merged.state_dict(), strict=True)
    x = _images(size=64)
    with torch.no_grad():
        assert torch.equal(direct(x), merged(x))
    assert repa_ssl.count_params(direct) == repa_ssl.count_params(merged)


def test_a_merged_clip_loads_into_its_openclip_config():
    torch.manual_seed(0)
    clip = repa_ssl.branch_model(randomize_batchnorms(open_clip.create_model("RePa-ViT-Test")).eval(), branches=2)
    repa_ssl.set_branch_join(clip, 0.0)
    merged = repa_ssl.fuse_model(clip)
    name = repa_variant_name("RePa-ViT-Test", depth_branches=2)
    assert name == "RePa-ViT-Test-merged2"
    deploy = open_clip.create_model(name).eval()
    deploy.load_state_dict(merged.state_dict(), strict=True)
    x = _images(size=64).float()
    with torch.no_grad():
        assert torch.equal(deploy.encode_image(x), merged.encode_image(x))
    b16 = open_clip.create_model("RePa-ViT-B-16-merged2", device="meta").visual.trunk
    assert len(b16.blocks) == 6 and b16.blocks[0].attn.num_heads == 24 and b16.idle_ratios == [0.75] * 12


def test_merged_blocks_script_trace_export_and_run_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    branched = randomize_batchnorms(timm.create_model("test_repa_vit_clip", depth=4, depth_branches=2)).eval()
    repa_ssl.set_branch_join(branched, 0.0)
    merged = repa_ssl.fuse_model(branched)
    x = _images(3, size=64).float()
    with torch.no_grad():
        ref = merged(x)
        batch = torch.export.Dim("batch", min=1, max=64)
        exported = torch.export.export(merged, (x[:2],), dynamic_shapes=({0: batch},)).module()
        for graph in (torch.jit.script(merged), torch.fx.symbolic_trace(merged), exported):
            torch.testing.assert_close(graph(x), ref, rtol=1e-5, atol=1e-5)
    assert check_onnx(export_onnx(merged, tmp_path / "merged.onnx", (3, 64, 64)), merged, x) <= 1e-5


def test_the_merged_openclip_tower_scripts():
    model = MODELS["openclip-b16"]().float()
    repa_ssl.set_branch_join(repa_ssl.branch_model(model, branches=4), 0.0)
    tower = repa_ssl.fuse_model(model).visual
    x = _images().float()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(tower)(x), tower(x), rtol=1e-5, atol=1e-5)


def test_merging_cuts_the_macs_as_the_design_says():
    """ViT-Tiny: RePa θ = 0.75 fused does 1/1.55 of vanilla's MACs, merged 12 -> 3 on top of it 1/1.69."""
    def gmacs(name, **kwargs):
        return repa_ssl.count_gmacs(timm.create_model(name, device="meta", **kwargs))

    vanilla = gmacs("vit_tiny_patch16_224")
    assert vanilla / gmacs("repa_vit_tiny_patch16_224", inference_mode=True) == pytest.approx(1.55, rel=0.02)
    merged = gmacs("repa_vit_tiny_patch16_224", inference_mode=True, depth_branches=4)
    assert vanilla / merged == pytest.approx(1.69, rel=0.02)  # 1.666: patch embedding and head included


def test_bad_branch_requests_are_clear_errors():
    model = MODELS["repa-theta0.75"]()
    with pytest.raises(ValueError, match=r"5 branches must divide the depth, 12 blocks .*\[2, 3, 4, 6, 12\]"):
        repa_ssl.branch_model(model, branches=5)
    with pytest.raises(ValueError, match="has no depth branches: call repa_ssl.branch_model first"):
        repa_ssl.set_branch_join(model, 0.5)
    assert repa_ssl.branch_join(model) is None
    repa_ssl.branch_model(model, branches=2)
    with pytest.raises(ValueError, match="already has depth branches"):
        repa_ssl.branch_model(model, branches=2)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        repa_ssl.set_branch_join(model, 1.5)
    with pytest.raises(ValueError, match="only timm's Attention without qk_norm"):
        repa_ssl.branch_model(timm.create_model("vit_tiny_patch16_224", **dict(NARROW, qk_norm=True)), branches=2)
    with pytest.raises(ValueError, match="a fused RepaBlock cannot be branched"):
        repa_ssl.branch_model(timm.create_model("test_repa_vit", inference_mode=True), branches=2)
