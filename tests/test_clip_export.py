"""`python -m clip.export`: fused CLIP from an open_clip_train checkpoint, verified, loadable by open_clip."""
import json

import open_clip
import pytest
import torch
from PIL import Image

import repa_ssl
from clip.export import export_fused_clip, main
from clip_helpers import write_digit_images
from conftest import randomize_batchnorms


@pytest.fixture
def trained(tmp_path):
    """A RePa-ViT-Test CLIP with non-trivial BatchNorm statistics, saved as open_clip_train does under DDP."""
    torch.manual_seed(0)
    model = randomize_batchnorms(open_clip.create_model("RePa-ViT-Test")).eval()
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": {}}, path)
    return model, path


def test_fused_export_loads_through_open_clip_with_the_same_image_embeddings(trained, tmp_path):
    model, checkpoint = trained
    images = write_digit_images(tmp_path / "images", 6, corrupt=(0,))
    output = tmp_path / "fused.pt"
    main(["--checkpoint", str(checkpoint), "--model", "RePa-ViT-Test", "--output", str(output),
          "--images", str(images)])

    fused = open_clip.create_model("RePa-ViT-Test-fused", pretrained=str(output)).eval()
    assert repa_ssl.is_fused(fused.visual) and not repa_ssl.is_fused(model.visual)
    _, _, preprocess = open_clip.create_model_and_transforms("RePa-ViT-Test")
    batch = torch.stack([preprocess(Image.open(p)) for p in sorted(images.glob("*.jpg"))[1:]])
    with torch.no_grad():
        ref, out = model.encode_image(batch), fused.encode_image(batch)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    tokens = open_clip.get_tokenizer("RePa-ViT-Test")(["a photo of the digit one"])
    assert torch.equal(model.encode_text(tokens), fused.encode_text(tokens))  # text tower untouched

    sidecar = json.loads(output.with_suffix(".json").read_text())
    assert sidecar["model_name"] == "RePa-ViT-Test-fused" and sidecar["source_model"] == "RePa-ViT-Test"
    assert sidecar["source_checkpoint"] == checkpoint.name  # beside the export: evaluations re-check against it
    assert sidecar["fusion"]["ok"] and sidecar["fusion"]["num_samples"] == 5  # the corrupt JPEG is skipped


def test_export_is_refused_when_the_fused_tower_does_not_match(trained, tmp_path):
    _, checkpoint = trained
    state = torch.load(checkpoint, weights_only=True)
    key = next(k for k in state["state_dict"] if k.endswith("norm2.running_var"))
    state["state_dict"][key][0] = float("nan")  # a broken statistic: train form and fused form disagree
    torch.save(state, checkpoint)
    images = write_digit_images(tmp_path / "images", 2)
    with pytest.raises(repa_ssl.FusionError, match="Refusing to export"):
        export_fused_clip(checkpoint, "RePa-ViT-Test", tmp_path / "fused.pt", images)
    assert not (tmp_path / "fused.pt").exists()


def test_clear_errors_for_wrong_inputs(trained, tmp_path):
    model, checkpoint = trained
    images = write_digit_images(tmp_path / "images", 2)
    fused_file = tmp_path / "already_fused.pt"
    torch.save(repa_ssl.fuse_model(model).state_dict(), fused_file)
    with pytest.raises(ValueError, match="already holds a fused image tower"):
        export_fused_clip(fused_file, "RePa-ViT-Test", tmp_path / "out.pt", images)
    with pytest.raises(ValueError, match="not a RePa OpenCLIP model"):
        export_fused_clip(checkpoint, "ViT-B-32", tmp_path / "out.pt", images)
    with pytest.raises(ValueError, match="cannot read verification images from .*missing.tar"):
        export_fused_clip(checkpoint, "RePa-ViT-Test", tmp_path / "out.pt", tmp_path / "missing.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no decodable images"):
        export_fused_clip(checkpoint, "RePa-ViT-Test", tmp_path / "out.pt", tmp_path / "empty")
    assert not (tmp_path / "out.pt").exists()
