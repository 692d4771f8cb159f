"""Zero-shot: synset folders keep their true ImageNet labels; a tiny CLIP runs end to end, fused."""
import json

import open_clip
import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from eval_fixtures import clip_fused_export, clip_model, clip_train_checkpoint, write_image_folder
from repa_ssl.data import RobustImageFolder
from repa_ssl.eval import clip_image, load_tower, zeroshot

# Three synsets whose sorted-folder positions (0, 1, 2) are NOT their ImageNet indices.
SUBSET = {"n01440764": 0, "n01530575": 10, "n02085620": 151}  # tench, brambling, Chihuahua


def test_synset_folders_map_to_their_true_imagenet_class():
    folders = sorted(SUBSET)
    assert zeroshot.imagenet_class_indices(folders) == [0, 10, 151]
    assert [IMAGENET_CLASSNAMES[i] for i in (0, 10, 151)] == ["tench", "brambling", "Chihuahua"]
    with pytest.raises(ValueError, match="--classnames"):
        zeroshot.imagenet_class_indices(["n01440764", "cats"])
    from timm.data import ImageNetInfo

    full = zeroshot.label_space(sorted(ImageNetInfo().label_names()))  # the whole validation set
    assert full.subset is None and full.folder_to_class == {i: i for i in range(1000)}


def test_subset_folder_labels_and_accuracies_are_right(tmp_path):
    write_image_folder(tmp_path, sorted(SUBSET), per_class=2)
    labels = zeroshot.label_space(RobustImageFolder(tmp_path).classes)
    dataset = RobustImageFolder(tmp_path, target_transform=labels.folder_to_class.__getitem__)
    targets = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    assert targets.tolist() == [0, 0, 10, 10, 151, 151]  # the sorted-folder trap would give 0, 0, 1, 1, 2, 2
    assert labels.subset == [0, 10, 151] and len(labels.classnames) == 1000

    classifier = torch.eye(1000)  # feature i votes for class i: planted answers
    planted = torch.eye(1000)[targets]
    acc = zeroshot.zero_shot_accuracy(planted, targets, classifier, labels.subset)
    assert acc["all_classes"]["top1"] == acc["subset_classes"]["top1"] == 100.0
    # Images that look most like class 500 (outside the subset), then like their own class:
    # wrong among all 1000 classes, right among the subset's three.
    confusing = torch.eye(1000)[500].expand(6, -1) + 0.5 * planted
    acc = zeroshot.zero_shot_accuracy(confusing, targets, classifier, labels.subset)
    assert acc["all_classes"] == {"top1": 0.0, "top5": 100.0}
    assert acc["subset_classes"] == {"top1": 100.0, "top5": 100.0}


def test_non_imagenet_folder_with_class_names_file(tmp_path):
    (tmp_path / "names.txt").write_text("cats domestic cat\ndogs dog\n")
    labels = zeroshot.label_space(["cats", "dogs"], tmp_path / "names.txt")
    assert labels.classnames == ["domestic cat", "dog"] and labels.subset is None
    (tmp_path / "names.json").write_text(json.dumps({"cats": "cat"}))
    with pytest.raises(ValueError, match="dogs"):
        zeroshot.label_space(["cats", "dogs"], tmp_path / "names.json")
    (tmp_path / "t.txt").write_text("a photo of a {}.\nart of the {}.\n")
    assert [t("dog") for t in zeroshot.load_templates(str(tmp_path / "t.txt"))] == ["a photo of a dog.",
                                                                                    "art of the dog."]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    write_image_folder(root / "val", sorted(SUBSET), per_class=2)
    (root / "val" / "n01530575" / "broken.jpg").write_bytes(b"")
    model = clip_model()
    train_ckpt = clip_train_checkpoint(root / "logs" / "run" / "checkpoints" / "epoch_1.pt", model)
    # beside its source checkpoint, the only place from which an evaluation re-checks an export against it
    fused_ckpt = clip_fused_export(train_ckpt.parent / "clip_fused.pt", model, torch.randn(4, 3, 64, 64), train_ckpt)
    return root, model, train_ckpt, fused_ckpt


def _zeroshot(ckpt, data, out, *extra):
    return zeroshot.main([str(ckpt), str(data), "--num-workers", "0", "--batch-size", "4", "--templates", "simple",
                          "--classes-per-batch", "1000", "--throughput-repeats", "2", "--output-dir", str(out),
                          *extra])


def test_tiny_clip_zero_shot_end_to_end(clip_run):
    root, _, train_ckpt, _ = clip_run
    _zeroshot(train_ckpt, root / "val", root / "out")  # model name read from the run's params.txt
    saved = json.loads((root / "out" / "zeroshot_results.json").read_text())
    assert saved["tower"]["name"] == "RePa-ViT-Test" and saved["tower"]["kind"] == "clip"
    assert saved["tower"]["fusion"]["ok"] and saved["tower"]["fusion"]["max_rel_err"] < 1e-4
    assert saved["num_images"] == 6 and saved["num_skipped"] == 1 and saved["num_classes"] == 1000
    for key in ("all_classes", "subset_classes"):
        assert 0 <= saved["accuracy"][key]["top1"] <= saved["accuracy"][key]["top5"] <= 100
    assert saved["accuracy"]["subset_classes"]["top5"] == 100.0  # only 3 classes
    costs = saved["costs"]
    visual = open_clip.create_model("RePa-ViT-Test-fused").visual
    assert costs["params_m"] == pytest.approx(sum(p.numel() for p in visual.parameters()) / 1e6)
    assert "the 3 folders' classes" in (root / "out" / "zeroshot_results.md").read_text()


def test_fused_and_train_forms_predict_the_same(clip_run):
    root, model, train_ckpt, fused_ckpt = clip_run
    train = load_tower(train_ckpt, "RePa-ViT-Test", clip=True)  # train form, not fused
    fused = load_tower(fused_ckpt, clip=True)
    assert fused.name == "RePa-ViT-Test-fused" and fused.fusion is None
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    tokenizer = open_clip.get_tokenizer("RePa-ViT-Test")
    names = ["tench", "brambling", "Chihuahua", "goldfish", "hen"]
    templates = zeroshot.load_templates("simple")
    with torch.no_grad():
        logits = {}
        for name, tower in (("train", train), ("fused", fused)):
            classifier = open_clip.build_zero_shot_classifier(tower.model, tokenizer, names, templates)
            logits[name] = clip_image(tower.model)(images) @ classifier
    torch.testing.assert_close(logits["fused"], logits["train"], rtol=1e-4, atol=1e-5)
    assert torch.equal(logits["fused"].argmax(1), logits["train"].argmax(1))
    spread = logits["train"].max(0).values - logits["train"].min(0).values
    assert spread.max() > 100 * (logits["fused"] - logits["train"]).abs().max()  # images differ far beyond the error

    # The whole evaluation agrees too: train-form checkpoint (fused on the fly) vs the fused export.
    a = _zeroshot(train_ckpt, root / "val", root / "a")
    b = _zeroshot(fused_ckpt, root / "val", root / "b")
    assert a["accuracy"] == b["accuracy"]
    assert "epoch_1.pt" in b["tower"]["fusion"]["verified_on"]  # re-checked against its source checkpoint


def test_a_class_names_line_without_a_name_is_a_clear_error(tmp_path):
    (tmp_path / "names.txt").write_text("cats domestic cat\ndogs\n")
    with pytest.raises(ValueError, match=r"names.txt: line 'dogs' names no class; write '<folder> <class name>'"):
        zeroshot.load_classnames(tmp_path / "names.txt")
