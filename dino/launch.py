"""Submit ``dino.train`` to Slurm through submitit; a preempted or timed-out job requeues and resumes.

    python -m dino.launch --nodes 2 --tasks-per-node 8 --gpus-per-node 8 --cpus-per-task 10 \\
        --partition learnlab --timeout-min 2880 -- \\
        --arch repa_vit_small_patch16_224 --data-path /datasets/imagenet/train --output-dir runs/dino_s16

Launcher flags (``python -m dino.launch --help``) come before ``--``, ``dino.train``'s after it.
``dino.train`` resumes from ``<output-dir>/checkpoint.pth`` on every start, so a requeued job continues
where its last checkpoint left it (``--saveckp-iters`` checkpoints inside an epoch too).
``--cluster local`` runs the tasks as subprocesses here, ``--cluster debug`` in this process.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from repa_ssl.launch import flag_value, parse_launcher_args, submit

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, app_argv = parse_launcher_args("dino.launch", __doc__, "dino.train", sys.argv[1:] if argv is None else argv)
    output_dir = flag_value(app_argv, "--output-dir", "--output_dir")
    if output_dir is None:
        raise SystemExit("dino.launch: give dino.train an --output-dir: a requeued job resumes from it.")
    submit("dino.train", app_argv, args, Path(output_dir).resolve())


if __name__ == "__main__":
    main()
