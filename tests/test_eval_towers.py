"""load_tower reads every input kind the evaluations accept; fuse_and_verify guards the fused form."""
import re

import pytest
import timm
import torch

import repa_ssl
from conftest import randomize_batchnorms
from eval_fixtures import clip_fused_export, clip_model, clip_train_checkpoint, dino_checkpoint
from repa_ssl.eval import fuse_and_verify, load_tower


def test_dino_checkpoint_teacher_and_student(tmp_path, images):
    nets = dino_checkpoint(tmp_path / "checkpoint.pth", idle_ratio=0.5)
    for key in ("teacher", "student"):
        tower = load_tower(tmp_path / "checkpoint.pth", checkpoint_key=key)
        assert tower.kind == "dino" and tower.name == "test_repa_vit" and tower.image_size == 64
        assert tower.model.idle_ratios == [0.5, 0.5]  # the run's θ, not the model default
        with torch.no_grad():
            torch.testing.assert_close(tower.model(images), nets[key](images))
    fuse_and_verify(tower, images)
    assert repa_ssl.is_fused(tower.model) and tower.fusion["ok"] and tower.params_train_m > 0


def test_dino_export_and_evaluations_read_one_backbone_at_its_stored_geometry(tmp_path):
    """dino.export and load_tower share one reader (repa_ssl.dino_checkpoint): a backbone trained at 32 px
    (not the arch's 64) loads in both; dino.export's own reader built the arch's default and refused it."""
    from dino.export import export_fused_teacher
    from dino_helpers import make_images

    torch.manual_seed(0)
    backbone = randomize_batchnorms(timm.create_model("test_repa_vit", num_classes=0, img_size=32)).eval()
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    repa_ssl.save_checkpoint(dict(teacher=state, student=state, epoch=1, args=dict(
        arch="test_repa_vit", idle_ratio=0.75, idle_schedule="uniform", data_source="folder")),
        tmp_path / "checkpoint.pth")
    tower = load_tower(tmp_path / "checkpoint.pth")
    export, report = export_fused_teacher(tmp_path / "checkpoint.pth", data_path=str(make_images(tmp_path / "img")))
    assert tower.image_size == 32 and report.ok
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower.model(x), backbone(x))
        torch.testing.assert_close(load_tower(export).model(x), backbone(x), rtol=1e-4, atol=1e-5)


def test_dino_checkpoint_with_a_missing_key_is_refused(tmp_path):
    dino_checkpoint(tmp_path / "checkpoint.pth")
    ckpt = repa_ssl.load_checkpoint(tmp_path / "checkpoint.pth")
    del ckpt["teacher"]["backbone.blocks.1.mlp.fc2.weight"]
    repa_ssl.save_checkpoint(ckpt, tmp_path / "checkpoint.pth")
    with pytest.raises(RuntimeError, match="blocks.1.mlp.fc2.weight"):
        load_tower(tmp_path / "checkpoint.pth")


def _export(train, path, source, perturb=0.0):
    fused = repa_ssl.fuse_model(train)
    report = repa_ssl.verify_fusion(train, fused, torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        fused.blocks[1].mlp.linear.weight.add_(perturb * torch.randn(64, 64))  # stored check still says ok
    return repa_ssl.save_fused_tower(fused, path, dict(
        model_name="test_repa_vit", idle_ratios=train.idle_ratios, num_classes=0, fusion=report.as_dict(),
        image_size=64, source=str(source))), report


def test_fused_teacher_export(tmp_path, images):
    teacher = dino_checkpoint(tmp_path / "checkpoint.pth", idle_ratio=0.5)["teacher"]
    path, report = _export(teacher, tmp_path / "teacher_fused.safetensors", tmp_path / "checkpoint.pth")
    tower = load_tower(path)
    assert tower.kind == "fused_export" and repa_ssl.is_fused(tower.model)
    with torch.no_grad():
        torch.testing.assert_close(tower.model(images), teacher(images), rtol=1e-4, atol=1e-5)
    fuse_and_verify(tower, images)  # nothing left to fuse: re-checked against the DINO checkpoint it names
    assert tower.fusion["ok"] and "checkpoint.pth" in tower.fusion["verified_on"]

    broken, _ = _export(teacher, tmp_path / "broken.safetensors", tmp_path / "checkpoint.pth", perturb=0.05)
    with pytest.raises(repa_ssl.FusionError):
        fuse_and_verify(load_tower(broken), images)

    moved, report = _export(teacher, tmp_path / "moved.safetensors", tmp_path / "gone.pth")
    tower = fuse_and_verify(load_tower(moved), images)  # source gone: the check stored at export time
    assert tower.fusion["max_rel_err"] == report.max_rel_err and tower.fusion["verified_on"].startswith("at export")


def test_clip_checkpoints_train_and_fused(tmp_path, images):
    model = clip_model()
    train_ckpt = clip_train_checkpoint(tmp_path / "logs" / "run" / "checkpoints" / "epoch_1.pt", model)
    fused_ckpt = clip_fused_export(tmp_path / "clip_fused.pt", model, images, train_ckpt)
    with torch.no_grad():
        ref_tokens = model.visual.trunk(images)
        ref_embed = model.encode_image(images)
    tower = load_tower(train_ckpt)  # name from params.txt; k-NN / linear use the timm trunk
    assert tower.kind == "clip" and tower.name == "RePa-ViT-Test" and not repa_ssl.is_fused(tower.model)
    assert tower.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # CLIP normalisation, not ImageNet's
    with torch.no_grad():
        torch.testing.assert_close(tower.model(images), ref_tokens)
    clip = load_tower(fused_ckpt, clip=True)  # name from the sidecar
    assert clip.name == "RePa-ViT-Test-fused" and repa_ssl.is_fused(clip.model)
    with torch.no_grad():
        torch.testing.assert_close(clip.model.encode_image(images), ref_embed, rtol=1e-4, atol=1e-5)
    bare = tmp_path / "bare.pt"  # a plain state dict without sidecar or run folder needs the name
    repa_ssl.save_checkpoint(model.state_dict(), bare)
    with pytest.raises(ValueError, match="model name"):
        load_tower(bare)
    assert load_tower(bare, "RePa-ViT-Test", clip=True).name == "RePa-ViT-Test"


def test_authors_style_checkpoint_through_timm_pretrained(tmp_path, images):
    """The authors' key layout (attention norm under attn.norm, 1000-class head) via our filter."""
    torch.manual_seed(0)
    model = randomize_batchnorms(timm.create_model("test_repa_vit")).eval()
    state = {re.sub(r"^(blocks\.\d+)\.norm1\.", r"\1.attn.norm.", k): v for k, v in model.state_dict().items()}
    assert any(".attn.norm." in k for k in state) and "head.weight" in state
    repa_ssl.save_checkpoint({"model": state}, tmp_path / "RePaViT_Test.pth")
    with pytest.raises(ValueError, match="timm model name"):
        load_tower(tmp_path / "RePaViT_Test.pth")
    tower = load_tower(tmp_path / "RePaViT_Test.pth", "test_repa_vit")
    assert tower.kind == "timm_checkpoint" and tower.model.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(tower.model(images), model.forward_head(model.forward_features(images),
                                                                           pre_logits=True))


def test_model_names_and_vanilla_baselines(images):
    timm_tower = load_tower("test_repa_vit")
    assert timm_tower.kind == "model_name" and timm_tower.model(images).shape == (4, 64)
    clip = load_tower("RePa-ViT-Test", clip=True)
    assert hasattr(clip.model, "encode_text")
    vanilla = load_tower("test_vit")  # timm's tiny vanilla ViT: nothing to fuse
    fuse_and_verify(vanilla, torch.randn(2, 3, 160, 160))
    assert vanilla.fusion is None
    with pytest.raises(repa_ssl.UnknownModelError, match="repa_vit"):
        load_tower("repa_vit_smal_patch16_224")
    with pytest.raises(FileNotFoundError):
        load_tower("missing/checkpoint.pth")
    with pytest.raises(ValueError, match="zero-shot"):
        load_tower("test_repa_vit", clip=True)
