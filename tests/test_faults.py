"""``kill -9`` during training and during a checkpoint write: the next start resumes from the last complete
checkpoint, never loads a truncated file, and (DINO, deterministic on CPU) ends with the uninterrupted weights."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino import train as dino_train
from repa_ssl.checkpoint import CheckpointError, load_checkpoint

import clip.train
from clip_helpers import TRAIN_FLAGS, write_test_shards
from dino_helpers import TINY, make_images

ROOT = Path(__file__).resolve().parents[1]
# 2 epochs of 4 iterations (batch 4 of 16 images), a checkpoint after every iteration.
DINO_FLAGS = TINY + ["--saveckp-iters", "1", "--saveckp-freq", "0", "--no-export"]


def killed(mode: str, n: int, module: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``module`` in a process that SIGKILLs itself at ``mode`` ``n`` (see kill_runner.py)."""
    cmd = [sys.executable, str(ROOT / "tests" / "kill_runner.py"), mode, str(n), "--", module, *argv]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"expected a SIGKILL, got {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def assert_same_weights(a: dict, b: dict) -> None:
    for key in ("student", "teacher"):
        for name, value in b[key].items():
            torch.testing.assert_close(a[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    dino_train.main(DINO_FLAGS + ["--data-path", str(images), "--output-dir", str(out)])
    return load_checkpoint(out / "checkpoint.pth")


def test_dino_killed_during_training_resumes_to_the_same_weights(images, uninterrupted, tmp_path, dino_iterations):
    flags = DINO_FLAGS + ["--data-path", str(images), "--output-dir", str(tmp_path)]
    killed("step", 5, "dino.train", flags)  # epoch 1, iteration 5 had started
    last = load_checkpoint(tmp_path / "checkpoint.pth")
    assert (last["epoch"], last["iteration"]) == (1, 5)
    dino_train.main(flags)
    assert dino_iterations == [5, 6, 7]  # resumed after the 5 checkpointed iterations, none trained twice
    final = load_checkpoint(tmp_path / "checkpoint.pth")
    assert (final["epoch"], final["iteration"]) == (2, 8)
    assert_same_weights(final, uninterrupted)


def test_dino_killed_while_writing_a_checkpoint_never_loads_the_torn_file(images, uninterrupted, tmp_path,
                                                                         dino_iterations):
    flags = DINO_FLAGS + ["--data-path", str(images), "--output-dir", str(tmp_path)]
    killed("save", 3, "dino.train", flags)  # half of the third checkpoint (after iteration 3) is on disk
    torn = list(tmp_path.glob(".checkpoint.pth.*.tmp"))
    assert len(torn) == 1
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(torn[0])
    assert load_checkpoint(tmp_path / "checkpoint.pth")["iteration"] == 2  # the last complete one
    dino_train.main(flags)
    assert dino_iterations == list(range(2, 8))  # resumed from it
    assert_same_weights(load_checkpoint(tmp_path / "checkpoint.pth"), uninterrupted)


def test_clip_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    shards = write_test_shards(tmp_path / "laion")
    flags = TRAIN_FLAGS + ["--train-data", shards, "--train-num-samples", "16", "--epochs", "2",
                           "--logs", str(tmp_path / "logs"), "--name", "tiny", "--resume", "latest"]
    killed("save", 2, "clip.train", flags)  # epoch_1.pt written, epoch_2.pt half-way
    checkpoints = tmp_path / "logs" / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == ["epoch_1.pt"]  # no torn epoch_2.pt
    assert clip.train.main(flags) is None
    log = (tmp_path / "logs" / "tiny" / "out.log").read_text()
    assert f"=> resuming checkpoint '{checkpoints / 'epoch_1.pt'}' (epoch 1)" in log
    assert load_checkpoint(checkpoints / "epoch_2.pt")["epoch"] == 2
