"""One distributed-init module reads torchrun's variables, which a submitit job's environment becomes."""
import pytest
import torch

from repa_ssl.distributed import detect_env, export_submitit_env, init_distributed

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; whatever a test (or the code under test) sets is removed afterwards."""
    for var in (*TORCHRUN, "SLURM_PROCID", "SLURM_NTASKS", "SUBMITIT_EXECUTOR", "SLURM_JOB_ID"):
        monkeypatch.setenv(var, "")  # recorded, so that monkeypatch removes it again at the end
        monkeypatch.delenv(var)
    return monkeypatch


def test_single_process_without_launcher(clean_env):
    env = init_distributed(device="cpu")
    assert (env.launcher, env.rank, env.world_size, env.distributed) == ("single", 0, 1, False)
    assert env.device == torch.device("cpu") and env.is_main


def test_torchrun_variables_win_over_slurm(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "1")
    assert detect_env() == ("torchrun", 1, 2, 1)


def test_a_slurm_task_of_a_submitit_job_reads_its_place_through_submitit(clean_env):
    slurm = dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="2",
                 SLURM_NODEID="1", SLURM_JOB_NODELIST="node[07-08]", SLURM_PROCID="3", SLURM_LOCALID="1")
    for var, value in slurm.items():
        clean_env.setenv(var, value)
    exported = export_submitit_env()  # what the launcher's job does first
    assert (exported["RANK"], exported["WORLD_SIZE"], exported["LOCAL_RANK"]) == ("3", "4", "1")
    assert exported["MASTER_ADDR"] == "node07"  # the job's first node, from submitit's node-list parsing
    assert export_submitit_env() == exported  # init_distributed exports again: the same, no error
    assert detect_env() == ("submitit", 3, 4, 1)


def test_slurm_tasks_started_without_a_launcher_are_refused(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "4")
    with pytest.raises(RuntimeError, match="one of 4 Slurm tasks, started without a launcher: each would train"):
        init_distributed(device="cpu")
