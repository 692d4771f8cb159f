"""DINO under torchrun with two CPU processes (gloo): same loss centre, teacher and synchronised BatchNorm
statistics on both ranks."""
from __future__ import annotations

import os
import subprocess
import sys

from repa_ssl.checkpoint import load_checkpoint

from dino_helpers import ROOT, TINY, epoch_log, make_images


def test_two_processes_with_gloo(tmp_path):
    images = make_images(tmp_path / "images")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dino.train", *TINY, "--epochs", "1", "--data-path", str(images), "--output-dir", str(out),
           "--use-bn-in-head"]  # a head BatchNorm1d besides the FFNs': synchronised on CPU too
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "each process normalises its own batch" not in proc.stderr  # every BatchNorm is synchronised

    (log,) = epoch_log(out)
    assert log["world_size"] == 2
    # Gathered from both ranks at the end of the epoch: the all-reduced centre, the EMA teacher and
    # the student's BatchNorm running statistics (updated by the last step with the global batch's
    # statistics, after DDP's broadcast of rank 0's) are bit-identical on the two processes.
    assert log["max_difference_across_ranks"] == {"center": 0.0, "teacher": 0.0, "student_batchnorm": 0.0}
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["iteration"] == 2  # 16 images / (4 per process x 2 processes)
    assert len(ckpt["rng"]) == 2  # each rank's RNG state, to resume exactly
    assert ckpt["dino_loss"]["center"].abs().sum() > 0
    assert (out / "teacher_fused.safetensors").is_file()
