"""The project's one checkpoint module.

* Writes are atomic: a temporary file in the same directory, flushed and fsync'ed,
  then renamed over the target, so a crash never leaves a truncated checkpoint. A write that
  fails for lack of space says so and where; the temporary files of writes killed half-way are
  removed by the next write of the same file.
* Loading never executes code: ``torch.load(weights_only=True)`` only; a file that
  needs pickled callables is refused with a clear message.
* Fused towers are exported as safetensors plus a small JSON sidecar (model name,
  idle ratios, verification error) and load back without building the train form.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import clean_state_dict
from torch import nn

from .factory import stored_model_name
from .fusion import is_fused

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

__all__ = [
    "CheckpointError",
    "atomic_write",
    "save_checkpoint",
    "load_checkpoint",
    "load_torch_file",
    "save_fused_tower",
    "save_sidecar",
    "sidecar_source",
    "sidecar_source_path",
    "load_fused_tower",
    "unwrap_state_dict",
]


_OUT_OF_SPACE = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file would exceed this process's file size limit (`ulimit -f`)",
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, unsafe or of the wrong form."""


def _host() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def _temporary_prefix(path: Path) -> str:
    """``.<name>.<host>-<pid>.``: whose write a temporary file of ``path`` is (``mkstemp`` adds 8 characters)."""
    return f".{path.name}.{_host()}-{os.getpid()}."


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temporaries(path: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove the temporary files that killed writes of ``path`` left.

    A temporary is an orphan when the process that wrote it, on this host, is gone; one written on
    another host (a shared file system) when it is older than ``max_age_s``. A write in progress in
    another job is never touched.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.([^.]+)-(\d+)\.[a-z0-9_]{{8}}\.tmp")
    host = _host()
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = pattern.fullmatch(stale.name)
        if match is None:
            continue
        try:
            age = time.time() - stale.stat().st_mtime
        except FileNotFoundError:
            continue
        if (match[1] == host and not _process_exists(int(match[2]))) or age > max_age_s:
            _logger.info("removing %s, left by an interrupted write", stale)
            stale.unlink(missing_ok=True)


def _os_error(exc: BaseException) -> Optional[OSError]:
    """The ``OSError`` behind ``exc`` (torch reports a failed write as a ``RuntimeError`` caused by it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _write_error(path: Path, exc: BaseException) -> Optional[OSError]:
    """A clear ``OSError`` for a write of ``path`` that ran out of space, else ``None``.

    Called before the temporary file is removed, so the free space is what the write ran into.
    """
    cause = _os_error(exc)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return None
    reason = _OUT_OF_SPACE.get(cause.errno) if cause is not None else None
    if reason is None and free < 2 ** 20:
        reason = _OUT_OF_SPACE[errno.ENOSPC]
    if reason is None:
        return None
    return OSError(cause.errno if cause is not None else errno.ENOSPC,
                   f"cannot write {path}: {reason} ({path.parent} has {free / 2 ** 20:.1f} MiB free; "
                   f"{cause or exc}). Free some space or write elsewhere; the previous {path.name}, if any, "
                   "is untouched.")


def _umask() -> int:
    """The process umask, read without setting it (``os.umask`` sets it: a race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):  # no /proc (macOS) or a kernel before 4.7
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


@contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched; a write that
    ran out of space raises an ``OSError`` saying so. Temporaries of earlier, killed writes of
    ``path`` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 and some writers (safetensors) recreate the file: set the usual permissions last
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except Exception as e:
        error = _write_error(path, e)
        tmp_path.unlink(missing_ok=True)
        if error is not None:
            raise error from e
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def save_checkpoint(obj: Any, path: PathLike) -> Path:
    """Atomically ``torch.save`` ``obj`` (tensors and plain data only) to ``path``.

    Written through a Python file so that a failed write keeps its ``OSError`` (torch's own
    file writer reports only ``unexpected pos``).
    """
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    _logger.info("saved checkpoint %s", path)
    return path


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Any:
    """Load a checkpoint written by :func:`save_checkpoint` (or any plain-data torch file).

    Never executes code from the file: only ``weights_only=True`` loading is used.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (or the run's --output-dir).")
    if path.suffix == ".safetensors":
        return load_file(str(path), device=str(map_location))
    return load_torch_file(path, str(path), map_location)


def load_torch_file(source: Union[PathLike, BinaryIO], name: str,
                    map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load(source, weights_only=True)`` with clear errors; ``source`` is a path or an open file.

    For files :func:`load_checkpoint` cannot open by path, e.g. a remote (fsspec) checkpoint the user named.
    """
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {name}: it contains pickled Python objects beyond tensors and plain data "
            f"({_unpickling_reason(e)}). Loading it would run code from the file, so nothing was executed. "
            "If you trust the file, re-save its tensors as a plain state dict (or safetensors) first."
        ) from None
    except (RuntimeError, EOFError) as e:
        if isinstance(e, RuntimeError) and not _is_corrupt_archive(e):
            raise  # e.g. a CUDA tensor on a machine without GPU: torch's message says what to do
        raise CheckpointError(
            f"cannot read checkpoint {name}: it is truncated or corrupt ({e}). "
            "Use the previous checkpoint, or re-export it."
        ) from None


def _is_corrupt_archive(error: RuntimeError) -> bool:
    """Whether torch's zip reader failed on the file itself (cut short, overwritten), not on its contents."""
    return "PytorchStreamReader failed" in str(error)


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names what the file wanted to call (``GLOBAL posix.system``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line.removeprefix("WeightsUnpickler error: ") for line in lines if "GLOBAL" in line]
    return (named or lines or [type(error).__name__])[0].split(". Please use")[0].rstrip(".")


def unwrap_state_dict(checkpoint: Any, key: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Get the model state dict out of a checkpoint dict, without DDP's ``module.`` and torch.compile's
    ``_orig_mod.`` prefixes (``timm.models.clean_state_dict``)."""
    if key is not None:
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint has no entry {key!r}; it has {sorted(checkpoint)}")
        checkpoint = checkpoint[key]
    elif isinstance(checkpoint, dict):
        for candidate in ("state_dict", "model"):
            if candidate in checkpoint and isinstance(checkpoint[candidate], dict):
                checkpoint = checkpoint[candidate]
                break
    return clean_state_dict(checkpoint)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def sidecar_source(checkpoint: PathLike, export: PathLike) -> str:
    """How an export's sidecar names the checkpoint it was made from: its bare file name when the two
    share a folder (the only case :func:`sidecar_source_path` re-opens), else its absolute path."""
    checkpoint, export = Path(checkpoint).resolve(), Path(export).resolve()
    return checkpoint.name if checkpoint.parent == export.parent else str(checkpoint)


def sidecar_source_path(export: PathLike, recorded: Any) -> Optional[Path]:
    """The source checkpoint a sidecar names, if it is a file in the export's own folder, else ``None``.

    The name is read from a file, so it may only pick a file beside the export the user gave:
    never one in another folder (absolute, ``..``, sub-folders).
    """
    if not isinstance(recorded, str) or not recorded:
        return None
    folder = Path(export).resolve().parent
    candidate = Path(recorded) if Path(recorded).is_absolute() else folder / recorded
    if candidate.parent.resolve() != folder or candidate.name in ("", ".", ".."):
        _logger.info("not re-opening %s, named in the sidecar of %s: only a checkpoint in the export's folder is "
                     "re-checked", recorded, export)
        return None
    return candidate if candidate.is_file() else None


def save_sidecar(path: PathLike, metadata: dict[str, Any]) -> Path:
    """Atomically write ``metadata`` as the JSON sidecar of export ``path`` (same name, ``.json``)."""
    sidecar = _sidecar(Path(path))
    with atomic_write(sidecar) as tmp:
        tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return sidecar


def save_fused_tower(model: nn.Module, path: PathLike, metadata: dict[str, Any]) -> Path:
    """Export a fused model as ``path`` (safetensors) plus ``path.json`` (metadata).

    ``metadata`` must name the timm ``model_name`` (built with ``inference_mode=True`` to
    load) and should carry the idle ratios and the verification report.
    """
    if not is_fused(model):
        raise CheckpointError("save_fused_tower needs a fused model: call repa_ssl.fuse_model(model) first.")
    if "model_name" not in metadata:
        raise ValueError("metadata must include 'model_name' (the timm name of the tower)")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"fused towers are saved as .safetensors, got {path}")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    save_sidecar(path, metadata)
    _logger.info("exported fused tower %s (+ %s)", path, _sidecar(path).name)
    return path


def load_fused_tower(path: PathLike, **model_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Build the fused timm model named in ``path.json`` (merged when it has ``depth_branches``) and load ``path``
    into it (strict)."""
    path = Path(path)
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        raise CheckpointError(f"{sidecar} is missing: it names the model to build for {path}.")
    metadata = json.loads(sidecar.read_text())
    name = stored_model_name(metadata.get("model_name"), str(sidecar), "timm")
    kwargs = dict(num_classes=metadata.get("num_classes", 0), inference_mode=True)
    if "idle_ratios" in metadata:
        kwargs["idle_ratio"] = list(metadata["idle_ratios"])
    if int(metadata.get("depth_branches", 1)) > 1:  # merged: depth / K wide blocks
        kwargs["depth_branches"] = int(metadata["depth_branches"])
    kwargs.update(model_kwargs)
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(load_checkpoint(path), strict=True)
    return model.eval(), metadata
