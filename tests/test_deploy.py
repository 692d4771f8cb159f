"""Deployable: train-form and fused RePa models script, FX-trace, torch.export and (fused) run in onnxruntime
with the eager model's outputs; timm's feature extraction works on our entrypoints."""
import copy

import pytest
import timm
import torch
from timm.layers import create_feature_extractor, get_graph_node_names

import repa_ssl
from repa_ssl.checkpoint import save_fused_tower
from repa_ssl.export import ExportError, check_onnx
from conftest import randomize_batchnorms

# Three blocks: timm's feature extraction takes the last three by default.
FORMS = [("test_repa_vit", {}), ("test_repa_vit", {"inference_mode": True}),
         ("test_repa_vit_clip", {}), ("test_repa_vit_clip_fused", {}),
         ("test_repa_vit", {"inference_mode": True, "idle_ratio": 1.0})]  # no active channels: a single linear
IDS = ["train-form", "fused", "clip-train-form", "clip-fused", "fused-all-idle"]


def _model(name: str, depth: int = 3, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorms(timm.create_model(name, depth=depth, **kwargs)).eval()


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("name,kwargs", FORMS, ids=IDS)
def test_models_script_fx_trace_and_export_with_the_eager_outputs(name, kwargs):
    model = _model(name, **kwargs)
    x = _images()
    with torch.no_grad():
        ref = model(x)
        scripted = torch.jit.script(model)
        traced = torch.fx.symbolic_trace(model)
        batch = torch.export.Dim("batch", min=1, max=64)
        exported = torch.export.export(model, (_images(2),), dynamic_shapes=({0: batch},)).module()
        for graph in (scripted, traced, exported):
            torch.testing.assert_close(graph(x), ref, rtol=1e-5, atol=1e-5)


def test_train_form_in_training_mode_scripts_and_traces_with_batch_statistics():
    """A captured train-form graph records eq. 2's module calls: same output and running statistics as eager."""
    model = _model("test_repa_vit").train()
    x = _images(4)
    for capture in (torch.jit.script, torch.fx.symbolic_trace):
        eager, captured = copy.deepcopy(model), capture(copy.deepcopy(model))
        torch.testing.assert_close(captured(x), eager(x), rtol=1e-5, atol=1e-5)
        for (key, b), b_ref in zip(captured.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name,kwargs", FORMS[:2], ids=IDS[:2])
@pytest.mark.parametrize("feature_cls", ["getter", "fx"])
def test_timm_feature_extraction_works_on_our_models(name, kwargs, feature_cls):
    features = _model(name, features_only=True, feature_cls=feature_cls, **kwargs)
    outs = features(_images())
    assert len(outs) == 3 and features.feature_info.channels() == [64, 64, 64]
    model = _model(name, **kwargs)
    final, intermediates = model.forward_intermediates(_images())
    assert len(intermediates) == 3 and intermediates[-1].shape == (3, 64, 8, 8)


def test_timm_fx_feature_extractor_matches_the_model_in_train_and_eval():
    """timm's own FX test: trace with its leaf modules and autowrapped functions, return the last node."""
    model = _model("test_repa_vit")
    _, eval_nodes = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(fx_model(x)[eval_nodes[-1]], model(x), rtol=1e-5, atol=1e-5)
    fx_model.train()(x)[eval_nodes[-1]].sum().backward()
    assert all(p.grad is not None for p in fx_model.parameters() if p.requires_grad)


def test_fused_tower_exports_to_onnx_beside_its_safetensors_with_the_same_embeddings(tmp_path):
    from repa_ssl import export

    fused = repa_ssl.fuse_model(_model("test_repa_vit_clip", depth=2))  # the registered depth: the sidecar names it
    tower = save_fused_tower(fused, tmp_path / "tower_fused.safetensors",
                             {"model_name": "test_repa_vit_clip_fused", "idle_ratios": [0.75] * 2})
    assert export.main([str(tower)]) == tmp_path / "tower_fused.onnx"
    images = _images(5)  # another batch size than the one exported with: the batch dimension is dynamic
    assert check_onnx(tmp_path / "tower_fused.onnx", fused, images) <= 1e-5
    with pytest.raises(ExportError, match="other embeddings"):
        check_onnx(tmp_path / "tower_fused.onnx", _model("test_repa_vit_clip_fused", depth=2), images)


def test_an_onnx_file_that_fails_the_check_is_not_left_behind(tmp_path, monkeypatch):
    from repa_ssl import export

    tower = save_fused_tower(_model("test_repa_vit_clip_fused", depth=2), tmp_path / "t.safetensors",
                             {"model_name": "test_repa_vit_clip_fused", "idle_ratios": [0.75] * 2})
    monkeypatch.setattr(export, "check_onnx", lambda *a: (_ for _ in ()).throw(ExportError("differs")))
    with pytest.raises(ExportError):
        export.main([str(tower)])
    assert not (tmp_path / "t.onnx").exists()


def test_fused_clip_image_tower_exports_to_onnx_with_encode_image_embeddings(tmp_path):
    import open_clip
    from repa_ssl import export
    from repa_ssl.checkpoint import save_sidecar

    torch.manual_seed(0)
    fused = repa_ssl.fuse_model(randomize_batchnorms(open_clip.create_model("RePa-ViT-Test")))
    path = repa_ssl.save_checkpoint(fused.state_dict(), tmp_path / "clip_fused.pt")
    save_sidecar(path, {"model_name": "RePa-ViT-Test-fused"})
    onnx_path = export.main([str(path)])
    assert onnx_path == tmp_path / "clip_fused.onnx"
    images = _images(4)
    with torch.no_grad():
        torch.testing.assert_close(fused.visual(images), fused.encode_image(images), rtol=0, atol=0)
    assert check_onnx(onnx_path, fused.visual, images) <= 1e-5
