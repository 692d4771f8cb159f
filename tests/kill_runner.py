"""Run an application and SIGKILL it at a chosen point, as ``kill -9`` (or a node failure) would.

    python tests/kill_runner.py step N -- dino.train <flags>   # killed as DINO iteration N starts
    python tests/kill_runner.py save N -- <module> <flags>     # killed half-way through writing checkpoint N

``save`` serialises the N-th ``torch.save`` in full, writes the first half of the bytes to its
destination (the temporary file of an atomic write, or the target itself for a plain save), then dies.
"""
from __future__ import annotations

import importlib
import io
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_save(n: int) -> None:
    real_save, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            out = f if hasattr(f, "write") else open(f, "wb")  # save_checkpoint passes an open file
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())
            die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def kill_at_step(n: int) -> None:
    from dino import train

    original = train.DINOStep.__call__

    def step(self, images, epoch, it):
        if it == n:
            die()
        return original(self, images, epoch, it)

    train.DINOStep.__call__ = step


if __name__ == "__main__":
    mode, n, sep, module, *argv = sys.argv[1:]
    assert sep == "--" and mode in ("step", "save"), __doc__
    torch.set_num_threads(2)  # as tests/conftest.py: the same thread count gives bit-identical CPU results
    (kill_at_step if mode == "step" else kill_in_save)(int(n))
    importlib.import_module(module).main(argv)
