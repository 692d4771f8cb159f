"""The models behave as timm ViTs and reproduce the paper's arithmetic."""
import re

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F

import repa_ssl
from repa_ssl import RepaVisionTransformer, count_gmacs, count_params
from conftest import tiny_vit

# (timm name, kwargs, paper params fused (M), paper GMACs fused, GMACs count attention?)
# Tables 1/8 count no attention matmuls; Table 9 (CLIP towers) does.
PAPER_BACKBONES = [
    ("repa_vit_small_patch16_224", dict(num_classes=0), 12.8, 2.5, False),  # Table 8
    ("repa_vit_base_patch16_224", dict(num_classes=0), 50.4, 9.9, False),  # Table 8
    ("repa_vit_large_patch16_224", dict(), 178.4, 34.9, False),  # Table 1
    ("repa_vit_huge_patch16_224", dict(), 369.9, 72.6, False),  # Table 1
    ("repa_vit_small_patch16_224", dict(idle_ratio=0.5), 16.7, 3.2, False),  # Table 1, RePa-DeiT-S/0.50
]
PAPER_CLIP_TOWERS = [  # Table 9, image tower incl. the projection to the joint embedding
    ("RePa-ViT-B-16", 50.8, 10.6),
    ("RePa-ViT-B-16-idle50", 64.9, 13.4),
    ("RePa-ViT-B-32", 52.4, 2.6),
    ("RePa-ViT-B-32-idle50", 66.6, 3.4),
]


@pytest.mark.parametrize("name,kwargs,params_m,gmacs,attention", PAPER_BACKBONES)
def test_fused_backbones_match_the_paper(name, kwargs, params_m, gmacs, attention):
    model = timm.create_model(name, inference_mode=True, device="meta", **kwargs)
    assert count_params(model) / 1e6 == pytest.approx(params_m, abs=0.1)
    assert count_gmacs(model, include_attention=attention) == pytest.approx(gmacs, rel=0.03)


@pytest.mark.parametrize("name,params_m,gmacs", PAPER_CLIP_TOWERS)
def test_fused_clip_towers_match_the_paper(name, params_m, gmacs):
    tower = open_clip.create_model(repa_ssl.fused_model_name(name), device="meta").visual
    assert count_params(tower) / 1e6 == pytest.approx(params_m, abs=0.1)
    assert count_gmacs(tower, include_attention=True) == pytest.approx(gmacs, rel=0.03)


@pytest.mark.parametrize("name,params_m,gmacs", [
    ("repa_vit_small_patch16_224", 21.7, 4.3), ("repa_vit_base_patch16_224", 85.8, 16.9)])
def test_train_form_backbones_match_the_paper(name, params_m, gmacs):
    model = timm.create_model(name, num_classes=0, device="meta")
    assert count_params(model) / 1e6 == pytest.approx(params_m, abs=0.1)
    assert count_gmacs(model, include_attention=False) == pytest.approx(gmacs, rel=0.03)


def test_fusing_the_real_base_model_drops_parameters_to_the_paper_number():
    torch.manual_seed(0)
    model = timm.create_model("repa_vit_base_patch16_224", num_classes=0).eval()
    fused = timm.utils.reparameterize_model(model)
    assert count_params(model) / 1e6 == pytest.approx(85.8, abs=0.1)
    assert count_params(fused) / 1e6 == pytest.approx(50.4, abs=0.1)
    x = torch.randn(1, 3, 224, 224)
    assert repa_ssl.verify_fusion(model, fused, x, rtol=1e-5).ok


def test_all_documented_entrypoints_are_registered():
    names = set(timm.list_models("*repa*"))
    for size in ("tiny", "small", "base", "large"):
        assert f"repa_vit_{size}_patch16_224" in names
    assert "repa_vit_huge_patch14_224" in names
    for tower in ("base_patch16", "base_patch32", "large_patch14"):
        assert f"repa_vit_{tower}_clip_224" in names
    for name in ("RePa-ViT-B-16", "RePa-ViT-B-32", "RePa-ViT-L-14"):
        for variant in ("", "-idle50", "-fused", "-idle50-fused"):
            assert name + variant in open_clip.list_models()


def test_clip_text_towers_are_openclips():
    """Every RePa CLIP model of OpenCLIP's sizes (θ, fused and merged variants too) has OpenCLIP's config but for its
    vision tower: the same text tower (text_cfg) and embedding width."""
    ours = {n: m[1] for n in open_clip.list_models() if (m := re.fullmatch(r"RePa-(ViT-[BL]-\d+)(-.+)?", n))}
    assert len(ours) == 18  # 3 sizes x 2 θ x train / fused / merged2
    for name, theirs in ours.items():
        cfg, theirs_cfg = open_clip.get_model_config(name), open_clip.get_model_config(theirs)
        assert cfg.pop("vision_cfg") != theirs_cfg.pop("vision_cfg")
        assert cfg == theirs_cfg, name


def test_clip_tower_width_and_default_idle_ratio():
    tower = open_clip.create_model("RePa-ViT-B-16", device="meta").visual.trunk
    assert isinstance(tower, RepaVisionTransformer)
    assert tower.idle_ratios == [0.75] * 12 and tower.embed_dim == 768
    assert open_clip.create_model("RePa-ViT-B-16-idle50", device="meta").visual.trunk.idle_ratios == [0.5] * 12


def test_timm_vit_api(images):
    model = tiny_vit(num_classes=10)
    assert model(images).shape == (4, 10)
    feats = model.forward_features(images)
    assert feats.shape == (4, 1 + 64, 64)
    pre = model.forward_head(feats, pre_logits=True)
    assert torch.equal(pre, feats[:, 0])  # token pooling
    model.reset_classifier(0, global_pool="avg")
    assert model(images).shape == (4, 64)
    final, inter = model.forward_intermediates(images, return_prefix_tokens=True)
    assert len(inter) == 2 and inter[-1][0].shape == (4, 64, 8, 8) and inter[-1][1].shape == (4, 1, 64)
    layers = model.get_intermediate_layers(images, n=2, return_prefix_tokens=True, norm=True)
    cls_last = layers[-1][1][:, 0]
    assert torch.allclose(cls_last, model.forward_features(images)[:, 0], atol=1e-6)
    assert timm.create_model("test_repa_vit", num_classes=0)(images).shape == (4, 64)


def test_gradient_checkpointing_gives_the_same_gradients(images):
    grads = []
    for checkpointing in (False, True):
        model = tiny_vit().train()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(0)
        model(images).square().mean().backward()
        grads.append(model.blocks[0].mlp.fc1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def _bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers() if k.rsplit(".", 1)[-1] in
            ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("batch,idle_ratio", [(1, 0.75), (4, 0.75), (2, 0.0)],
                         ids=["column_blocks", "idle_matrix", "all_active"])
def test_gradient_checkpointing_updates_batchnorm_statistics_once_per_step(reentrant, batch, idle_ratio):
    """The recomputed forward must not update the running statistics that fusion folds a second time."""
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    runs, default = [], use_reentrant_ckpt()
    set_reentrant_ckpt(reentrant)
    try:
        for checkpointing in (False, True):
            model = tiny_vit(idle_ratio=idle_ratio).train()
            model.set_grad_checkpointing(checkpointing)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            model(x).square().mean().backward()
            opt.step()
            runs.append(_bn_buffers(model))
    finally:
        set_reentrant_ckpt(default)
    plain, checkpointed = runs
    assert all(int(v) == 1 for k, v in checkpointed.items() if k.endswith("num_batches_tracked"))
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


def test_clip_grad_checkpointing_counts_each_step_once_and_leaves_the_text_tower_alone():
    """``--grad-checkpointing``: the image tower's BatchNorms count one step; the text tower's gradients are
    as without."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    text = torch.randint(0, 49408, (2, 16), generator=torch.Generator().manual_seed(2))
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = open_clip.create_model("RePa-ViT-Test").train()
        model.set_grad_checkpointing(checkpointing)
        image_features, text_features, _ = model(images, text)
        (image_features @ text_features.t()).sum().backward()
        runs.append((_bn_buffers(model.visual), {k: p.grad.clone() for k, p in model.transformer.named_parameters()}))
    (plain_bn, plain_grads), (ckpt_bn, ckpt_grads) = runs
    assert model.transformer.grad_checkpointing
    for name in plain_bn:
        assert torch.equal(plain_bn[name], ckpt_bn[name]), name
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], ckpt_grads[name], atol=1e-6), name


def test_training_form_trains():
    torch.manual_seed(0)
    model = timm.create_model("test_repa_vit", num_classes=3).train()
    y = torch.arange(16) % 3
    x = torch.randn(16, 3, 64, 64) * 0.5 + torch.randn(3, 3, 64, 64)[y]  # one pattern per class
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # and the fused result of training still matches its train form
    model.eval()
    assert repa_ssl.verify_fusion(model, repa_ssl.fuse_model(model), x[:4], rtol=1e-5).ok


def test_batchnorm_and_drop_path_differ_between_train_and_eval(images):
    model = tiny_vit(drop_path_rate=0.5)
    bn = model.blocks[0].mlp.norm1
    before = bn.running_mean.clone()
    with torch.no_grad():
        model.train()
        a, b = model(images), model(images)
        assert not torch.allclose(a, b)  # stochastic depth is active
        assert not torch.equal(bn.running_mean, before)  # batch statistics update the running ones
        model.eval()
        after = bn.running_mean.clone()
        c, d = model(images), model(images)
        assert torch.equal(c, d) and torch.equal(bn.running_mean, after)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(repa_ssl.UnknownModelError, match="Did you mean: repa_vit_base_patch16_224"):
        repa_ssl.create_model("repa_vit_bse_patch16_224")
    with pytest.raises(ValueError, match="not a RePa OpenCLIP model"):
        repa_ssl.fused_model_name("ViT-B-16")
