"""A CLIP start that fails can be run again as it was typed; a taken --name says how to continue it."""
import pytest

import clip.train
from clip_helpers import TRAIN_FLAGS, write_test_shards


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
