"""Submit a training application to Slurm (or run it locally) through submitit, requeueing on preemption.

The applications (``dino.train``, ``clip.train``) run from the source tree, so the job imports them by
module name after putting the checkout on ``sys.path``. Every task turns submitit's job environment into
torchrun's variables (``repa_ssl.distributed.export_submitit_env``), so each application initialises
``torch.distributed`` exactly as under torchrun. When Slurm preempts the job or its time limit comes
near (``--signal-delay-s`` before the end), submitit calls ``TrainingJob.checkpoint``, which resubmits
the same job; the application then resumes from the latest checkpoint in its output directory.

``add_executor_args`` adds the executor flags to an application launcher's parser; ``submit`` builds the
executor and submits.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import submitit
import torch

from .distributed import export_submitit_env

_logger = logging.getLogger(__name__)

__all__ = ["TrainingJob", "add_executor_args", "flag_value", "launcher_parser", "make_executor", "parse_launcher_args",
           "split_argv", "submit", "SOURCE_ROOT"]

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout that holds dino/ and clip/
CLUSTERS = ("slurm", "local", "debug")


class TrainingJob(submitit.helpers.Checkpointable):
    """``<module>.main(argv)`` in every task of a submitit job; resubmits itself when preempted.

    ``module`` is a constant chosen by the launcher (``dino.train``, ``clip.train``), never user input.
    The application must resume on its own from its output directory when started again with the
    same ``argv`` (DINO does; the CLIP launcher adds ``--resume latest``).
    """

    def __init__(self, module: str, argv: Sequence[str], source_root: str | Path = SOURCE_ROOT) -> None:
        self.module = module
        self.argv = list(argv)
        self.source_root = str(source_root)

    def __call__(self) -> Any:
        if self.source_root not in sys.path:
            sys.path.insert(0, self.source_root)
        export_submitit_env()
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: no more threads than CPUs given
            torch.set_num_threads(int(cpus))
        return importlib.import_module(self.module).main(self.argv)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or near the time limit: run the same job again (it resumes)."""
        _logger.info("requeueing %s: the next start resumes from the latest checkpoint", self.module)
        return submitit.helpers.DelayedSubmission(TrainingJob(self.module, self.argv, self.source_root))


def add_executor_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Executor flags (a group in ``parser``); everything after them goes to the application."""
    g = parser.add_argument_group("cluster (submitit)")
    g.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                   help="slurm: submit with sbatch (never falls back to anything else); local: subprocesses on "
                        "this machine; debug: in this process")
    g.add_argument("--job-dir", type=Path, default=None,
                   help="submitit's folder for the job's pickles and logs (default: <output dir>/submitit)")
    g.add_argument("--job-name", default=None)
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--tasks-per-node", type=int, default=1, help="processes per node (one per GPU)")
    g.add_argument("--gpus-per-node", type=int, default=0)
    g.add_argument("--cpus-per-task", type=int, default=10, help="also the data loader's workers budget")
    g.add_argument("--mem-gb", type=float, default=None, help="memory per node (default: the cluster's)")
    g.add_argument("--timeout-min", type=int, default=60 * 72, help="time limit of one job in minutes")
    g.add_argument("--signal-delay-s", type=int, default=120,
                   help="seconds before the time limit at which the job checkpoints and requeues itself")
    g.add_argument("--max-requeues", type=int, default=3, help="how many time-limit requeues are allowed")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None, help="e.g. 'volta32gb'")
    g.add_argument("--exclude", default=None, help="nodes to avoid")
    g.add_argument("--comment", default=None)
    g.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm-arg reservation=big (repeatable)")
    g.add_argument("--no-wait", dest="wait", action="store_false",
                   help="return after submitting instead of waiting for the job's result")
    return parser


def _extra_slurm_parameters(pairs: Sequence[str]) -> dict[str, str]:
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm-arg {pair!r} must look like KEY=VALUE (an sbatch option without '--').")
        extra[key.strip().lstrip("-").replace("-", "_")] = value
    return extra


def make_executor(args: argparse.Namespace, job_dir: Path) -> submitit.Executor:
    """An executor for ``args.cluster`` with the resources and pass-through options in ``args``.

    The cluster is always named: submitit's auto-detection would turn a Slurm launch on a machine
    without ``srun`` into local subprocesses. Building it needs no Slurm; submitting does.
    """
    extra = _extra_slurm_parameters(args.slurm_arg)  # malformed options fail before anything is made
    executor = submitit.AutoExecutor(folder=job_dir, cluster=args.cluster, slurm_max_num_timeout=args.max_requeues)
    params: dict[str, Any] = dict(
        nodes=args.nodes, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        timeout_min=args.timeout_min, name=args.job_name or "repa-ssl",
    )
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb is not None:
        params["mem_gb"] = args.mem_gb
    slurm = dict(slurm_signal_delay_s=args.signal_delay_s)
    for key in ("partition", "account", "qos", "constraint", "exclude", "comment"):
        if getattr(args, key):
            slurm[f"slurm_{key}"] = getattr(args, key)
    if extra:
        slurm["slurm_additional_parameters"] = extra
    if args.cluster == "slurm":
        params.update(slurm)
    executor.update_parameters(**params)
    return executor


def submit(module: str, app_argv: Sequence[str], args: argparse.Namespace, output_dir: Path) -> submitit.Job:
    """Submit ``module.main(app_argv)``; waits for the result unless ``--no-wait``. Returns the job."""
    job_dir = args.job_dir or Path(output_dir) / "submitit"
    executor = make_executor(args, job_dir)
    job = executor.submit(TrainingJob(module, app_argv))
    _logger.info("submitted %s as job %s (%s); logs in %s", module, job.job_id, args.cluster, job_dir)
    print(f"job {job.job_id}: logs in {job_dir}", flush=True)  # the launcher's one line of output, as sbatch's
    if args.wait:
        job.results()  # raises the job's exception, with its traceback, if a task failed
        _logger.info("job %s finished", job.job_id)
    return job


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``[launcher flags] -- [application flags]``; without ``--`` everything is the launcher's."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def launcher_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_executor_args(parser)


def parse_launcher_args(prog: str, description: str, app: str,
                        argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's flags (``--help`` prints them) and ``app``'s, which must follow ``--``.

    Exits with a usage error, before anything is submitted, when there is no application command or
    ``--cluster slurm`` is asked for on a machine without ``sbatch``.
    """
    parser = launcher_parser(prog, description)
    launcher_argv, app_argv = split_argv(argv)
    args, unknown = parser.parse_known_args(launcher_argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} ({app}'s flags go after `--`)")
    if not app_argv:
        parser.error(f"no {app} command: give its flags after `--`, e.g. {prog} [launcher flags] -- <{app} flags>")
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        parser.error("--cluster slurm (the default) needs Slurm's sbatch, which is not on PATH; use --cluster local "
                     "to run the tasks as subprocesses on this machine (or --cluster debug, in this process)")
    return args, app_argv


def flag_value(argv: Sequence[str], *names: str) -> Optional[str]:
    """The value of the last ``--flag value`` / ``--flag=value`` among ``names`` in ``argv`` (None if absent)."""
    value = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value
