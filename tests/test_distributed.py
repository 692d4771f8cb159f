"""One distributed-init module reads torchrun, Slurm or nothing."""
import torch

from repa_ssl.distributed import detect_env, init_distributed


def test_single_process_without_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed(device="cpu")
    assert (env.launcher, env.rank, env.world_size, env.distributed) == ("single", 0, 1, False)
    assert env.device == torch.device("cpu") and env.is_main


def test_torchrun_variables_win_over_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert detect_env() == ("slurm", 3, 4, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert detect_env() == ("torchrun", 1, 2, 1)
