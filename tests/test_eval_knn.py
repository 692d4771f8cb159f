"""k-NN evaluation: the DINO weighted vote, chunking, and a run on a DINO checkpoint's fused teacher."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import repa_ssl
from eval_fixtures import dino_checkpoint, write_image_folder
from repa_ssl.eval import Features, class_token, extract_features, knn, load_tower
from repa_ssl.eval.data import eval_transform, make_loader
from repa_ssl.data import RobustImageFolder
from repa_ssl.distributed import DistEnv


def brute_force_knn(train, train_labels, test, test_labels, k, T, num_classes):
    """Per test image, in plain Python: cosine similarities, k best, exp(sim/T) votes, ranks."""
    train = F.normalize(train, dim=1).double()
    test = F.normalize(test, dim=1).double()
    top1 = top5 = 0
    for x, y in zip(test, test_labels.tolist()):
        sims = [(float(x @ t), int(label)) for t, label in zip(train, train_labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, label in sims[:k]:
            votes[label] += math.exp(s / T)
        ranking = sorted(range(num_classes), key=lambda c: -votes[c])  # DINO's: ties in class order
        top1 += ranking[0] == y
        top5 += y in ranking[:min(5, k)]
    n = len(test_labels)
    return 100.0 * top1 / n, 100.0 * top5 / n


def test_knn_matches_brute_force_and_chunking_changes_nothing():
    g = torch.Generator().manual_seed(0)
    train, train_labels = torch.randn(120, 8, generator=g), torch.randint(0, 10, (120,), generator=g)
    test, test_labels = torch.randn(30, 8, generator=g), torch.randint(0, 10, (30,), generator=g)
    ks = (10, 20, 50)
    chunked = knn.knn_classify(train, train_labels, test, test_labels, ks, 0.07, 10, chunk_size=7)
    whole = knn.knn_classify(train, train_labels, test, test_labels, ks, 0.07, 10, chunk_size=1000)
    assert chunked == whole
    for k in ks:
        top1, top5 = brute_force_knn(train, train_labels, test, test_labels, k, 0.07, 10)
        assert chunked[k]["top1"] == pytest.approx(top1)
        assert chunked[k]["top5"] == pytest.approx(top5)
    assert any(chunked[k]["top1"] < 100 for k in ks)  # random labels: a non-trivial check


def test_knn_ranks_tied_classes_as_dino_does():
    """Classes without a vote tie at 0: DINO's ``probs.sort(1, True)`` ranks them in class order."""
    train, train_labels = torch.eye(5, 8), torch.tensor([7, 9, 3, 9, 3])
    test, test_labels = torch.eye(5, 8)[[0, 0, 0, 0]], torch.tensor([0, 1, 2, 11])
    acc = knn.knn_classify(train, train_labels, test, test_labels, (1, 5), 0.07, num_classes=12)
    assert acc[5] == {"top1": 0.0, "top5": 50.0}  # 7, then 3 and 9 (tied), then classes 0 and 1 (no votes)
    assert acc[1] == {"top1": 0.0, "top5": 0.0}  # with one neighbour, DINO's top-5 is the top-1

    g = torch.Generator().manual_seed(2)  # 40 classes, few neighbours: most ranks are ties
    train, train_labels = torch.randn(60, 8, generator=g), torch.randint(0, 40, (60,), generator=g)
    test, test_labels = torch.randn(50, 8, generator=g), torch.randint(0, 10, (50,), generator=g)
    acc = knn.knn_classify(train, train_labels, test, test_labels, (1, 2, 3), 0.07, 40)
    for k in (1, 2, 3):
        assert (acc[k]["top1"], acc[k]["top5"]) == pytest.approx(
            brute_force_knn(train, train_labels, test, test_labels, k, 0.07, 40))
    assert acc[3]["top5"] > acc[3]["top1"]


def test_knn_is_perfect_on_planted_clusters():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(10, 32, generator=g) * 5
    train_labels = torch.arange(10).repeat_interleave(30)
    test_labels = torch.arange(10).repeat(5)
    train = centers[train_labels] + 0.1 * torch.randn(300, 32, generator=g)
    test = centers[test_labels] + 0.1 * torch.randn(50, 32, generator=g)
    acc = knn.knn_classify(train, train_labels, test, test_labels, (10, 20, 100, 200), chunk_size=16)
    assert all(v == {"top1": 100.0, "top5": 100.0} for v in acc.values())


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    classes = ["ant", "bee", "cat"]
    write_image_folder(root / "data" / "train", classes, per_class=4)
    write_image_folder(root / "data" / "val", classes, per_class=2, seed=1)
    (root / "data" / "val" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    nets = dino_checkpoint(root / "run" / "checkpoint.pth")
    return root, nets


def _run(root, *extra):
    return knn.main([str(root / "run" / "checkpoint.pth"), "--data-path", str(root / "data"), "--num-workers", "0",
                     "--batch-size", "4", "--throughput-repeats", "2", *extra])


def test_knn_run_evaluates_the_fused_teacher_and_records_it(dino_run):
    root, nets = dino_run
    out = root / "out"
    results = _run(root, "--output-dir", str(out), "--nb-knn", "1", "3", "--save-features", str(root / "feats"))
    saved = json.loads((out / "knn_results.json").read_text())
    assert saved["accuracy"].keys() == {"1", "3"}
    assert 0 <= saved["accuracy"]["1"]["top1"] <= 100
    fusion = saved["tower"]["fusion"]
    assert fusion["ok"] and fusion["max_rel_err"] < 1e-4 and fusion["verified_on"] == "first evaluation batch"
    costs = saved["costs"]
    assert costs["params_m"] < saved["tower"]["params_train_m"]  # the fused tower is what was measured
    assert costs["gmacs"] > 0 and costs["images_per_s"] > 0
    assert saved["num_train"] == 12 and saved["num_val"] == 6 and saved["num_skipped"] == 1
    assert "| k | top-1 (%) | top-5 (%) |" in (out / "knn_results.md").read_text()

    # The saved features are the TEACHER's class tokens (the student's differ), in dataset order.
    train = Features.load(root / "feats" / "train_features.pth")
    dataset = RobustImageFolder(root / "data" / "train", transform=eval_transform(64, (0.485, 0.456, 0.406),
                                                                                   (0.229, 0.224, 0.225)))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        teacher, student = nets["teacher"](images), nets["student"](images)
    torch.testing.assert_close(train.features, teacher, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(train.features, student, atol=1e-3)
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4

    again = knn.main(["--load-features", str(root / "feats"), "--output-dir", str(root / "again"),
                      "--nb-knn", "1", "3"])
    assert again["accuracy"] == results["accuracy"]


def test_broken_fusion_stops_the_evaluation(dino_run, monkeypatch):
    root, _ = dino_run

    def perturbed_fuse(model):
        fused = repa_ssl.fuse_model(model)
        with torch.no_grad():
            fused.blocks[0].mlp.linear.weight.add_(0.05 * torch.randn_like(fused.blocks[0].mlp.linear.weight))
        return fused

    monkeypatch.setattr("repa_ssl.eval.towers.fuse_model", perturbed_fuse)
    with pytest.raises(repa_ssl.FusionError, match="Refusing"):
        _run(root, "--output-dir", str(root / "broken"))
    assert not (root / "broken" / "knn_results.json").exists()


def test_extract_features_skips_and_counts_bad_images(dino_run):
    root, nets = dino_run
    transform = eval_transform(64, (0.5,) * 3, (0.5,) * 3)
    loader = make_loader(RobustImageFolder(root / "data" / "val", transform=transform), 4, 0, DistEnv())
    feats = extract_features(class_token(nets["teacher"]), loader, DistEnv())
    assert feats.num_skipped == 1 and feats.features.shape == (6, 64)
    assert feats.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_evaluate_knn_gives_the_commands_results_without_argv(dino_run, tmp_path):
    """The typed API: a tower and KNNOptions in, a KNNResult out; what the command writes, less its command line."""
    root, _ = dino_run
    options = knn.KNNOptions(data_path=root / "data", ks=(1, 3), num_workers=0, batch_size=4, throughput_repeats=2)
    result = knn.evaluate_knn(load_tower(root / "run" / "checkpoint.pth"), options)
    assert isinstance(result, knn.KNNResult) and result.accuracy.keys() == {1, 3}
    assert (result.num_train, result.num_val, result.num_skipped) == (12, 6, 1)
    written = _run(root, "--output-dir", str(tmp_path), "--nb-knn", "1", "3")
    timing = ("costs", "args")  # the throughput is measured afresh; only the command has a command line
    assert {k: v for k, v in result.to_json().items() if k not in timing} == \
        {k: v for k, v in written.items() if k not in timing}
