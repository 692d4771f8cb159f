"""Fusion is exact: fused and train form (eval mode) agree, for every idle ratio and model kind."""
import copy
import logging

import open_clip
import pytest
import timm
import torch
from torch import nn
from timm.layers import LayerScale

import repa_ssl
from repa_ssl import ChannelIdleMlp, FusionError, ReparamChannelIdleMlp
from conftest import randomize_batchnorms, tiny_vit

THETAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("theta", THETAS)
def test_fused_mlp_float64_is_exact(theta):
    torch.manual_seed(0)
    mlp = randomize_batchnorms(ChannelIdleMlp(32, 128, idle_ratio=theta)).double().eval()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    fused = mlp.fuse()
    assert isinstance(fused, ReparamChannelIdleMlp)
    assert (fused(x) - mlp(x)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_fused_model_float32_matches(theta, global_pool, images):
    model = tiny_vit(idle_ratio=theta, global_pool=global_pool)
    fused = repa_ssl.fuse_model(model)
    assert repa_ssl.is_fused(fused) and not repa_ssl.is_fused(model)
    with torch.no_grad():
        assert _max_rel(fused(images), model(images)) <= 1e-5


@pytest.mark.parametrize("theta", THETAS)
def test_fused_model_float64_is_exact(theta, images):
    model = tiny_vit(idle_ratio=theta).double()
    fused = repa_ssl.fuse_model(model)
    with torch.no_grad():
        assert (fused(images.double()) - model(images.double())).abs().max().item() <= 1e-10


def test_theta_one_leaves_a_single_linear_and_theta_zero_keeps_every_channel():
    linear_only = repa_ssl.fuse_model(tiny_vit(idle_ratio=1.0)).blocks[0].mlp
    assert linear_only.fc_in is None and linear_only.fc_out is None
    assert sum(p.numel() for p in linear_only.parameters()) == 64 * 64 + 64
    all_active = repa_ssl.fuse_model(tiny_vit(idle_ratio=0.0)).blocks[0].mlp
    assert all_active.fc_in.out_features == 256
    # Only the norms folded: the linear part is exactly the identity shortcut (plus a bias).
    assert torch.allclose(all_active.linear.weight, torch.eye(64))


@pytest.mark.parametrize("idle_ratio,schedule", [([0.0, 1.0], "uniform"), ([0.3, 0.8], "uniform"), (0.75, "linear")])
def test_per_layer_ratios_fuse_exactly(idle_ratio, schedule, images):
    model = tiny_vit(idle_ratio=idle_ratio, idle_schedule=schedule).double()
    fused = repa_ssl.fuse_model(model)
    with torch.no_grad():
        assert (fused(images.double()) - model(images.double())).abs().max().item() <= 1e-10


def test_timm_reparameterize_model_fuses_our_models(images):
    model = tiny_vit()
    fused = timm.utils.reparameterize_model(model)
    assert repa_ssl.is_fused(fused) and not repa_ssl.is_fused(model)  # a copy, like timm's other models
    with torch.no_grad():
        assert _max_rel(fused(images), model(images)) <= 1e-5


def test_inference_mode_builds_the_fused_form_directly(images):
    model = tiny_vit()
    fused = repa_ssl.fuse_model(model)
    direct = timm.create_model("test_repa_vit", inference_mode=True).eval()
    assert repa_ssl.is_fused(direct)
    assert [n for n, _ in direct.named_parameters()] == [n for n, _ in fused.named_parameters()]
    direct.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(direct(images), fused(images))


def test_openclip_model_fuses_exactly(images):
    torch.manual_seed(0)
    clip = randomize_batchnorms(open_clip.create_model("RePa-ViT-Test")).eval()
    fused = repa_ssl.fuse_model(clip)
    text = open_clip.get_tokenizer("RePa-ViT-Test")(["a photo of a seven"])
    with torch.no_grad():
        assert _max_rel(fused.encode_image(images), clip.encode_image(images)) <= 1e-5
        assert torch.equal(fused.encode_text(text), clip.encode_text(text))  # text tower untouched
    report = repa_ssl.verify_fusion(clip, fused, images)
    assert report.ok and report.max_rel_err <= 1e-5


def test_fusing_a_training_model_uses_running_statistics_not_batch_statistics(images, caplog):
    model = tiny_vit().train()
    with caplog.at_level(logging.WARNING, logger="repa_ssl"):
        fused_by_timm = timm.utils.reparameterize_model(model)
    assert "training mode" in caplog.text  # never silent
    fused = repa_ssl.fuse_model(model)
    assert not fused.training and model.training  # the entry point switches the copy to eval
    model.eval()
    fused_by_timm.eval()
    with torch.no_grad():
        ref = model(images)
        assert _max_rel(fused(images), ref) <= 1e-5
        assert _max_rel(fused_by_timm(images), ref) <= 1e-5


def test_fusing_twice_or_a_non_repa_model_is_a_clear_error():
    fused = repa_ssl.fuse_model(tiny_vit())
    with pytest.raises(FusionError, match="already fused or is not a RePa model"):
        repa_ssl.fuse_model(fused)
    with pytest.raises(FusionError, match="no train-form channel-idle FFN"):
        repa_ssl.fuse_model(nn.Linear(2, 2))


def test_verification_catches_a_wrong_fusion(images):
    model = tiny_vit()
    fused = repa_ssl.fuse_model(model)
    with torch.no_grad():
        fused.blocks[1].mlp.linear.bias.add_(torch.randn(64))
    report = repa_ssl.verify_fusion(model, fused, images)
    assert not report.ok
    with pytest.raises(FusionError, match="Refusing to export"):
        report.check()


def test_verification_restores_the_train_models_mode(images):
    model = tiny_vit().train()
    repa_ssl.verify_fusion(model, repa_ssl.fuse_model(model), images)
    assert model.training


def test_fused_ffn_is_eq6_with_its_gradients_swapped_layers_and_autocast():
    """The deploy FFN is eq. 6 with eq. 6's gradients; a swapped ``fc_out`` (quantised, LoRA) is called and
    autocast works."""
    torch.manual_seed(0)
    fused = randomize_batchnorms(ChannelIdleMlp(16, 64, idle_ratio=0.75)).double().eval().fuse()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    def eq6(inp):
        return fused.linear(inp) + nn.functional.linear(fused.act(fused.fc_in(inp)), fused.fc_out.weight)

    out, expected = fused(x), eq6(x_ref)
    assert (out - expected).abs().max().item() <= 1e-12
    out.square().sum().backward()
    expected.square().sum().backward()
    assert (x.grad - x_ref.grad).abs().max().item() <= 1e-10

    class Doubled(nn.Linear):  # a swapped layer: must be called, not bypassed
        def forward(self, inp):
            return 2 * super().forward(inp)

    swapped = Doubled(fused.fc_out.in_features, 16, bias=False).double()
    swapped.weight.data.copy_(fused.fc_out.weight)
    fused.fc_out = swapped
    with torch.no_grad():
        active = nn.functional.linear(fused.act(fused.fc_in(x)), swapped.weight)
        assert torch.allclose(fused(x), fused.linear(x) + 2 * active)

    mlp32 = randomize_batchnorms(ChannelIdleMlp(16, 64, idle_ratio=0.75)).eval().fuse()
    x32 = torch.randn(3, 5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = mlp32(x32)
    assert low.dtype == torch.bfloat16 and _max_rel(low.float(), mlp32(x32).detach()) < 0.05


def _randomize_layer_scales(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerScale):
                m.gamma.copy_(torch.randn(m.gamma.shape, generator=g))
    return model


@pytest.mark.parametrize("theta", [0.0, 0.75, 1.0])
def test_ffn_layer_scale_trains_and_folds_exactly_into_the_fused_form(theta, images):
    """``init_values`` (LayerScale) scales the FFN half as in timm's Block, and fusion keeps it, exactly."""
    model = _randomize_layer_scales(tiny_vit(idle_ratio=theta, init_values=1e-5)).double()
    assert all(isinstance(block.mlp.ls, LayerScale) for block in model.blocks)
    fused = repa_ssl.fuse_model(model)
    x = images.double()
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max().item() <= 1e-10
        without = copy.deepcopy(model)
        for block in without.blocks:
            block.mlp.ls = nn.Identity()
        assert (without(x) - model(x)).abs().max().item() > 1e-3  # the layer scale matters here
    direct = timm.create_model("test_repa_vit", idle_ratio=theta, init_values=1e-5, inference_mode=True)
    direct.double().load_state_dict(fused.state_dict(), strict=True)  # same fused layout as without LayerScale


def test_ffn_dropout_acts_in_training_only_and_fusion_stays_exact():
    """``proj_drop`` drops the FFN's output (after fc2) in training; eval and the fused form have none."""
    assert tiny_vit(proj_drop_rate=0.3).blocks[0].mlp.drop.p == 0.3
    torch.manual_seed(0)
    mlp = randomize_batchnorms(ChannelIdleMlp(16, 64, idle_ratio=0.75, drop=1.0)).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert torch.equal(mlp.train()(x), x)  # everything the FFN adds is dropped
    mlp.eval()
    assert not torch.allclose(mlp(x), x)
    assert (mlp.fuse()(x) - mlp(x)).abs().max().item() <= 1e-10


def test_is_fused_only_for_a_repa_model_in_deploy_form(tmp_path):
    vanilla = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=1, num_classes=0)
    assert not repa_ssl.is_fused(vanilla) and not repa_ssl.has_unfused_repa_layers(vanilla)
    model = tiny_vit()
    assert not repa_ssl.is_fused(model) and repa_ssl.has_unfused_repa_layers(model)
    assert repa_ssl.is_fused(repa_ssl.fuse_model(model))
    with pytest.raises(repa_ssl.CheckpointError, match="needs a fused model"):  # was exported as "fused"
        repa_ssl.save_fused_tower(vanilla, tmp_path / "vanilla.safetensors", dict(model_name="vit_tiny_patch16_224"))
