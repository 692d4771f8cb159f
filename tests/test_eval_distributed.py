"""Under torchrun, every process's features are gathered back in dataset order (gloo, CPU)."""
import os
import subprocess
import sys

import torch

from eval_fixtures import dino_checkpoint, write_image_folder
from repa_ssl.eval import Features, knn


def test_two_process_knn_gathers_the_same_features_as_one_process(tmp_path):
    classes = ["ant", "bee", "cat"]
    write_image_folder(tmp_path / "data" / "train", classes, per_class=4)  # + 1 broken = 13 files: the sampler pads
    write_image_folder(tmp_path / "data" / "val", classes, per_class=2, seed=1)
    (tmp_path / "data" / "train" / "bee" / "broken.png").write_bytes(b"\x89PNG truncated")
    dino_checkpoint(tmp_path / "checkpoint.pth")
    common = [str(tmp_path / "checkpoint.pth"), "--data-path", str(tmp_path / "data"), "--num-workers", "0",
              "--batch-size", "3", "--nb-knn", "1", "3", "--throughput-repeats", "1", "--device", "cpu"]
    single = knn.main([*common, "--output-dir", str(tmp_path / "one"), "--save-features", str(tmp_path / "f1")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "repa_ssl.eval.knn", *common, "--output-dir", str(tmp_path / "two"),
           "--save-features", str(tmp_path / "f2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("train", "val"):
        one, two = Features.load(tmp_path / "f1" / f"{split}_features.pth"), Features.load(
            tmp_path / "f2" / f"{split}_features.pth")
        assert torch.equal(one.labels, two.labels) and one.num_skipped == two.num_skipped
        torch.testing.assert_close(one.features, two.features, rtol=1e-5, atol=1e-6)
    assert Features.load(tmp_path / "f2" / "train_features.pth").features.shape[0] == 12  # padding dropped
    assert single["num_skipped"] == 1
