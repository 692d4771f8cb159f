"""Shared test helpers: tiny models with non-trivial BatchNorm statistics."""
from __future__ import annotations

import logging
import shutil

import pytest
import timm
import torch
from torch import nn

import repa_ssl  # noqa: F401  (registers the models)

torch.set_num_threads(2)


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters (far from identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def tiny_vit(**kwargs) -> nn.Module:
    """The tiny test model (64 px, width 64, 2 blocks), with random BatchNorm statistics."""
    torch.manual_seed(0)
    model = timm.create_model("test_repa_vit", **kwargs)
    return randomize_batchnorms(model).eval()


FAST_KERNELS = ("ffn_column_blocks", "ffn_idle_as_matrix", "lean_train_ffn")


@pytest.fixture
def kernel_calls(monkeypatch) -> list[str]:
    """The fast channel-idle kernels each FFN call ran, by name (recorded when traced, under torch.compile)."""
    from repa_ssl.layers import channel_idle_kernels, channel_idle_mlp

    calls: list[str] = []
    for module, name in ((channel_idle_kernels, "ffn_column_blocks"), (channel_idle_kernels, "ffn_idle_as_matrix"),
                         (channel_idle_mlp, "lean_train_ffn")):
        kernel = getattr(module, name)

        def spy(*args, _kernel=kernel, _name=name):
            calls.append(_name)
            return _kernel(*args)

        monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _quiet_open_clip():
    # open_clip warns on every randomly initialised model; tests create many on purpose.
    logging.getLogger().setLevel(logging.ERROR)
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that starts Slurm must be in the Slurm tier, so that the default run changes nothing."""
    unmarked = [item.nodeid for item in items
                if "local_slurm" in item.fixturenames and not item.get_closest_marker("slurm")]
    if unmarked:
        raise pytest.UsageError(f"these tests use local_slurm but lack @pytest.mark.slurm: {', '.join(unmarked)}")


@pytest.fixture(scope="session")
def local_slurm():
    """A running single-node Slurm (scripts/local_slurm.sh; installs slurm-wlm and munge if needed).

    Only for tests marked ``slurm`` (the Slurm tier, ``./scripts/test.sh --slurm``). Needs root, as CI
    has. Stopped at the end of the session only if this session started it.
    """
    import os
    import subprocess
    from pathlib import Path

    if os.geteuid() != 0:
        pytest.skip("the Slurm tests need root: scripts/local_slurm.sh installs slurm-wlm and starts its daemons")
    script = Path(__file__).resolve().parents[1] / "scripts" / "local_slurm.sh"
    was_running = subprocess.run(["scontrol", "ping"], capture_output=True, text=True).returncode == 0 \
        if shutil.which("scontrol") else False
    proc = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"scripts/local_slurm.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    yield script
    if not was_running:
        subprocess.run([str(script), "stop"], capture_output=True, text=True, timeout=120)


@pytest.fixture
def dino_iterations(monkeypatch) -> list[int]:
    """The global iterations ``dino.train`` trains in this process, in order: a resumed run starts where it stopped.

    Final weights alone cannot tell a resume from a fresh start of a deterministic run.
    """
    from dino.train import DINOStep

    iterations: list[int] = []
    original = DINOStep.__call__

    def recording(self, images, epoch: int, it: int) -> float:
        iterations.append(it)
        return original(self, images, epoch, it)

    monkeypatch.setattr(DINOStep, "__call__", recording)
    return iterations
