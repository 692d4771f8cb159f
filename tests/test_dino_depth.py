"""DINO with --depth-branches: a trained deep tower becomes K branches, joins, resumes exactly and exports merged."""
from __future__ import annotations

import shutil

import pytest
import torch

from dino import train as dino_train
from repa_ssl import branch_join
from repa_ssl.checkpoint import load_checkpoint, load_fused_tower
from repa_ssl.dino_checkpoint import load_dino_backbone
from repa_ssl.distributed import DistEnv
from repa_ssl.fusion import FusionError
from repa_ssl.join_schedule import JoinSchedule

from dino_helpers import TINY, make_images

# 2 epochs of 4 iterations; the join spans all 8, so an epoch-0 checkpoint is half-way through it.
BRANCHED = ["--depth-branches", "2", "--join-fraction", "1", "--saveckp-freq", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    make_images(root / "train")
    make_images(root / "val", n_per_class=4)
    return root


@pytest.fixture(scope="module")
def deep(data, tmp_path_factory):
    """A trained depth-2 DINO run: what --init-from converts."""
    out = tmp_path_factory.mktemp("deep")
    dino_train.main(TINY + ["--epochs", "1", "--data-path", str(data / "train"), "--output-dir", str(out),
                            "--no-export"])
    return out / "checkpoint.pth"


def _branched(data, deep, out, *extra):
    return TINY + BRANCHED + ["--init-from", str(deep), "--data-path", str(data / "train"), "--output-dir", str(out),
                              *extra]


@pytest.fixture(scope="module")
def run(data, deep, tmp_path_factory):
    out = tmp_path_factory.mktemp("branched")
    dino_train.main(_branched(data, deep, out))
    return out


def test_init_from_a_deep_checkpoint_gives_the_same_tower_at_s_1(data, deep, tmp_path):
    cfg = dino_train.DINOConfig(**vars(dino_train.get_args_parser().parse_args(_branched(data, deep, tmp_path))))
    student, teacher, _, _ = dino_train.build_networks(cfg, DistEnv())
    deep_teacher = load_dino_backbone(load_checkpoint(deep)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for net in (student, teacher):
        assert branch_join(net.backbone) == 1.0
        with torch.no_grad():
            torch.testing.assert_close(net.backbone.eval()(x), deep_teacher(x), rtol=1e-5, atol=1e-5)
    assert len(list(student.backbone.parameters())) == len(list(deep_teacher.parameters()))  # weights taken over


def test_init_from_a_backbone_state_dict_with_a_classifier(data, tmp_path):
    """A timm / the RePaViT authors' checkpoint: the backbone is taken over, its classifier left out."""
    import timm

    torch.manual_seed(1)
    classifier = timm.create_model("test_repa_vit", num_classes=10).eval()
    torch.save({"model": classifier.state_dict()}, tmp_path / "supervised.pth")
    args = TINY + ["--init-from", str(tmp_path / "supervised.pth"), "--depth-branches", "2",
                   "--data-path", str(data / "train"), "--output-dir", str(tmp_path / "out")]
    student, _, _, _ = dino_train.build_networks(
        dino_train.DINOConfig(**vars(dino_train.get_args_parser().parse_args(args))), DistEnv())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student.backbone.eval()(x), classifier.forward_head(
            classifier.forward_features(x), pre_logits=True), rtol=1e-5, atol=1e-5)


def test_the_join_falls_per_iteration_and_ends_at_zero(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    join = EventAccumulator(str(run / "tb")).Reload().Scalars("train/join")
    schedule = JoinSchedule(total=8, fraction=1.0)
    assert [e.step for e in join] == list(range(8))
    assert [e.value for e in join] == pytest.approx([schedule(i) for i in range(8)])
    assert join[0].value > 0.9 and join[-1].value == 0.0
    ckpt = load_checkpoint(run / "checkpoint.pth")
    assert ckpt["args"]["depth_branches"] == 2 and ckpt["args"]["join_fraction"] == 1.0
    assert branch_join(load_dino_backbone(ckpt)) == 0.0
    assert branch_join(load_dino_backbone(load_checkpoint(run / "checkpoint0000.pth"))) == pytest.approx(schedule(3))


def test_resume_mid_join_continues_exactly(run, data, deep, tmp_path, dino_iterations, monkeypatch):
    shutil.copy(run / "checkpoint0000.pth", tmp_path / "checkpoint.pth")  # stopped half-way through the join
    joins = []
    original = dino_train.set_branch_join

    def recording(model, s):
        joins.append(s)
        return original(model, s)

    monkeypatch.setattr(dino_train, "set_branch_join", recording)
    dino_train.main(_branched(data, tmp_path / "moved.pth", tmp_path, "--no-export"))  # --init-from not read again
    assert dino_iterations == [4, 5, 6, 7]  # it resumed after epoch 0
    schedule = JoinSchedule(total=8, fraction=1.0)
    assert joins[::2] == [schedule(i) for i in range(4, 8)]  # student and teacher, from s(4) on
    resumed, full = load_checkpoint(tmp_path / "checkpoint.pth"), load_checkpoint(run / "checkpoint.pth")
    for key, value in full["teacher"].items():
        torch.testing.assert_close(resumed["teacher"][key], value, rtol=0, atol=0, msg=key)


def test_the_export_is_the_merged_fused_teacher_and_evaluates(run, data):
    from repa_ssl.eval import load_tower
    from repa_ssl.eval.knn import KNNOptions, evaluate_knn

    fused, meta = load_fused_tower(run / "teacher_fused.safetensors")
    assert meta["depth_branches"] == 2 and meta["fusion"]["ok"]
    assert len(fused.blocks) == 1  # 2 blocks merged into one wide block
    teacher = load_dino_backbone(load_checkpoint(run / "checkpoint.pth")).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), teacher(x), rtol=1e-4, atol=1e-4)
    options = KNNOptions(data_path=data, ks=(1, 3), num_workers=0, batch_size=8, throughput_repeats=1)
    result = evaluate_knn(load_tower(run / "teacher_fused.safetensors"), options)
    assert result.num_val == 8 and 0 <= result.accuracy[1]["top1"] <= 100


def test_exporting_before_the_join_ends_is_refused(run, data, tmp_path):
    from dino import export

    with pytest.raises(FusionError, match="join"):
        export.main(["--checkpoint", str(run / "checkpoint0000.pth"), "--output", str(tmp_path / "t.safetensors"),
                     "--data-path", str(data / "train")])
    assert not (tmp_path / "t.safetensors").exists()


def test_resuming_with_other_depth_settings_is_refused(run, data, deep, tmp_path):
    shutil.copy(run / "checkpoint0000.pth", tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match=r"--join-fraction 1.0 .* not .*--join-fraction 0.5.*Resume with"):
        dino_train.main(_branched(data, deep, tmp_path, "--join-fraction", "0.5"))
    with pytest.raises(ValueError, match=r"--epochs 2, not .*--epochs 3"):
        dino_train.main(_branched(data, deep, tmp_path, "--epochs", "3"))
    assert not (tmp_path / "log.txt").exists()  # nothing trained


def test_branches_train_from_scratch_too(data, tmp_path):
    result = dino_train.main(TINY + ["--epochs", "1", "--depth-branches", "2", "--join-fraction", "0.5",
                                     "--data-path", str(data / "train"), "--output-dir", str(tmp_path)])
    assert torch.isfinite(torch.tensor(result.last_epoch.loss))
    assert load_fused_tower(result.fused_export)[0].blocks.__len__() == 1
