"""A CLIP start that fails can be run again as it was typed; a taken --name says how to continue it."""
import tarfile

import pytest

import clip.train
from clip_helpers import TRAIN_FLAGS, write_test_shards
from repa_ssl.data.shards import UnreadableShardsError


def test_a_failed_start_leaves_no_run_folder_and_a_taken_name_names_resume(tmp_path):
    shards = write_test_shards(tmp_path / "laion", n=8)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    run_dir = tmp_path / "logs" / "run"
    flags = TRAIN_FLAGS + ["--train-data", shards, "--train-num-samples", "8", "--logs", str(tmp_path / "logs"),
                           "--name", "run"]
    for _ in range(2):  # the same command again fails for the same reason, not "Experiment already exists"
        with pytest.raises(Exception):  # not a checkpoint
            clip.train.main(flags + ["--pretrained", str(tmp_path / "bad.pt")])
        assert not run_dir.exists()
    run_dir.mkdir()
    (run_dir / "out.log").write_text("a run was here\n")
    with pytest.raises(FileExistsError, match=f"{run_dir} already holds a run: add --resume latest"):
        clip.train.main(flags)


def test_a_run_that_failed_while_training_keeps_its_folder_and_log(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    tarfile.open(shards / "00000.tar", "w").close()  # an empty shard: the first epoch fails, after it started
    run_dir = tmp_path / "logs" / "run"
    with pytest.raises(UnreadableShardsError):
        clip.train.main(TRAIN_FLAGS + ["--train-data", f"{shards}/00000.tar", "--train-num-samples", "8",
                                       "--epochs", "1", "--logs", str(tmp_path / "logs"), "--name", "run"])
    assert "Start epoch 0" in (run_dir / "out.log").read_text()  # the log of a run that trained is never removed
