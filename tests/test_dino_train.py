"""End-to-end DINO on a tiny RePa ViT: training, checkpoints, resume, fused export, non-finite loss."""
from __future__ import annotations

import shutil

import pytest
import torch

from dino import train as dino_train
from repa_ssl.checkpoint import CheckpointError, load_checkpoint, load_fused_tower
from repa_ssl.dino_checkpoint import load_dino_backbone

from dino_helpers import TINY, epoch_log, make_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def run(images, tmp_path_factory):
    """One uninterrupted two-epoch run, shared by the tests below."""
    out = tmp_path_factory.mktemp("run")
    dino_train.main(TINY + ["--data-path", str(images), "--output-dir", str(out), "--saveckp-freq", "1"])
    return out


def test_two_epochs_loss_finite_and_decreasing(run):
    log = epoch_log(run)
    assert [e["epoch"] for e in log] == [0, 1]
    losses = [e["loss"] for e in log]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[1] < losses[0]
    assert all(e["skipped_images"] == 0 for e in log)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb")).Reload()
    tags = {f"train/{n}" for n in ("loss", "lr", "wd", "momentum", "teacher_temp", "images_per_s")}
    assert tags <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(8))  # one point per iteration


def test_checkpoint_holds_everything_to_continue(run):
    ckpt = load_checkpoint(run / "checkpoint.pth")  # weights_only loading
    assert {"student", "teacher", "optimizer", "scaler", "dino_loss", "epoch", "iteration", "args", "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 8  # 16 images / batch 4 = 4 iterations per epoch
    assert ckpt["scaler"] is None  # fp32 on CPU
    assert ckpt["args"]["arch"] == "test_repa_vit" and ckpt["args"]["idle_ratio"] == 0.75
    assert ckpt["args"]["global_crop_size"] == 32 and ckpt["args"]["out_dim"] == 64
    assert ckpt["dino_loss"]["center"].shape == (1, 64) and ckpt["dino_loss"]["center"].abs().sum() > 0
    assert all(k.startswith(("backbone.", "head.")) for k in ckpt["teacher"])
    assert (run / "checkpoint0000.pth").is_file() and (run / "checkpoint0001.pth").is_file()


def test_teacher_is_an_ema_not_a_copy(run):
    ckpt = load_checkpoint(run / "checkpoint.pth")
    student, teacher = ckpt["student"], ckpt["teacher"]
    assert not torch.equal(student["backbone.blocks.0.attn.qkv.weight"], teacher["backbone.blocks.0.attn.qkv.weight"])
    # The teacher's BatchNorms kept their own statistics (train mode), not the student's.
    key = "backbone.blocks.0.mlp.norm1.running_mean"
    assert not torch.equal(student[key], teacher[key]) and teacher[key].abs().sum() > 0
    # The prototypes were frozen in epoch 0 (freeze_last_layer 1): teacher and student still agree there.
    first = load_checkpoint(run / "checkpoint0000.pth")
    proto = "head.last_layer.parametrizations.weight.original1"
    torch.testing.assert_close(first["student"][proto], first["teacher"][proto])  # up to EMA rounding
    assert not torch.equal(first["student"]["head.mlp.0.weight"], first["teacher"]["head.mlp.0.weight"])


def test_fused_teacher_export_matches_the_teacher(run, images):
    fused, meta = load_fused_tower(run / "teacher_fused.safetensors")
    assert meta["model_name"] == "test_repa_vit" and meta["fusion"]["ok"] and meta["idle_ratios"] == [0.75, 0.75]
    teacher = load_dino_backbone(load_checkpoint(run / "checkpoint.pth")).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), teacher(x), rtol=1e-4, atol=1e-4)


def test_resume_after_epoch_one_ends_like_the_uninterrupted_run(run, images, tmp_path):
    # The state an interrupted run leaves behind after its first epoch.
    shutil.copy(run / "checkpoint0000.pth", tmp_path / "checkpoint.pth")
    dino_train.main(TINY + ["--data-path", str(images), "--output-dir", str(tmp_path), "--no-export"])
    resumed, full = load_checkpoint(tmp_path / "checkpoint.pth"), load_checkpoint(run / "checkpoint.pth")
    assert [e["epoch"] for e in epoch_log(tmp_path)] == [1]
    for key, value in full["teacher"].items():
        torch.testing.assert_close(resumed["teacher"][key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(resumed["dino_loss"]["center"], full["dino_loss"]["center"], rtol=0, atol=0)


def test_resume_is_exact_with_data_loader_workers(images, tmp_path, dino_iterations):
    # Workers draw their seeds from the loader's own generator, reseeded every epoch.
    args = [a if prev != "--num-workers" else "2" for prev, a in zip([""] + TINY, TINY)]
    args += ["--data-path", str(images), "--no-export", "--saveckp-freq", "1"]
    dino_train.main(args + ["--output-dir", str(tmp_path / "full")])
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint0000.pth", tmp_path / "resumed" / "checkpoint.pth")
    dino_iterations.clear()
    dino_train.main(args + ["--output-dir", str(tmp_path / "resumed")])
    assert dino_iterations == [4, 5, 6, 7]  # epoch 1 only: it resumed
    full, resumed = (load_checkpoint(tmp_path / d / "checkpoint.pth") for d in ("full", "resumed"))
    assert full["args"]["num_workers"] == 2
    for key, value in full["teacher"].items():
        torch.testing.assert_close(resumed["teacher"][key], value, rtol=0, atol=0, msg=key)


def test_resume_mid_epoch_continues_exactly(run, images, tmp_path, monkeypatch, dino_iterations):
    args = TINY + ["--data-path", str(images), "--output-dir", str(tmp_path), "--no-export", "--saveckp-iters", "3"]
    original = dino_train.DINOStep.__call__

    def interrupted(self, crops, epoch, it):
        if it == 6:  # epoch 1, after the iteration-6 checkpoint
            raise KeyboardInterrupt
        return original(self, crops, epoch, it)

    monkeypatch.setattr(dino_train.DINOStep, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dino_train.main(args)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 6)
    monkeypatch.setattr(dino_train.DINOStep, "__call__", original)
    dino_iterations.clear()
    dino_train.main(args)
    assert dino_iterations == [6, 7]  # resumed after the iteration-6 checkpoint
    resumed, full = load_checkpoint(tmp_path / "checkpoint.pth"), load_checkpoint(run / "checkpoint.pth")
    for key, value in full["teacher"].items():
        torch.testing.assert_close(resumed["teacher"][key], value, rtol=0, atol=0, msg=key)


def test_non_finite_loss_stops_after_saving_the_last_good_state(images, tmp_path, monkeypatch):
    args = TINY + ["--data-path", str(images), "--output-dir", str(tmp_path), "--no-export"]
    original = dino_train.DINOLoss.forward

    def nan_in_epoch_one(self, student_output, teacher_output, epoch):
        loss = original(self, student_output, teacher_output, epoch)
        return loss * float("nan") if epoch == 1 else loss

    monkeypatch.setattr(dino_train.DINOLoss, "forward", nan_in_epoch_one)
    with pytest.raises(SystemExit, match=r"loss is nan at epoch 1, iteration 4.*last good state"):
        dino_train.main(args)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 4)
    # It is exactly the state before the failing iteration (= the end of epoch 0): weights, BatchNorm
    # statistics and the loss centre, although that iteration's forward pass had already updated the last two.
    before = load_checkpoint(tmp_path / "checkpoint0000.pth")
    for entry in ("student", "teacher", "dino_loss"):
        for key, value in before[entry].items():
            torch.testing.assert_close(ckpt[entry][key], value, rtol=0, atol=0, msg=f"{entry}.{key}")


def test_export_cli_on_an_earlier_checkpoint(run, images, tmp_path):
    from dino import export

    path = export.main(["--checkpoint", str(run / "checkpoint0000.pth"), "--output", str(tmp_path / "t.safetensors"),
                        "--data-path", str(images)])
    fused, meta = load_fused_tower(path)
    assert meta["epoch"] == 1 and meta["source_entry"] == "teacher"
    assert meta["source_checkpoint"] == str((run / "checkpoint0000.pth").resolve())  # not beside the export
    assert meta["fusion"]["num_samples"] == 16  # verified on 16 real training images


def test_resuming_into_another_model_is_refused(run, images, tmp_path):
    shutil.copy(run / "checkpoint0000.pth", tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match=r"different model \(out_dim: 64 -> 32\)"):
        dino_train.main(TINY + ["--data-path", str(images), "--output-dir", str(tmp_path), "--out-dim", "32"])


def test_resuming_with_another_optimizer_is_refused(run, images, tmp_path):
    shutil.copy(run / "checkpoint0000.pth", tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="trained with --optimizer adamw, not sgd.*Resume with --optimizer adamw"):
        dino_train.main(TINY + ["--data-path", str(images), "--output-dir", str(tmp_path), "--optimizer", "sgd"])


def test_resuming_with_another_global_batch_is_refused(run, images, tmp_path):
    """Twice the batch halves the iterations per epoch: today's epoch-1 checkpoint would look finished."""
    shutil.copy(run / "checkpoint0000.pth", tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match=r"global batch of 4 \(4 per process x 1\), now 8"):
        dino_train.main(TINY + ["--data-path", str(images), "--output-dir", str(tmp_path),
                                "--batch-size-per-gpu", "8"])
    assert not (tmp_path / "log.txt").exists()  # no epoch ran, none was logged


def test_a_foreign_file_as_checkpoint_is_refused(images, tmp_path):
    import timm

    torch.save(timm.create_model("test_repa_vit").state_dict(), tmp_path / "checkpoint.pth")
    with pytest.raises(CheckpointError, match="not a dino.train checkpoint .*lacks student, teacher"):
        dino_train.main(TINY + ["--data-path", str(images), "--output-dir", str(tmp_path)])
    assert (tmp_path / "checkpoint.pth").is_file()  # left for the user to move


def test_the_fused_teacher_is_rechecked_against_its_checkpoint_at_evaluation(run, tmp_path):
    """The sidecar names checkpoint.pth beside the export: an evaluation compares the two again."""
    from repa_ssl.eval import fuse_and_verify, load_tower
    from repa_ssl.fusion import FusionError

    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tower = fuse_and_verify(load_tower(run / "teacher_fused.safetensors"), images)
    assert tower.fusion["ok"] and tower.fusion["verified_on"].endswith(f"against {run / 'checkpoint.pth'}")

    for name in ("teacher_fused.safetensors", "teacher_fused.json"):  # beside another run's checkpoint
        shutil.copy(run / name, tmp_path / name)
    shutil.copy(run / "checkpoint0000.pth", tmp_path / "checkpoint.pth")
    with pytest.raises(FusionError):
        fuse_and_verify(load_tower(tmp_path / "teacher_fused.safetensors"), images)


def test_train_takes_a_config_and_returns_what_it_left(images, tmp_path):
    """train(DINOConfig) -> TrainResult: the last epoch as logged, the files, the config as run (the caller's
    config unchanged), and where a second call resumed from."""
    cfg = dino_train.DINOConfig(**vars(dino_train.get_args_parser().parse_args(
        TINY + ["--epochs", "1", "--data-path", str(images), "--output-dir", str(tmp_path)])))
    result = dino_train.train(cfg)
    assert result.last_epoch.to_json() == epoch_log(tmp_path)[-1] and result.last_epoch.epoch == 0
    assert result.checkpoint == tmp_path / "checkpoint.pth" and result.checkpoint.is_file()
    assert result.fused_export == tmp_path / "teacher_fused.safetensors" and result.fused_export.is_file()
    assert (result.config.precision, cfg.precision) == ("fp32", "auto") and result.resumed_at == 0
    again = dino_train.train(cfg)  # a finished run: resumed at its end, nothing trained
    assert again.resumed_at == 4 and again.last_epoch is None
