"""DINO and CLIP jobs on a real Slurm (scripts/local_slurm.sh) through the project's launchers.

Two tasks of one CPU each (gloo), submitted with ``python -m dino.launch`` / ``python -m clip.launch``
as a user would. A DINO job preempted with SIGUSR2 (what Slurm sends before a time limit or
preemption) is requeued by submitit through ``TrainingJob.checkpoint`` and must end with exactly the
weights of the uninterrupted job. A CLIP job requeued with ``scontrol requeue`` (no hook involved)
resumes from its last epoch checkpoint.

The Slurm tier (``./scripts/test.sh --slurm``, as root): it changes the machine, so the default run
leaves it out.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repa_ssl.checkpoint import load_checkpoint

from clip_helpers import TRAIN_FLAGS, write_test_shards
from dino_helpers import TINY, epoch_log, make_images

# The Slurm tier (./scripts/test.sh --slurm): the first test also installs and starts Slurm.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["--tasks-per-node", "2", "--cpus-per-task", "1", "--timeout-min", "20"]
EPOCHS = 4
# 4 epochs of 4 iterations (32 images), a checkpoint after every iteration: a window for the preemption.
DINO_FLAGS = TINY + ["--epochs", str(EPOCHS), "--saveckp-iters", "1", "--saveckp-freq", "0"]


def launch(app: str, launcher_flags: list[str], app_flags: list[str], timeout: float = 240) -> str:
    """Run ``python -m <app>.launch``; returns its stdout (which names the job)."""
    cmd = [sys.executable, "-m", f"{app}.launch", *launcher_flags, *TASKS, "--", *app_flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def job_id(stdout: str) -> str:
    return re.search(r"^job (\d+):", stdout, re.M).group(1)


def job_state(job: str) -> str:
    """PENDING, RUNNING, ... or '' once the job has left the queue."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip()


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)  # polling the job's state


def job_logs(job_dir: Path, job: str) -> str:
    return "".join(p.read_text() for p in sorted(job_dir.glob(f"{job}_*_log.*")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"), n_per_class=16)


@pytest.fixture(scope="module")
def dino_run(local_slurm, images, tmp_path_factory):
    """An uninterrupted two-task DINO job."""
    out = tmp_path_factory.mktemp("dino")
    launch("dino", [], DINO_FLAGS + ["--data-path", str(images), "--output-dir", str(out)])
    return out


def test_dino_job_with_two_tasks(dino_run):
    log = epoch_log(dino_run)
    assert [e["epoch"] for e in log] == list(range(EPOCHS))
    assert all(e["world_size"] == 2 and e["max_difference_across_ranks"]["teacher"] == 0 for e in log)
    assert all(math.isfinite(e["loss"]) and e["skipped_images"] == 0 for e in log)
    assert (dino_run / "teacher_fused.safetensors").is_file()
    logs = job_logs(dino_run / "submitit", "*")
    assert "global_rank=1(2)" in logs  # the second Slurm task ran


def test_clip_job_with_two_tasks(local_slurm, tmp_path):
    shards = write_test_shards(tmp_path / "laion")
    launch("clip", [], TRAIN_FLAGS + ["--workers", "1", "--train-data", shards, "--train-num-samples", "16",
                                      "--epochs", "1", "--logs", str(tmp_path / "logs"), "--name", "tiny"])
    run = tmp_path / "logs" / "tiny"
    log = (run / "out.log").read_text()
    assert "Running in distributed mode with multiple processes. Device: cpu" in log and "total 2" in log
    assert re.search(r"Train Epoch: 0 skipped samples: [1-9]\d* corrupt images, [1-9]\d* without caption", log)
    checkpoint = load_checkpoint(run / "checkpoints" / "epoch_1.pt")
    assert checkpoint["epoch"] == 1 and all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values()
                                            if v.is_floating_point())


def test_preempted_dino_job_is_requeued_and_ends_like_the_uninterrupted_one(dino_run, images, tmp_path):
    out = tmp_path / "dino"
    stdout = launch("dino", ["--no-wait"], DINO_FLAGS + ["--data-path", str(images), "--output-dir", str(out)])
    job = job_id(stdout)
    checkpoint = out / "checkpoint.pth"
    wait_until(lambda: checkpoint.is_file() or not job_state(job), 120, "the first checkpoint")
    assert checkpoint.is_file(), "the job ended without writing a checkpoint"
    # What Slurm sends --signal-delay-s before a time limit, or when preempting: submitit calls
    # TrainingJob.checkpoint and requeues the job.
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_until(lambda: job_state(job) in ("PENDING", ""), 60, "the requeue")
    assert job_state(job) == "PENDING", "the job finished before the preemption signal reached it"
    # A requeued job may start again only after Slurm's credential lifetime (120 s); release it now.
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    wait_until(lambda: not job_state(job), 180, "the requeued job to finish")

    logs = job_logs(out / "submitit", job)
    assert "Caught signal SIGUSR2" in logs and "this job is preempted" in logs and f"Requeued job {job}" in logs
    assert re.search(r"resumed from .*checkpoint.pth: epoch \d, iteration [1-9]", logs)
    resumed, full = load_checkpoint(checkpoint), load_checkpoint(dino_run / "checkpoint.pth")
    assert resumed["epoch"] == full["epoch"] == EPOCHS
    for key in ("student", "teacher"):
        for name, value in full[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
    torch.testing.assert_close(resumed["dino_loss"]["center"], full["dino_loss"]["center"], rtol=0, atol=0)


def test_clip_job_requeued_by_hand_resumes_from_its_last_epoch(local_slurm, tmp_path):
    shards = write_test_shards(tmp_path / "laion")
    stdout = launch("clip", ["--no-wait"], TRAIN_FLAGS + [
        "--workers", "1", "--train-data", shards, "--train-num-samples", "16", "--epochs", "4",
        "--logs", str(tmp_path / "logs"), "--name", "tiny"])
    job, checkpoints = job_id(stdout), tmp_path / "logs" / "tiny" / "checkpoints"
    wait_until(lambda: (checkpoints / "epoch_1.pt").is_file() or not job_state(job), 120, "epoch_1.pt")
    subprocess.run(["scontrol", "requeue", job], check=True)  # an admin, or a node failure, sends it back
    wait_until(lambda: job_state(job) in ("PENDING", ""), 60, "the requeue")
    assert job_state(job) == "PENDING", "the job finished before it was requeued"
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    wait_until(lambda: not job_state(job), 180, "the requeued job to finish")
    log = (tmp_path / "logs" / "tiny" / "out.log").read_text()
    assert re.search(r"=> resuming checkpoint '.*epoch_[123]\.pt' \(epoch [123]\)", log)
    assert load_checkpoint(checkpoints / "epoch_4.pt")["epoch"] == 4
