"""clip.train --depth-branches: a trained deep CLIP becomes K branches, joins per step, resumes and exports merged."""
from __future__ import annotations

import open_clip
import open_clip_train.main as train_main
import pytest
import torch

import clip.train
import repa_ssl
from clip.export import export_fused_clip, load_train_clip
from clip_helpers import TRAIN_FLAGS, write_digit_images, write_test_shards
from conftest import randomize_batchnorms
from eval_fixtures import write_image_folder
from repa_ssl.checkpoint import load_checkpoint
from repa_ssl.eval import zeroshot
from repa_ssl.fusion import FusionError
from repa_ssl.join_schedule import JoinSchedule

# 2 epochs of 4 steps, the join over all 8: epoch_1.pt is half-way through it.
BRANCHED = ["--depth-branches", "2", "--join-fraction", "1", "--epochs", "2", "--save-frequency", "1"]
SCHEDULE = JoinSchedule(total=8, fraction=1.0)


def _joins(state: dict[str, torch.Tensor]) -> list[float]:
    """The join s of every branch group in a CLIP state dict."""
    return [float(v) for k, v in state.items() if k.startswith("visual.") and k.endswith(".join")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_test_shards(tmp_path_factory.mktemp("laion"))


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


def _flags(shards, logs, name, *extra):
    return TRAIN_FLAGS + ["--train-data", shards, "--train-num-samples", "16", "--logs", str(logs), "--name", name,
                          *extra]


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A deep CLIP as open_clip_train saves it under DDP (``module.`` keys): what --init-from converts."""
    torch.manual_seed(0)
    model = randomize_batchnorms(open_clip.create_model("RePa-ViT-Test"))
    path = tmp_path_factory.mktemp("deep") / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "deep", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               path)
    return path


class Recorder:
    """The (step, s) clip.train sets before each training step."""

    def __init__(self) -> None:
        self.joins: list[float] = []

    def __call__(self, model, s: float) -> None:
        self.joins.append(s)
        original_set_branch_join(model, s)


original_set_branch_join = repa_ssl.set_branch_join


@pytest.fixture(scope="module")
def run(shards, logs, deep):
    """The branched run, interrupted after its first epoch, then resumed with --resume latest."""
    flags = _flags(shards, logs, "branched", "--init-from", str(deep), *BRANCHED)
    first, resumed = Recorder(), Recorder()
    original = train_main.train_one_epoch

    def stop_at_epoch_1(model, data, loss, epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(model, data, loss, epoch, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(repa_ssl, "set_branch_join", first)
        m.setattr(train_main, "train_one_epoch", stop_at_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            clip.train.main(flags)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(repa_ssl, "set_branch_join", resumed)
        moved = [str(logs / "moved.pt") if f == str(deep) else f for f in flags]  # --init-from not read again
        assert clip.train.main(moved + ["--resume", "latest"]) is None
    return logs / "branched", flags, first.joins, resumed.joins


def test_the_join_is_set_before_every_step_and_resumes_where_it_stopped(run):
    run_dir, _, first, resumed = run
    assert first == [SCHEDULE(i) for i in range(4)]  # epoch 0, then interrupted
    assert resumed == [SCHEDULE(i) for i in range(4, 8)]  # epoch 1 only: it resumed at step 4
    half_way = load_checkpoint(run_dir / "checkpoints" / "epoch_1.pt")["state_dict"]
    assert _joins(half_way) == [pytest.approx(SCHEDULE(3))]  # one group (2 blocks -> 1), mid-join
    assert _joins(load_checkpoint(run_dir / "checkpoints" / "epoch_2.pt")["state_dict"]) == [0.0]
    assert "(epoch 1)" in (run_dir / "out.log").read_text()


def test_the_resumed_run_is_the_uninterrupted_one_bit_for_bit(run, shards, logs, deep):
    """Resumed mid-join (epoch 1 of 2, s half-way) it ends where the same run without the interruption ends:
    weights, BatchNorm statistics, join buffers and optimizer state all equal."""
    run_dir, _, _, resumed = run
    assert resumed[0] == SCHEDULE(4)  # the resume happened, at step 4, and did not retrain epoch 0
    assert clip.train.main(_flags(shards, logs, "straight", "--init-from", str(deep), *BRANCHED)) is None
    ends = [load_checkpoint(d / "checkpoints" / "epoch_2.pt") for d in (run_dir, logs / "straight")]
    (resumed_sd, straight_sd), (resumed_opt, straight_opt) = ([e[k] for e in ends] for k in ("state_dict", "optimizer"))
    assert resumed_sd.keys() == straight_sd.keys() and _joins(resumed_sd) == [0.0]
    assert all(torch.equal(resumed_sd[k], straight_sd[k]) for k in resumed_sd)
    moments = [[t for state in opt["state"].values() for t in state.values()] for opt in (resumed_opt, straight_opt)]
    assert len(moments[0]) == len(moments[1]) > 0 and all(map(torch.equal, *moments))


def test_a_resume_under_other_depth_settings_is_refused(run):
    _, flags, _, _ = run
    with pytest.raises(ValueError, match=r"--join-fraction 1.0 .* not .*--join-fraction 0.5 .*give a new --name"):
        clip.train.main(flags + ["--resume", "latest", "--join-fraction", "0.5"])


def test_init_from_another_model_is_refused(shards, logs, deep):
    flags = _flags(shards, logs, "wrong", "--epochs", "1", "--init-from", str(deep))
    flags[flags.index("--model") + 1] = "RePa-ViT-Demo"
    with pytest.raises(ValueError, match=r"--init-from .*epoch_3.pt does not fit --model RePa-ViT-Demo"):
        clip.train.main(flags)
    assert not (logs / "wrong").exists()  # a failed start leaves no run folder


def test_the_export_is_the_merged_fused_clip(run, tmp_path):
    run_dir, _, _, _ = run
    images = write_digit_images(tmp_path / "images", 8)
    output = tmp_path / "merged.pt"
    report = export_fused_clip(run_dir / "checkpoints" / "epoch_2.pt", "RePa-ViT-Test", output, images,
                               depth_branches=2)
    assert report.ok
    merged_name = repa_ssl.repa_variant_name("RePa-ViT-Test", depth_branches=2)
    merged = open_clip.create_model(merged_name, pretrained=str(output)).eval()
    assert len(merged.visual.trunk.blocks) == 1
    branched, preprocess = load_train_clip(run_dir / "checkpoints" / "epoch_2.pt", "RePa-ViT-Test", depth_branches=2)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged.encode_image(x), branched.encode_image(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(FusionError, match="join"):  # half-way through the join: nothing to merge yet
        export_fused_clip(run_dir / "checkpoints" / "epoch_1.pt", "RePa-ViT-Test", tmp_path / "early.pt", images,
                          depth_branches=2)
    assert not (tmp_path / "early.pt").exists()


def test_the_merged_export_evaluates_zero_shot(run, tmp_path):
    """The merged fused CLIP goes through the zero-shot evaluation like any export: its name says it is merged."""
    run_dir, _, _, _ = run
    output = tmp_path / "merged.pt"
    export_fused_clip(run_dir / "checkpoints" / "epoch_2.pt", "RePa-ViT-Test", output,
                      write_digit_images(tmp_path / "images", 8), depth_branches=2)
    write_image_folder(tmp_path / "val", ["n01440764", "n01530575"], per_class=2)
    result = zeroshot.main([str(output), str(tmp_path / "val"), "--num-workers", "0", "--batch-size", "4",
                            "--templates", "simple", "--throughput-repeats", "1",
                            "--output-dir", str(tmp_path / "out")])
    assert result["tower"]["name"] == repa_ssl.repa_variant_name("RePa-ViT-Test", depth_branches=2)
    assert result["num_images"] == 4 and 0 <= result["accuracy"]["all_classes"]["top1"] <= 100
