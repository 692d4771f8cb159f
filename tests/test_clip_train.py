"""`python -m clip.train` trains a tiny RePa CLIP on LAION-layout shards, resumes, and runs under torchrun."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import open_clip_train.main as train_main
import pytest
import torch

import clip.train
from clip_helpers import TRAIN_FLAGS, write_test_shards

ROOT = Path(__file__).resolve().parents[1]


def _losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r" Loss: (\S+) \(", log)]


def _skip_counts(log: str) -> list[tuple[int, int]]:
    counts = re.findall(r"skipped samples: (\d+) corrupt images, (\d+) without caption", log)
    return [(int(a), int(b)) for a, b in counts]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_test_shards(tmp_path_factory.mktemp("laion"))


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory):
    """One epoch of 4 steps (16 samples asked for, 14 readable: every shard is read to the end)."""
    logs = tmp_path_factory.mktemp("logs")
    flags = TRAIN_FLAGS + ["--train-data", shards, "--train-num-samples", "16", "--logs", str(logs), "--name", "tiny"]
    assert clip.train.main(flags + ["--epochs", "1"]) is None
    return logs / "tiny", flags


def test_train_tiny_repa_clip_on_shards_with_bad_samples(run):
    run_dir, _ = run
    log = (run_dir / "out.log").read_text()
    losses = _losses(log)
    assert losses and all(math.isfinite(x) for x in losses)
    (corrupt, no_caption), = _skip_counts(log)  # one line per epoch
    assert corrupt >= 1 and no_caption >= 1  # each met once per pass over the shards
    checkpoint = torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and any("norm1.running_var" in k for k in checkpoint["state_dict"])


def test_resume_latest_continues_with_batchnorm_statistics(run, monkeypatch):
    run_dir, flags = run
    saved = torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)["state_dict"]
    saved_stats = {k: v for k, v in saved.items() if ".running_" in k}
    assert not torch.allclose(saved_stats[next(k for k in saved_stats if "running_var" in k)], torch.ones(1))

    at_epoch_start = {}
    train_one_epoch = train_main.train_one_epoch

    def spy(model, data, loss, epoch, *args, **kwargs):
        at_epoch_start[epoch] = {k: v.clone() for k, v in model.state_dict().items() if ".running_" in k}
        return train_one_epoch(model, data, loss, epoch, *args, **kwargs)

    monkeypatch.setattr(train_main, "train_one_epoch", spy)
    assert clip.train.main(flags + ["--epochs", "2", "--resume", "latest"]) is None
    assert list(at_epoch_start) == [1]  # epoch 0 is not trained again
    assert at_epoch_start[1].keys() == saved_stats.keys()
    assert all(torch.equal(at_epoch_start[1][k], v) for k, v in saved_stats.items())
    log = (run_dir / "out.log").read_text()
    assert "(epoch 1)" in log and (run_dir / "checkpoints" / "epoch_2.pt").is_file()


def test_two_processes_with_gloo_under_torchrun(shards, tmp_path):
    # Two sources with upsampling factors, sampled with replacement, one DataLoader worker each.
    source = shards.replace("{00000..00001}", "00001")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "clip.train", "--", *TRAIN_FLAGS, "--workers", "1",
           "--train-data", f"{shards}::{source}", "--train-data-upsampling-factors", "1::2", "--dataset-resampled",
           "--train-num-samples", "16", "--epochs", "1", "--logs", str(tmp_path), "--name", "ddp"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "ddp" / "out.log").read_text()
    assert "Running in distributed mode with multiple processes. Device: cpu" in log and "total 2" in log
    assert "SyncBatchNorm is on" in log and "use_bn_sync: True" in (tmp_path / "ddp" / "params.txt").read_text()
    assert _losses(log) and all(math.isfinite(x) for x in _losses(log)) and _skip_counts(log)
    assert (tmp_path / "ddp" / "checkpoints" / "epoch_1.pt").is_file()


def test_train_takes_a_config_and_returns_its_checkpoint(shards, tmp_path):
    cfg = clip.train.CLIPTrainConfig(model="RePa-ViT-Test", train_data=shards, logs=tmp_path, name="typed",
                                     train_num_samples=16, epochs=1, batch_size=4, warmup=1, workers=0,
                                     device="cpu", seed=0)
    assert cfg.argv() == ["--model", "RePa-ViT-Test", "--train-data", shards, "--logs", str(tmp_path),
                          "--name", "typed", "--train-num-samples", "16", "--epochs", "1", "--batch-size", "4",
                          "--warmup", "1", "--workers", "0", "--device", "cpu", "--seed", "0"]  # None: upstream's
    result = clip.train.train(cfg)
    assert result.run_dir == tmp_path / "typed" and result.checkpoint == result.run_dir / "checkpoints" / "epoch_1.pt"
    assert torch.load(result.checkpoint, map_location="cpu", weights_only=True)["epoch"] == 1
