"""Linear probe: the DINO recipe learns separable features; the probe's features; both run modes."""
import json

import pytest
import torch

from conftest import tiny_vit
from eval_fixtures import dino_checkpoint, write_image_folder
from repa_ssl.checkpoint import load_checkpoint
from repa_ssl.distributed import DistEnv
from repa_ssl.eval import Features, last_blocks, linear


def separable(n_per_class, seed):
    directions = torch.linalg.qr(torch.randn(48, 6, generator=torch.Generator().manual_seed(0)))[0].T
    g = torch.Generator().manual_seed(seed)  # 6 orthonormal class directions, fresh noise per split
    labels = torch.arange(6).repeat(n_per_class)
    feats = 3 * directions[labels] + 0.3 * torch.randn(len(labels), 48, generator=g)
    return Features(feats, labels)


def test_linear_probe_learns_separable_features_and_reports_best_and_last():
    torch.manual_seed(0)
    train, val = separable(40, 0), separable(10, 1)
    classifier = linear.LinearClassifier(48, 6)
    assert classifier.linear.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert classifier.linear.bias.abs().max().item() == 0
    env = DistEnv()
    before = linear.evaluate(classifier, val, env.device)
    out = linear.train_linear(classifier, linear.cached_batches(train, 32, env), val, env, epochs=15,
                              lr=0.1 * 32 / 256 * 10)
    assert out["best"]["top1"] >= 95 > before["top1"]
    assert out["best"]["top1"] >= out["last"]["top1"]
    assert out["last"] == out["history"][-1] and len(out["history"]) == 15
    assert out["best"] == max(out["history"], key=lambda h: h["top1"])


def test_probe_features_are_final_normed_class_tokens_of_the_last_blocks(images):
    model = tiny_vit(num_classes=0)
    with torch.no_grad():
        one = last_blocks(model, 1)(images)
        two_pooled = last_blocks(model, 2, avgpool=True)(images)
        tokens = model.forward_features(images)  # final norm applied
    torch.testing.assert_close(one, model(images))  # last block's class token == the pooled output
    assert two_pooled.shape == (4, 3 * 64)
    torch.testing.assert_close(two_pooled[:, 64:128], one)
    torch.testing.assert_close(two_pooled[:, 128:], tokens[:, 1:].mean(dim=1))


@pytest.mark.parametrize("mode", ["cached", "augment"])
def test_linear_run_on_dino_checkpoint(tmp_path, mode):
    classes = ["ant", "bee", "cat"]
    write_image_folder(tmp_path / "data" / "train", classes, per_class=4)
    write_image_folder(tmp_path / "data" / "val", classes, per_class=2, seed=1)
    dino_checkpoint(tmp_path / "checkpoint.pth")
    out = tmp_path / "out"
    results = linear.main([str(tmp_path / "checkpoint.pth"), "--data-path", str(tmp_path / "data"), "--mode", mode,
                           "--epochs", "3", "--batch-size", "4", "--num-workers", "0", "--throughput-repeats", "2",
                           "--output-dir", str(out)])
    saved = json.loads((out / "linear_results.json").read_text())
    assert saved["mode"] == mode and saved["n_last_blocks"] == 2 and saved["feature_dim"] == 128
    assert saved["lr"] == pytest.approx(0.001 * 4 / 256)
    assert saved["best"]["top1"] >= saved["last"]["top1"] and len(saved["history"]) == 3
    assert saved["tower"]["fusion"]["ok"] and saved["costs"]["gmacs"] > 0
    head = load_checkpoint(out / "linear_classifier.pth")
    assert head["state_dict"]["linear.weight"].shape == (3, 128) and head["classes"] == classes
    assert results["last"] == saved["last"]
