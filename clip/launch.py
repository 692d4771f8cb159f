"""Submit ``clip.train`` to Slurm through submitit; a preempted or timed-out job requeues and resumes.

    python -m clip.launch --nodes 4 --tasks-per-node 8 --gpus-per-node 8 --cpus-per-task 10 \\
        --partition learnlab --timeout-min 4320 -- \\
        --model RePa-ViT-B-16 --train-data '/data/laion400m/{00000..41455}.tar' ... --logs logs/ --name repa-b16

Launcher flags (``python -m clip.launch --help``) come before ``--``, ``clip.train``'s after it. Every
job runs with ``--resume latest``, so a requeued (or resubmitted) job continues from the newest
``<logs>/<name>/checkpoints/epoch_N.pt``; give a ``--name`` (one is made from the time if not).
``--cluster local`` runs the tasks as subprocesses here, ``--cluster debug`` in this process.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from repa_ssl.launch import flag_value, parse_launcher_args, submit

__all__ = ["main", "training_argv"]


def training_argv(argv: Sequence[str]) -> list[str]:
    """``clip.train`` flags as every (re)start of the job runs them: a fixed ``--name``, ``--resume latest``."""
    argv = list(argv)
    if flag_value(argv, "--name") is None:
        argv += ["--name", time.strftime("repa-clip-%Y_%m_%d-%H_%M_%S")]
    resume = flag_value(argv, "--resume")
    if resume is None:
        argv += ["--resume", "latest"]
    elif resume != "latest":
        raise SystemExit(f"clip.launch: --resume {resume} would restart from that checkpoint after every requeue; "
                         "start the run with clip.train, or use --pretrained for initial weights.")
    return argv


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, app_argv = parse_launcher_args("clip.launch", __doc__, "clip.train", sys.argv[1:] if argv is None else argv)
    app_argv = training_argv(app_argv)
    output_dir = Path(flag_value(app_argv, "--logs") or "./logs") / flag_value(app_argv, "--name")
    submit("clip.train", app_argv, args, output_dir)


if __name__ == "__main__":
    main()
