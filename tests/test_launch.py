"""The submitit layer without a cluster: sbatch options, the requeue hook, the launchers' argv handling."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import submitit

import clip.launch
import dino.launch
from clip.launch import training_argv
from clip_helpers import write_digit_images
from repa_ssl.distributed import export_submitit_env
from repa_ssl.launch import TrainingJob, flag_value, launcher_parser, make_executor, split_argv

LAUNCHERS = {"dino": dino.launch, "clip": clip.launch}


@pytest.fixture
def no_slurm(tmp_path, monkeypatch):
    """A PATH without Slurm's commands, whatever this machine has installed."""
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return tmp_path / "bin"


@pytest.fixture
def fake_slurm(no_slurm, tmp_path):
    """Stand-ins for Slurm's client commands: ``sbatch`` keeps the script it is given and prints a job id."""
    (no_slurm / "sbatch").write_text(f'#!/bin/sh\n{shutil.which("cp", path=os.defpath)} "$1" {tmp_path}/submitted.sh\n'
                                     'echo "Submitted batch job 4242"\n')
    (no_slurm / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit wants it on PATH to build a Slurm executor
    for command in ("sbatch", "srun"):
        (no_slurm / command).chmod(0o755)
    return tmp_path / "submitted.sh"


def sbatch_script(tmp_path, *flags: str) -> str:
    args = launcher_parser("test", "").parse_args(list(flags))
    executor = make_executor(args, tmp_path)
    return executor._executor._make_submission_file_text("python -m x", "%j")


def test_resources_and_pass_through_options_reach_sbatch(tmp_path, fake_slurm):  # whatever this machine has
    text = sbatch_script(tmp_path, "--nodes", "2", "--tasks-per-node", "8", "--gpus-per-node", "8",
                         "--cpus-per-task", "10", "--mem-gb", "480", "--timeout-min", "4320", "--partition", "learn",
                         "--account", "vision", "--qos", "high", "--constraint", "volta32gb",
                         "--slurm-arg", "reservation=big", "--signal-delay-s", "300")
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--mem=480GB",
                 "--time=4320", "--partition=learn", "--account=vision", "--qos=high", "--constraint=volta32gb",
                 "--reservation=big", "--signal=USR2@300"):
        assert f"#SBATCH {line}\n" in text, line


def test_malformed_slurm_arg_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sbatch_script(tmp_path, "--slurm-arg", "reservation")


def test_checkpoint_hook_resubmits_the_same_run():
    job = TrainingJob("dino.train", ["--output-dir", "runs/x"])
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    # what submitit writes for the requeued job: our own object, round-tripped
    again = pickle.loads(pickle.dumps(delayed)).function  # noqa: S301
    assert (again.module, again.argv, again.source_root) == (job.module, job.argv, job.source_root)


def test_outside_a_job_nothing_is_exported(monkeypatch):
    for var in ("SLURM_JOB_ID", "SUBMITIT_EXECUTOR", "SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_DEBUG_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    assert export_submitit_env() == {}


def test_debug_cluster_runs_the_application_in_process(tmp_path):
    images = write_digit_images(tmp_path / "images", 4)
    args = launcher_parser("test", "").parse_args(["--cluster", "debug"])
    app = TrainingJob("repa_ssl.data.write_shards", ["--images", str(images), "--output", str(tmp_path / "shards")])
    make_executor(args, tmp_path / "job").submit(app).result()
    assert (tmp_path / "shards" / "00000.tar").is_file()


@pytest.mark.parametrize("app", LAUNCHERS)
def test_launcher_help_prints_help_and_submits_nothing(app, monkeypatch, capsys):
    launcher = LAUNCHERS[app]
    monkeypatch.setattr(launcher, "submit", lambda *a, **k: pytest.fail("submitted a job"))
    with pytest.raises(SystemExit) as e:
        launcher.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {app}.launch") and "--cluster {slurm,local,debug}" in out
    with pytest.raises(SystemExit) as e:  # launcher flags but no application command
        launcher.main(["--cluster", "local", "--nodes", "1"])
    assert e.value.code == 2 and f"no {app}.train command: give its flags after `--`" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the application's flags without `--`
        launcher.main(["--cluster", "local", "--epochs", "3"])
    assert e.value.code == 2 and f"--epochs 3 ({app}.train's flags go after `--`)" in capsys.readouterr().err


@pytest.mark.parametrize("app", LAUNCHERS)
def test_cluster_slurm_without_sbatch_is_a_clear_error(app, no_slurm, tmp_path, monkeypatch, capsys):
    # submitit's auto-detection would run the "Slurm" job as local subprocesses instead.
    launcher = LAUNCHERS[app]
    monkeypatch.setattr(launcher, "submit", lambda *a, **k: pytest.fail("submitted a job"))
    with pytest.raises(SystemExit) as e:
        launcher.main(["--", "--output-dir", str(tmp_path / "run"), "--logs", str(tmp_path / "logs")])
    assert e.value.code == 2
    assert "needs Slurm's sbatch, which is not on PATH; use --cluster local" in capsys.readouterr().err


def test_cluster_slurm_submits_with_sbatch(fake_slurm, tmp_path, capsys):
    dino.launch.main(["--no-wait", "--nodes", "2", "--", "--output-dir", str(tmp_path / "run")])
    assert capsys.readouterr().out.startswith("job 4242: logs in ")
    script = fake_slurm.read_text()
    assert "#SBATCH --nodes=2\n" in script and "submitit.core._submit" in script


def test_argv_splitting_and_flag_values():
    assert split_argv(["--nodes", "2", "--", "--epochs", "3"]) == (["--nodes", "2"], ["--epochs", "3"])
    assert split_argv(["--nodes", "2"]) == (["--nodes", "2"], [])
    assert flag_value(["--logs", "a", "--logs=b"], "--logs") == "b"
    assert flag_value(["--output_dir", "o"], "--output-dir", "--output_dir") == "o"


def test_clip_jobs_always_resume_latest_under_a_fixed_name():
    argv = training_argv(["--model", "RePa-ViT-Test"])
    assert flag_value(argv, "--resume") == "latest" and flag_value(argv, "--name").startswith("repa-clip-")
    assert training_argv(["--name", "n", "--resume", "latest"]) == ["--name", "n", "--resume", "latest"]
    with pytest.raises(SystemExit, match="restart from that checkpoint after every requeue"):
        training_argv(["--name", "n", "--resume", "ckpt.pt"])


def test_local_slurm_node_gets_every_cpu_whatever_omp_num_threads():
    # nproc follows OMP_NUM_THREADS: a 1-CPU node would leave every 2-task job pending forever.
    script = Path(__file__).resolve().parents[1] / "scripts" / "local_slurm.sh"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_THREAD_LIMIT": "1"}
    conf = subprocess.run([str(script), "config"], env=env, capture_output=True, text=True, check=True).stdout
    assert f" CPUs={len(os.sched_getaffinity(0))} " in conf  # config only prints what `start` writes
