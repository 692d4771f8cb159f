"""The README's first command, shortened: DINO and CLIP on the digits, fused, evaluated, reported."""
import json
import logging
import math

import open_clip
import pytest

from clip.export import export_fused_clip
from demo import run
from eval_fixtures import clip_model, clip_train_checkpoint, write_image_folder
from repa_ssl.eval import knn, load_tower


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run.main(["--quick", "--output-dir", str(out)]), out


def test_pretraining_beats_random_init_and_clip_beats_chance(quick_demo):
    results, _ = quick_demo
    s = results["summary"]
    # Loose floors: a shortened run on a shared CPU, but each can fail if pretraining does nothing.
    assert s["knn"]["dino_fused"] > s["knn"]["random_init"]
    assert s["zeroshot"]["top1"] > s["zeroshot"]["chance"] + 15


def test_fused_and_train_forms_agree(quick_demo):
    results, _ = quick_demo
    assert results["summary"]["fusion_max_rel_err"] <= 1e-5
    assert results["dino"]["export"]["fusion"]["ok"] and results["clip"]["export"].ok


def test_report_holds_tables_plots_checkpoints_and_results(quick_demo):
    results, out = quick_demo
    report = (out / "report.md").read_text()
    for heading in ("## Accuracy", "## DINO loss", "## Fused vs train form", "## Towers", "## Speed"):
        assert heading in report
    loss = results["summary"]["dino_loss"]
    assert loss["ln_out_dim"] == pytest.approx(math.log(1024))
    assert f"ln(out_dim) = ln(1024) = {math.log(1024):.2f}" in report and f"ends at {loss['last']:.2f}" in report
    assert "`accuracy.png` shows k = 20 for every row" in report
    for name in ("loss_curves.png", "accuracy.png", "speed.png", "clip_fused.pt", "clip_fused.json",
                 "dino/teacher_fused.safetensors", "dino/teacher_fused.json"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    rows = results["speed"]["results"][0]["rows"]
    assert rows["fused θ=0.75"]["params_m"] < rows["train θ=0.75"]["params_m"]


def test_knn_eval_script_gives_the_reports_knn_numbers(quick_demo):
    """One preprocessing for both: ``scripts/knn_eval.sh`` (``repa_ssl.eval.knn``) with its defaults on the
    demo's checkpoint gives the report's k-NN accuracies."""
    results, out = quick_demo
    script = knn.main([str(out / "dino" / "checkpoint.pth"), "--data-path", results["data"]["root"],
                       "--nb-knn", "10", "20", "--num-workers", "0", "--output-dir", str(out / "knn_script"),
                       "--throughput-repeats", "1"])
    assert script["accuracy"] == {str(k): v for k, v in results["dino"]["eval"]["knn"].accuracy.items()}


def test_own_folder_keeps_its_captions_and_is_left_untouched(tmp_path):
    from PIL import Image

    from demo import data

    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / name / "a.png")
    (tmp_path / "train" / "dog" / "a.txt").write_text("my own caption")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    samples = {p.parent.name: c for p, c in data.captioned_samples(tmp_path / "train", {"cat": "cat", "dog": "dog"})}
    assert samples["dog"] == "my own caption"
    assert samples["cat"] in [t.format("cat") for t in data.CAPTION_TEMPLATES]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_trained_clip_models_are_loaded_without_the_random_init_warning(tmp_path, caplog):
    """open_clip warns "initialized randomly" when a model is created before its weights are loaded: the
    demo's log said so before each evaluation and export of its trained CLIP."""
    checkpoint = clip_train_checkpoint(tmp_path / "run" / "checkpoints" / "epoch_1.pt", clip_model())
    write_image_folder(tmp_path / "val", ["ant", "bee"], per_class=2)
    caplog.set_level(logging.WARNING)
    export_fused_clip(checkpoint, "RePa-ViT-Test", tmp_path / "fused.pt", tmp_path / "val")
    load_tower(tmp_path / "fused.pt")
    assert "initialized randomly" not in caplog.text
    open_clip.create_model("RePa-ViT-Test")  # a model that stays random still says so
    assert "initialized randomly" in caplog.text
