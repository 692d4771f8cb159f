"""Train CLIP with a RePa image tower: ``open_clip_train`` with our models registered and its fixes applied.

    # one process (GPU, or CPU for a smoke test)
    python -m clip.train --model RePa-ViT-B-16 --train-data '/data/laion400m/{00000..41455}.tar' \\
        --train-num-samples 400000000 --dataset-resampled --batch-size 256 --epochs 32 --warmup 2000 \\
        --lr 5e-4 --wd 0.2 --precision amp --workers 8 --save-most-recent --logs logs/ --name repa-b16
    # several GPUs or nodes (note the ``--``: it keeps torchrun from reading ``--logs`` as its own flag)
    torchrun --nproc_per_node 8 -m clip.train -- --model RePa-ViT-B-16 ...

Every ``open_clip_train`` flag works as upstream (``python -m clip.train --help`` lists them). Ours are
``--no-bn-sync``, ``--init-from`` and the depth reparameterization's ``--depth-branches K``, ``--join-fraction``,
``--join-schedule``: the image tower trains K parallel branches per group of K blocks
(``repa_ssl.branch_model``, after ``--init-from`` loaded a trained deep CLIP), its join s falling from 1 to 0
over that share of the run (``repa_ssl.join_schedule``, set before every step through
``clip.patches.training_hooks``); ``clip.export --depth-branches K`` writes the merged fused CLIP. Before
handing over we import ``repa_ssl`` (registers the timm towers and the
``RePa-ViT-*`` configs in this process), install ``clip.patches`` (the 3.3.0 fixes) and apply the
BatchNorm policy: a RePa tower normalises with BatchNorm, so when several processes (GPUs or CPUs)
train it gets ``--use-bn-sync`` unless ``--no-bn-sync`` is given, with a note in the log. ``main(argv)``
can be called in-process (e.g. by a Slurm/submitit launcher); from Python, ``train(CLIPTrainConfig(...))``
runs the same and returns a ``CLIPTrainResult``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import open_clip
import open_clip_train.main as train_main
from open_clip_train.distributed import is_using_distributed, is_using_horovod
from open_clip_train.params import parse_args

import repa_ssl  # also registers the RePa timm models and OpenCLIP configs
from repa_ssl.checkpoint import atomic_write, load_checkpoint, unwrap_state_dict
from repa_ssl.data import expand_shards
from repa_ssl.join_schedule import JoinSchedule, add_join_arguments, check_same_join

from . import patches

_logger = logging.getLogger(__name__)

NO_BN_SYNC = "--no-bn-sync"
JOIN_RECORD = "join_schedule.json"  # a depth-branch run's settings, in its run folder

__all__ = ["CLIPTrainConfig", "CLIPTrainResult", "main", "train", "is_repa_model", "batchnorm_sync_policy",
           "check_train_data", "check_run_folder", "depth_parser", "check_join_resumable"]


def is_repa_model(model_name: str) -> bool:
    """True when ``model_name``'s image tower is a train-form RePa ViT (it has BatchNorms)."""
    cfg = open_clip.get_model_config(model_name) or {}
    tower = repa_ssl.find_repa_name(cfg.get("vision_cfg", {}).get("timm_model_name") or "")
    return tower is not None and not tower.fused


def batchnorm_sync_policy(argv: Sequence[str], distributed: Optional[bool] = None) -> tuple[list[str], list[str]]:
    """Return ``argv`` with ``--use-bn-sync`` added for a RePa tower trained by several processes, and notes to log.

    ``distributed`` defaults to what the launcher environment says. ``--use-bn-sync`` converts with
    ``repa_ssl.convert_sync_batchnorm`` (``clip.patches.fix_sync_batchnorm``), so GPUs and CPUs alike sync.
    """
    argv = list(argv)
    opt_out = NO_BN_SYNC in argv
    argv = [a for a in argv if a != NO_BN_SYNC]
    args = parse_args(argv)
    if distributed is None:
        distributed = is_using_distributed() or args.horovod or is_using_horovod()
    if not distributed or not is_repa_model(args.model) or args.use_bn_sync:
        return argv, []
    if opt_out:
        return argv, [f"SyncBatchNorm is off ({NO_BN_SYNC}): each process normalises its own batch."]
    return argv + ["--use-bn-sync"], [
        f"SyncBatchNorm is on for the RePa image tower ({args.model}): its BatchNorms normalise over "
        f"the global batch; pass {NO_BN_SYNC} to turn it off."]


def check_train_data(train_data: Optional[str]) -> None:
    """Stop before any training, naming the path and the fix, when ``--train-data`` cannot be read.

    Upstream fails late and obscurely here (an assertion about shard counts, or an empty epoch).
    Checks local webdataset specs only: CSV files and remote URLs are left to upstream.
    """
    if train_data is None:
        return
    if not train_data.strip():
        raise ValueError("--train-data is empty: give the shards, e.g. '/data/laion400m/{00000..41455}.tar'.")
    if Path(train_data).is_dir():
        raise ValueError(f"--train-data {train_data} is a folder: give its shards as a brace pattern, e.g. "
                         f"'{train_data.rstrip('/')}/{{00000..00099}}.tar' (or a::b for several sources).")
    if ".tar" in train_data:
        # names the first shard that does not exist; pipe:/URL specs typed here are upstream's own interface
        expand_shards(train_data, allow_remote=True)


def check_run_folder(logs: str, name: Optional[str], resume: Optional[str]) -> None:
    """Refuse to start a new run where one is, naming ``--resume latest``.

    Upstream prints ``Experiment already exists. Use --name {} ...`` (with a literal ``{}``) and
    returns -1, leaving the user to guess that ``--resume latest`` continues the run.
    """
    run_dir = Path(logs) / name if name else None
    if run_dir is None or resume == "latest" or not ((run_dir / "out.log").exists() or any(run_dir.glob("out-*"))):
        return
    raise FileExistsError(f"{run_dir} already holds a run: add --resume latest to continue it from its last "
                          "checkpoint, or give a new --name.")


def depth_parser() -> argparse.ArgumentParser:
    """Our flags for depth branches and initial weights; the rest of the command line is upstream's."""
    p = argparse.ArgumentParser("python -m clip.train", add_help=False, allow_abbrev=False)
    g = p.add_argument_group("depth reparameterization and initial weights (clip.train's own)")
    g.add_argument("--init-from", help="start from this open_clip_train checkpoint (epoch_N.pt) or CLIP state dict "
                                       "of --model, loaded strictly before the branches are made")
    add_join_arguments(g)
    return p


def _join_settings(opts: argparse.Namespace, epochs: int) -> dict[str, Any]:
    return dict(depth_branches=opts.depth_branches, join_fraction=opts.join_fraction,
                join_schedule=opts.join_schedule, epochs=epochs)


def _resumes(args: argparse.Namespace) -> bool:
    """Whether upstream will load a checkpoint: ``--resume PATH``, or ``latest`` in a run folder that has one."""
    if args.resume == "latest":
        return bool(args.name) and any((Path(args.logs) / args.name / "checkpoints").glob("epoch_*.pt"))
    return args.resume is not None


def check_join_resumable(opts: argparse.Namespace, args: argparse.Namespace) -> None:
    """Refuse ``--resume latest`` of a run trained under other depth-branch settings (``JOIN_RECORD``).

    A run folder whose checkpoints have no record was trained without branches.
    """
    if args.resume != "latest" or not _resumes(args):
        return
    run_dir = Path(args.logs) / args.name
    record = run_dir / JOIN_RECORD
    saved = json.loads(record.read_text()) if record.is_file() else {}
    check_same_join(saved, _join_settings(opts, args.epochs), str(run_dir), "give a new --name")


def _load_init(model: Any, path: str, model_name: str) -> None:
    """``--init-from``: the weights of ``path`` into the CLIP ``model_name``, strictly."""
    try:
        model.load_state_dict(unwrap_state_dict(load_checkpoint(path)), strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"--init-from {path} does not fit --model {model_name} ({lines[-1] if lines else e}): give "
                         "the --model it was trained as (params.txt in its run folder).") from None
    _logger.info("initialised from %s", path)


@contextmanager
def depth_branch_run(opts: argparse.Namespace, args: argparse.Namespace, log_files: list[str]) -> Iterator[None]:
    """While upstream runs: ``--init-from`` and ``--depth-branches`` on the model it builds, the join at each step.

    The run's settings go to ``JOIN_RECORD`` in its run folder (rank 0), for ``check_join_resumable``.
    """
    branches = opts.depth_branches
    if branches > 1 and args.skip_scheduler:
        raise ValueError("--depth-branches needs upstream's per-step scheduler call, which --skip-scheduler turns off: "
                         "drop --skip-scheduler.")
    if branches == 1 and not opts.init_from:
        yield
        return

    resumes = _resumes(args)

    def on_model(model: Any) -> None:
        if opts.init_from and not resumes:  # a resume has weights of its own
            _load_init(model, opts.init_from, args.model)
        if branches > 1:
            repa_ssl.branch_model(model, branches)  # the image tower; at s = 1 the same CLIP
            if log_files and log_files[0]:  # rank 0: upstream's log file is in the run folder
                with atomic_write(Path(log_files[0]).parent / JOIN_RECORD) as tmp:
                    tmp.write_text(json.dumps(_join_settings(opts, args.epochs)))

    def on_step(model: Any, step: int, total_steps: int) -> None:
        repa_ssl.set_branch_join(model, JoinSchedule(total_steps, opts.join_fraction, opts.join_schedule)(step))

    with patches.training_hooks(on_model, on_step if branches > 1 else None):
        yield


def _training_began(log_file: Path) -> bool:
    """True once upstream's log has its ``Start epoch N`` line (``open_clip_train.main``, before each epoch)."""
    try:
        with open(log_file, errors="replace") as f:
            return any("Start epoch" in line for line in f)
    except OSError:
        return False


def _remove_failed_start(log_file: Optional[str], existed: set[str]) -> None:
    """Remove the run folder a failed start made, so that the same command can be run again.

    Only a folder this run created, whose log never reached the first epoch and that holds nothing
    but upstream's start files (the log, ``params.txt``, empty folders) is removed: no checkpoint,
    no TensorBoard record, no log of a run that trained and failed before its first checkpoint.
    """
    if not log_file or Path(log_file).parent.name in existed or _training_began(Path(log_file)):
        return
    run_dir = Path(log_file).parent
    if all(p.name in (Path(log_file).name, "params.txt", JOIN_RECORD) for p in run_dir.rglob("*") if not p.is_dir()):
        shutil.rmtree(run_dir, ignore_errors=True)
        _logger.info("removed %s: the run failed before training began", run_dir)


def main(argv: Optional[Sequence[str]] = None) -> Optional[int]:
    """Run ``open_clip_train.main.main`` on ``argv`` (default: the command line) with RePa support.

    Returns upstream's result: ``None`` on success, ``-1`` when it refused to start. A start that
    fails leaves no run folder behind; a ``--name`` that holds a run is refused, naming ``--resume latest``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # a separator some launchers pass through (torchrun ... -m clip.train -- <flags>)
        argv = argv[1:]
    if "-h" in argv or "--help" in argv:
        print(__doc__)  # our additions; upstream's parser prints the rest and exits
        print(depth_parser().format_help())
    patches.apply()
    opts, argv = depth_parser().parse_known_args(argv)
    argv, notes = batchnorm_sync_policy(argv)
    args = parse_args(argv)
    check_train_data(args.train_data)
    check_run_folder(args.logs, args.name, args.resume)
    check_join_resumable(opts, args)
    existed = {p.name for p in Path(args.logs).iterdir()} if Path(args.logs).is_dir() else set()
    log_files: list[str] = []
    with patches.upstream_logging(notes, log_files), depth_branch_run(opts, args, log_files):
        try:
            return train_main.main(argv)
        except BaseException:
            _remove_failed_start(log_files[0] if log_files else None, existed)
            raise



@dataclass
class CLIPTrainConfig:
    """The ``open_clip_train`` flags a caller sets most, typed; ``None`` keeps upstream's default.

    Fields are upstream's flags (``batch_size`` is ``--batch-size``), then ours (``depth_parser``); ``extra``
    holds any other flags as upstream spells them, e.g. ``("--dataset-resampled", "--save-most-recent")``.
    """

    model: str
    train_data: str
    logs: str | Path
    name: str
    train_num_samples: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    wd: Optional[float] = None
    warmup: Optional[int] = None
    workers: Optional[int] = None
    device: Optional[str] = None
    precision: Optional[str] = None
    seed: Optional[int] = None
    resume: Optional[str] = None
    init_from: Optional[str] = None  # clip.train's own flags from here on (depth_parser)
    depth_branches: Optional[int] = None
    join_fraction: Optional[float] = None
    join_schedule: Optional[str] = None
    extra: Sequence[str] = ()

    def argv(self) -> list[str]:
        """The command line ``python -m clip.train`` would be given for this config."""
        argv = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "extra" and value is not None:
                argv += [f"--{field.name.replace('_', '-')}", str(value)]
        return argv + list(self.extra)


@dataclass
class CLIPTrainResult:
    """Where a finished ``clip.train`` run left its files."""

    config: CLIPTrainConfig
    run_dir: Path
    checkpoint: Path  # the newest checkpoints/epoch_*.pt (epoch_latest.pt with --save-most-recent)


def train(cfg: CLIPTrainConfig) -> CLIPTrainResult:
    """Run (or, with ``resume="latest"``, resume) ``clip.train`` for ``cfg``; raises if upstream refused to start."""
    run_dir = Path(cfg.logs) / cfg.name
    if main(cfg.argv()) == -1:
        raise RuntimeError(f"clip.train refused to start (see {run_dir / 'out.log'})")
    checkpoints = run_dir / "checkpoints"
    latest = checkpoints / "epoch_latest.pt"
    if not latest.is_file():
        numbered = [p for p in checkpoints.glob("epoch_*.pt") if re.fullmatch(r"epoch_\d+\.pt", p.name)]
        if not numbered:
            raise FileNotFoundError(f"clip.train finished without a checkpoint in {checkpoints}")
        latest = max(numbered, key=lambda p: int(p.stem.split("_")[1]))
    return CLIPTrainResult(config=cfg, run_dir=run_dir, checkpoint=latest)


if __name__ == "__main__":
    sys.exit(1 if main() == -1 else 0)
