"""Fixes for ``open_clip_train`` 3.3.0 as installed with our pinned dependencies, one function each.

``apply()`` installs all of them (idempotent) and warns under another open_clip_torch release;
``python -m clip.train`` calls it before handing the command line to ``open_clip_train.main.main``,
which it runs inside ``upstream_logging`` (the one fix that lasts only for that call).
Each fix replaces one name that upstream looks up at call time, only where upstream looks it up
(``torch.save`` as ``open_clip_train.main`` sees it, not torch's own), keeps the original as
``__wrapped__`` and says in its docstring what breaks upstream and why the replacement is right.
Nothing here changes upstream behaviour beyond the fix. A name upstream binds as a default argument
(``def tarfile_to_samples_nothrow(src, handler=log_and_continue)``) keeps the original there, so
that caller is given the replacement explicitly; the tests check that each replaced name is what
upstream's data pipeline calls.

The undeclared imports (pandas, fsspec, braceexpand: upstream lists them only under its ``training``
extra, whose ``webdataset<=0.2.86`` pin conflicts with ours) are fixed by declaring them in
``pyproject.toml``; ``tests/test_clip_patches.py`` checks that every module ``open_clip_train``
imports is provided by a declared dependency.
"""
from __future__ import annotations

import functools
import importlib.metadata
import logging
import multiprocessing
import os
import random
import types
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import webdataset as wds
from torch import nn
from torchvision.datasets import ImageFolder
from webdataset.filters import _shuffle  # upstream's own detshuffle2 shuffles with it

from repa_ssl.checkpoint import load_checkpoint, load_torch_file, save_checkpoint
from repa_ssl.data.shards import IMAGE_KEYS
from repa_ssl.seeding import epoch_seed
from repa_ssl.sync_batchnorm import convert_sync_batchnorm

_logger = logging.getLogger(__name__)

__all__ = ["apply", "SkipCounter", "skip_counter", "UPSTREAM_VERSION", "training_hooks", "upstream_logging"]

_PATCHED = "_repa_ssl_fix"

# The open_clip_torch release whose open_clip_train these fixes are written for and tested against
# (pinned in pyproject.toml); under another one a fix may be unneeded or no longer fit.
UPSTREAM_VERSION = "3.3.0"


def _replace(module: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    """Set ``module.name = make(original)`` unless this fix is already installed there.

    Several fixes may wrap one name (``train_one_epoch``): each is known by its ``make`` (its qualified name is
    the fix's), looked for along the chain of ``__wrapped__``.
    """
    original, fix = getattr(module, name), make.__qualname__
    wrapped = original
    while wrapped is not None:
        if getattr(wrapped, _PATCHED, None) == fix:
            return
        wrapped = getattr(wrapped, "__wrapped__", None)
    replacement = make(original)
    replacement.__wrapped__ = original
    setattr(replacement, _PATCHED, fix)
    setattr(module, name, replacement)


class _ModuleView(types.ModuleType):
    """``module`` as an upstream module sees it: names set on the view hide the module's own."""

    def __init__(self, module: types.ModuleType) -> None:
        super().__init__(module.__name__)
        self.__wrapped__ = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__wrapped__, name)


def _replace_seen(module: types.ModuleType, dotted: str, value: Any) -> None:
    """Let ``module`` alone see ``dotted`` (e.g. ``torch.nn.parallel.X``) as ``value``.

    Each module on the way becomes a :class:`_ModuleView` where its parent names it, so the real
    modules, and every other importer of them, stay untouched; several fixes can replace names under
    the same view (idempotent).
    """
    *path, name = dotted.split(".")
    for part in path:
        child = getattr(module, part)
        if not isinstance(child, _ModuleView):
            child = _ModuleView(child)
            setattr(module, part, child)
        module = child
    setattr(module, name, value)


# --- webdataset >= 0.2.87: end-of-shard record -----------------------------------------------------

def fix_webdataset_end_of_shard() -> None:
    """Skip the end-of-shard marker that webdataset >= 0.2.87 puts into the record stream.

    Upstream: ``tar_file_expander`` (webdataset 1.0.2) yields ``{}`` after each shard;
    ``open_clip_train.data.group_by_keys_nothrow`` reads ``filesample["fname"]`` and the first epoch
    dies with ``KeyError: 'fname'``. open_clip_torch itself pins ``webdataset<=0.2.86`` (in its
    ``training`` extra), whose expander yields only file records. Dropping the marker gives upstream
    exactly the stream it was written for; its grouping already splits samples at key changes
    (img2dataset keys carry the shard number, so samples never straddle shards).
    """
    import open_clip_train.data as data

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def group_by_keys_nothrow(records: Iterable[dict], *args: Any, **kwargs: Any) -> Iterator[dict]:
            return original((r for r in records if "fname" in r), *args, **kwargs)
        return group_by_keys_nothrow

    _replace(data, "group_by_keys_nothrow", make)


# --- several processes on CPU: DDP gets device_ids ---------------------------------------------------

class CpuDistributedDataParallel(nn.parallel.DistributedDataParallel):
    """DDP that ignores ``device_ids``/``output_device`` for CPU modules (they are GPU-only)."""

    def __init__(self, module: nn.Module, device_ids: Any = None, output_device: Any = None, **kwargs: Any):
        params = list(module.parameters())
        if params and all(p.device.type == "cpu" for p in params) and (device_ids or output_device is not None):
            _logger.debug("DDP of a CPU model: dropping device_ids=%s (GPU-only)", device_ids)
            device_ids, output_device = None, None
        super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)


def fix_cpu_distributed() -> None:
    """Let several CPU processes (gloo) train: DDP must not get ``device_ids`` for a CPU model.

    Upstream: ``open_clip_train.main`` always calls ``DistributedDataParallel(model, device_ids=[device])``;
    for a CPU model torch raises ``ValueError`` ("device_ids ... only work with ... GPU modules"). The
    fix drops the argument for CPU modules only, which is what DDP expects there; GPU runs are
    untouched. ``main`` reaches DDP as ``torch.nn.parallel.DistributedDataParallel``; the subclass is
    what that name is for ``main`` only (``isinstance`` checks against DDP still hold), torch's own
    DDP stays as it is for every other module.
    """
    import open_clip_train.main as train_main

    _replace_seen(train_main, "torch.nn.parallel.DistributedDataParallel", CpuDistributedDataParallel)


# --- --use-bn-sync: the RePa tower's synchronised BatchNorm ------------------------------------------------

class RepaSyncBatchNorm(nn.SyncBatchNorm):
    """torch's ``SyncBatchNorm`` whose ``convert_sync_batchnorm`` is ``repa_ssl.convert_sync_batchnorm``."""

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        return convert_sync_batchnorm(module, process_group)


def fix_sync_batchnorm() -> None:
    """``--use-bn-sync`` synchronises a RePa tower's BatchNorms without losing its fast FFN paths, on CPU too.

    Upstream: ``open_clip_train.main`` calls ``torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)``, which
    turns the channel-idle FFNs' BatchNorm1d into torch's ``SyncBatchNorm``: it runs only on GPUs (several
    CPU processes crash in its forward) and switches the FFNs' fast training paths off (the concatenating
    form, about 1.3x a vanilla step). ``main`` now sees a ``torch.nn.SyncBatchNorm`` whose conversion is
    ``repa_ssl.convert_sync_batchnorm``: the FFNs get synchronised BatchNorms that keep the fast paths and
    run on gloo and nccl, every other BatchNorm on a GPU becomes torch's ``SyncBatchNorm`` as before.
    torch's class stays as it is for every other module.
    """
    import open_clip_train.main as train_main

    _replace_seen(train_main, "torch.nn.SyncBatchNorm", RepaSyncBatchNorm)


# --- zero-shot accuracy under numpy 2 ------------------------------------------------------------------

def fix_zero_shot_accuracy_numpy2() -> None:
    """Count correct top-k predictions with ``.item()`` instead of ``float(<1-element array>)``.

    Upstream: ``open_clip_train.zero_shot.accuracy`` calls ``float()`` on a shape-(1,) numpy array,
    which numpy >= 2 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so
    every ImageNet zero-shot evaluation crashes. Same return value: a list of float counts.
    """
    import open_clip_train.zero_shot as zero_shot

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
            pred = output.topk(max(topk), 1, True, True)[1].t()
            correct = pred.eq(target.view(1, -1).expand_as(pred))
            return [correct[:k].reshape(-1).float().sum().item() for k in topk]
        return accuracy

    _replace(zero_shot, "accuracy", make)


# --- locked image tower: BatchNorm1d statistics --------------------------------------------------------

class FrozenBatchNorm1d(nn.Module):
    """A BatchNorm1d fixed in eval mode: running statistics and affine parameters are buffers.

    ``FrozenBatchNorm2d`` (what upstream freezes 2-d BatchNorms into) for ``(N, C)`` and ``(N, C, L)``
    inputs. It is no ``_BatchNorm``, so ``--use-bn-sync`` (converted after locking) leaves it frozen,
    and its state dict has BatchNorm1d's keys, so a locked run's checkpoints load into (and fuse as)
    the train-form model.
    """

    def __init__(self, bn: nn.BatchNorm1d) -> None:
        super().__init__()
        self.num_features, self.eps = bn.num_features, bn.eps
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            value = getattr(bn, name)
            self.register_buffer(name, None if value is None else value.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _freeze_batch_norm_1d(module: nn.Module, module_match: Any, name: str) -> nn.Module:
    """Upstream's walk and name matching, for BatchNorm1d (with running statistics) instead of 2d."""
    if isinstance(module, nn.BatchNorm1d) and module.track_running_stats and (not module_match or name in module_match):
        return FrozenBatchNorm1d(module)
    for child_name, child in module.named_children():
        frozen = _freeze_batch_norm_1d(child, module_match, f"{name}.{child_name}" if name else child_name)
        if frozen is not child:
            module.add_module(child_name, frozen)
    return module


def fix_freeze_batch_norm_1d() -> None:
    """``--lock-image-freeze-bn-stats`` freezes the image tower's BatchNorm1d layers too.

    Upstream: ``TimmModel.lock(freeze_bn_stats=True)`` calls ``open_clip.utils.freeze_batch_norm_2d``,
    which converts only ``BatchNorm2d``/``SyncBatchNorm``. A RePa tower normalises with BatchNorm1d, so
    its layers stay trainable BatchNorms: training normalises the locked tower with batch statistics
    and overwrites the running statistics that fusion folds. The fix converts the BatchNorm1d layers
    upstream would have matched (same names, same walk) into :class:`FrozenBatchNorm1d`, i.e. the
    eval-mode normalisation the 2-d case gets, after upstream's own conversion. Installed only in
    ``open_clip.timm_model``, the one caller whose towers hold BatchNorm1d.
    """
    import open_clip.timm_model as timm_model

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def freeze_batch_norm_2d(module: nn.Module, module_match: Any = {}, name: str = "") -> nn.Module:  # noqa: B006
            return _freeze_batch_norm_1d(original(module, module_match, name), module_match, name)
        return freeze_batch_norm_2d

    _replace(timm_model, "freeze_batch_norm_2d", make)


# --- in-training ImageNet evaluation of a subset of the classes ------------------------------------------

class ImageNetSynsetFolder(ImageFolder):
    """``ImageFolder`` labelling each synset folder with its ImageNet-1k index, not its sorted position."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        from repa_ssl.eval.zeroshot import imagenet_class_indices

        classes, _ = super().find_classes(directory)
        try:
            indices = imagenet_class_indices(classes)
        except ValueError as e:
            raise ValueError(f"--imagenet-val {directory}: {e} "
                             "(--classnames: python -m repa_ssl.eval.zeroshot)") from None
        return classes, dict(zip(classes, indices))


def fix_imagenet_subset_labels() -> None:
    """Label ``--imagenet-val`` images by their synset folder's ImageNet-1k index.

    Upstream: ``get_imagenet`` reads the folder with ``torchvision.datasets.ImageFolder``, whose label
    is a folder's position among the folders present, while the zero-shot classifier's columns are
    the 1000 classes in ImageNet-1k order. Equal only with all 1000 folders: a subset (say 100
    classes, to evaluate quickly) gets wrong labels and a meaningless accuracy. ``open_clip_train.data``
    now sees ``torchvision.datasets`` with an ``ImageFolder`` that maps each ``n0xxxxxxx`` folder through
    timm's ImageNet-1k synset list (``repa_ssl.eval.zeroshot.imagenet_class_indices``, as our own
    zero-shot evaluation does) and names folders that are no synset ids; the full set is labelled as before.
    """
    import open_clip_train.data as data

    _replace_seen(data, "datasets.ImageFolder", ImageNetSynsetFolder)


# --- corrupt images and samples without caption: skip AND count -----------------------------------------

# Dropped samples in a row (per worker) before a CLIP stream stops: a LAION shard holds about 10,000
# samples of which a few percent fail; a stream that keeps none of 10,000 is broken, not unlucky.
MAX_SAMPLES_DROPPED_IN_A_ROW = 10_000


class SkipCounter:
    """Per-process counts of skipped webdataset samples, shared with the DataLoader workers.

    The counts live in ``multiprocessing.Value``s that travel with the pipeline into the workers (as
    upstream's ``SharedEpoch`` does), so they are right with ``--workers N`` and any start method.
    The same counter stops a stream that drops every sample: after ``MAX_SAMPLES_DROPPED_IN_A_ROW``
    dropped samples in a row (in one worker) it raises ``UnreadableShardsError`` naming their shards;
    ``kept`` (called for each decoded sample) resets the streak.
    """

    KINDS = ("corrupt_image", "no_caption", "no_image")

    def __init__(self) -> None:
        self._values = {kind: multiprocessing.Value("q", 0) for kind in self.KINDS}
        self._reported = dict.fromkeys(self.KINDS, 0)
        self._dropped_in_a_row: dict[str, int] = {}  # shard -> samples dropped since the last kept one

    def add(self, kind: str, shard: str = "?") -> None:
        value = self._values[kind]
        with value.get_lock():
            value.value += 1
        self._dropped_in_a_row[shard] = self._dropped_in_a_row.get(shard, 0) + 1
        dropped = sum(self._dropped_in_a_row.values())
        if dropped >= MAX_SAMPLES_DROPPED_IN_A_ROW:
            from repa_ssl.data.shards import UnreadableShardsError

            names = sorted(self._dropped_in_a_row)
            raise UnreadableShardsError(
                f"the last {dropped} samples read had no decodable image with a caption ({len(names)} shards: "
                f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); reading on would loop forever. "
                "Check the shards you gave (images must be jpg/jpeg/png/webp with a .txt caption).")

    def kept(self) -> None:
        self._dropped_in_a_row.clear()

    def totals(self) -> dict[str, int]:
        return {kind: int(v.value) for kind, v in self._values.items()}

    def since_last_report(self) -> dict[str, int]:
        """Counts added since the previous call (this process only)."""
        totals = self.totals()
        delta = {kind: totals[kind] - self._reported[kind] for kind in self.KINDS}
        self._reported = totals
        return delta


skip_counter = SkipCounter()


def _keep(counter: SkipCounter, sample: dict) -> bool:
    """Upstream's ``filter_no_caption_or_no_image``, counting what it drops."""
    if not any(ext in sample for ext in IMAGE_KEYS):
        counter.add("no_image", sample.get("__url__", "?"))
        return False
    if "txt" not in sample:
        counter.add("no_caption", sample.get("__url__", "?"))
        return False
    return True


def _handle(counter: SkipCounter, exn: Exception) -> bool:
    """Upstream's ``log_and_continue``, counting undecodable images instead of a warning for each."""
    from webdataset.autodecode import DecodingError

    if isinstance(exn, DecodingError):
        counter.add("corrupt_image", str(exn.url))
        _logger.debug("skipping corrupt image %s in %s (%r)", exn.key, exn.url, exn.__cause__)
    else:
        logging.warning(f"Handling webdataset error ({exn!r}). Ignoring.")
    return True


def fix_skip_and_count() -> None:
    """Count the samples that ``open_clip_train``'s webdataset pipeline drops, and log them per epoch.

    Upstream drops samples without caption (or image) silently and logs one warning per undecodable
    image, so a user cannot tell how much of LAION was actually used. The select predicate and the
    decode error handler (module globals that ``get_wds_dataset`` reads when it builds the pipeline)
    become counting versions (``_keep``, ``_handle``: same decisions, plus a count; each corrupt
    image is logged at DEBUG, i.e. with ``--debug``); the data pipeline itself is unchanged. After
    each training epoch the counts of all processes are summed and rank 0 logs one line.
    """
    import open_clip_train.data as data
    import open_clip_train.main as train_main

    # partials (not closures) so the counter is pickled along into spawned DataLoader workers
    _replace(data, "filter_no_caption_or_no_image", lambda original: functools.partial(_keep, skip_counter))
    _replace(data, "log_and_continue", lambda original: functools.partial(_handle, skip_counter))

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, **kwargs):
            out = original(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, **kwargs)
            log_skipped_samples(epoch, args)
            return out
        return train_one_epoch

    _replace(train_main, "train_one_epoch", make)


def log_skipped_samples(epoch: int, args: Any) -> dict[str, int]:
    """Sum this epoch's skip counts over all processes; rank 0 logs them. Returns the sums."""
    counts = skip_counter.since_last_report()
    if getattr(args, "distributed", False) and dist.is_initialized():
        t = torch.tensor([counts[k] for k in SkipCounter.KINDS], dtype=torch.int64, device=args.device)
        dist.all_reduce(t)
        counts = dict(zip(SkipCounter.KINDS, t.tolist()))
    if getattr(args, "rank", 0) == 0:
        logging.info(
            f"Train Epoch: {epoch} skipped samples: {counts['corrupt_image']} corrupt images, "
            f"{counts['no_caption']} without caption, {counts['no_image']} without image")
    return counts


# --- image modes: 16-bit, RGBA, CMYK ... ------------------------------------------------------------------

def decode_rgb(key: str, data: bytes) -> Any:
    """webdataset decode handler: images to 8-bit RGB with ``repa_ssl.data.load_rgb``.

    Only the extensions upstream reads (``IMAGE_KEYS``): decoding another member (a ``.bmp`` beside
    the ``.jpg``) would be wasted, and a broken one would drop a sample whose image is fine.
    """
    from repa_ssl.data import load_rgb

    if key.rsplit(".", 1)[-1].lower() not in IMAGE_KEYS:
        return None
    return load_rgb(data, name=key)


def _decode_pilrgb_with_load_rgb(*handlers: Any, **kwargs: Any) -> Any:
    """``webdataset.decode`` with ``decode_rgb`` in place of the ``"pilrgb"`` handler; counts what it keeps."""
    import webdataset

    decode = webdataset.decode(*(decode_rgb if h == "pilrgb" else h for h in handlers), **kwargs)
    return functools.partial(_count_kept, skip_counter, decode)


def _count_kept(counter: SkipCounter, stage: Callable, samples: Iterable[dict]) -> Iterator[dict]:
    for sample in stage(samples):
        counter.kept()
        yield sample


def fix_image_modes() -> None:
    """Decode webdataset images to RGB the way ``repa_ssl.data`` does, so no image mode is garbled.

    Upstream: ``get_wds_dataset`` decodes with ``wds.decode("pilrgb")``, i.e. PIL's ``convert("RGB")``,
    which clips a 16-bit PNG (mode ``I;16``) to almost pure white and drops an RGBA image's alpha
    (transparent pixels become whatever colour they hold, often black). ``load_rgb`` scales 16-bit
    images to 8 bits and composites transparency on white, like the DINO and evaluation pipelines. A
    file that does not decode (corrupt, zero bytes) still raises inside webdataset's decoder, so it is
    skipped and counted as a corrupt image (``fix_skip_and_count``).
    """
    import open_clip_train.data as data

    _replace_seen(data, "wds.decode", _decode_pilrgb_with_load_rgb)


# --- shards without samples: an error naming them, not an endless loop or an untrained checkpoint ---------

def _read_shards(original: Callable, src: Iterable[dict], **kwargs: Any) -> Iterator[dict]:
    """Upstream's ``tarfile_to_samples_nothrow`` (``original``) between the two stages of a ``ShardStreak``.

    Its ``handler`` defaults to the ``log_and_continue`` of upstream's ``def`` line, bound before any fix
    replaced it; the one ``open_clip_train.data`` holds now is passed, as its other stages look it up.
    """
    import open_clip_train.data as data
    from repa_ssl.data.shards import ShardStreak

    streak = ShardStreak()
    skip_counter.kept()  # a new stream: samples dropped by an earlier one do not count against it
    return streak.samples(original(streak.shards(src), **{"handler": data.log_and_continue, **kwargs}))


class _RequireBatches:
    """The training dataloader, except that an epoch without a single batch raises instead of passing."""

    def __init__(self, dataloader: Any, train_data: str) -> None:
        self._dataloader, self._train_data = dataloader, train_data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dataloader, name)

    def __iter__(self) -> Iterator[Any]:
        from repa_ssl.data.shards import UnreadableShardsError

        batches = 0
        for batch in self._dataloader:
            batches += 1
            yield batch
        if not batches:
            raise UnreadableShardsError(
                f"no training sample was read from --train-data {self._train_data}: every shard is empty, not a "
                "tar file, or holds no image with a caption (see the warnings above). Nothing was trained, so no "
                "checkpoint is written for this epoch.")


def fix_unreadable_shards() -> None:
    """Stop with an error naming the shards when they give no sample, instead of looping or saving an untrained model.

    Upstream: with ``--dataset-resampled`` the shard stream is endless, and when no shard holds a
    sample (all empty, or not tar files) ``tarfile_to_samples_nothrow`` logs a warning per shard and
    draws the next one forever (146 MB of log in 100 s). Without it an epoch over such shards has no
    batch, ``train_one_epoch`` returns at once, and ``main`` writes an untrained ``epoch_1.pt`` and
    exits 0. Reading now stops after ``MAX_SHARDS_WITHOUT_SAMPLES`` shards in a row without a sample
    (``repa_ssl.data.shards.ShardStreak``, the stream DINO uses), and an epoch without a batch raises
    before its checkpoint is written. The same stage warns about a shard cut at a member boundary
    (no end-of-archive blocks), which tar reading passes silently.
    """
    import open_clip_train.data as data
    import open_clip_train.main as train_main

    _replace(data, "tarfile_to_samples_nothrow", lambda original: functools.partial(_read_shards, original))

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def get_data(args: Any, *rest: Any, **kwargs: Any) -> dict[str, Any]:
            out = original(args, *rest, **kwargs)
            if "train" in out:
                out["train"].dataloader = _RequireBatches(out["train"].dataloader, args.train_data)
            return out
        return get_data

    _replace(train_main, "get_data", make)


# --- reproducible epochs: a run, and a resumed run, see the same samples in the same order ---------------

def _seed_generators(seed: int) -> None:
    """torch's, numpy's and Python's global generators, as upstream's ``random_seed`` seeds them."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class EpochSeededShuffle(wds.PipelineStage):
    """Upstream's sample shuffle (``wds.shuffle``, same buffer sizes), seeded from ``--seed``, the epoch, the rank
    and the DataLoader worker; in a worker it also seeds that worker's generators (the augmentations)."""

    def __init__(self, bufsize: int, initial: int) -> None:
        self.bufsize, self.initial = bufsize, initial
        self.seed: Optional[int] = None
        self.epoch: Any = None  # upstream's SharedEpoch, once the dataset is built

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        if self.epoch is None:
            raise RuntimeError("the sample shuffle was built outside get_wds_dataset: it has no seed and epoch")
        rank = wds.utils.pytorch_worker_info()[0]
        worker = torch.utils.data.get_worker_info()
        seed = epoch_seed(self.seed, rank, self.epoch.get_value(), *([] if worker is None else [worker.id]))
        if worker is not None:
            _seed_generators(seed)
        return _shuffle(src, self.bufsize, self.initial, random.Random(seed))  # noqa: S311 (a seeded shuffle)


_unbound_shuffles: list[EpochSeededShuffle] = []  # made while get_wds_dataset builds its pipeline


def _seeded_shuffle(bufsize: int = 1000, initial: int = 100, **kwargs: Any) -> EpochSeededShuffle:
    if kwargs:
        raise TypeError(f"upstream's sample shuffle got arguments this fix does not handle: {sorted(kwargs)}")
    stage = EpochSeededShuffle(bufsize, initial)
    _unbound_shuffles.append(stage)
    return stage


def fix_reproducible_epochs() -> None:
    """Make each epoch's samples, their order and their augmentations a function of ``--seed`` and the epoch.

    Upstream: ``get_wds_dataset`` shuffles samples with ``wds.shuffle``, whose generator webdataset seeds from
    the process id and the clock, so two runs with the same ``--seed`` train on different batches (two
    identical 2-epoch runs of the tests' CLIP ended 1.0 apart in their weights), and ``main`` seeds the global
    generators once, so an epoch's augmentations depend on every epoch before it. Neither a rerun nor a
    ``--resume`` can repeat a run. The shuffle now seeds itself like upstream's own shard shuffle
    (``detshuffle2``: from the seed and the shared epoch), per rank and worker; each training epoch starts
    with the generators seeded from (seed, epoch, rank), and each DataLoader worker's from (seed, epoch, rank,
    worker). A resumed run repeats the uninterrupted one bit for bit. Left as upstream has it:
    ``--dataset-resampled`` with ``--workers`` > 0 draws shards from the DataLoader's worker seed, which
    persistent workers take once, so after a resume those draws differ.
    """
    import open_clip_train.data as data
    import open_clip_train.main as train_main

    _replace_seen(data, "wds.shuffle", _seeded_shuffle)

    def make_dataset(original: Callable) -> Callable:
        @functools.wraps(original)
        def get_wds_dataset(args: Any, *rest: Any, **kwargs: Any) -> Any:
            del _unbound_shuffles[:]
            info = original(args, *rest, **kwargs)
            for stage in _unbound_shuffles:
                stage.seed, stage.epoch = args.seed, info.shared_epoch
            del _unbound_shuffles[:]
            return info
        return get_wds_dataset

    def make_epoch(original: Callable) -> Callable:
        @functools.wraps(original)
        def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, **kwargs):
            _seed_generators(epoch_seed(args.seed, args.rank, epoch))
            return original(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, **kwargs)
        return train_one_epoch

    _replace(data, "get_wds_dataset", make_dataset)
    _replace(train_main, "train_one_epoch", make_epoch)


# --- checkpoints: atomic writes, safe loading -------------------------------------------------------------

def _atomic_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    """``torch.save``, atomic for a local path."""
    if isinstance(f, (str, os.PathLike)) and "://" not in str(f):
        save_checkpoint(obj, f)
    else:
        torch.save(obj, f, *args, **kwargs)


def _pt_load(file_path: str, map_location: Any = None) -> Any:
    if "://" in str(file_path):  # a remote checkpoint the user named: upstream's fsspec, our weights-only load
        import fsspec

        with fsspec.open(file_path, "rb") as f:
            return load_torch_file(f, file_path, map_location=map_location or "cpu")
    return load_checkpoint(file_path, map_location=map_location or "cpu")


def fix_checkpoint_io() -> None:
    """Write ``epoch_N.pt`` atomically and read local checkpoints only through ``repa_ssl.checkpoint``.

    Upstream: ``main`` writes ``checkpoints/epoch_N.pt`` with a plain ``torch.save``; a job killed
    (preempted, out of time, ``kill -9``) while writing leaves a truncated ``epoch_N.pt``, which
    ``--resume latest`` then picks as the newest checkpoint and fails to load, so the run cannot
    continue. ``main`` now sees a ``torch`` whose ``save`` writes a temporary file and renames it
    (``repa_ssl.checkpoint.save_checkpoint``), so ``epoch_N.pt`` is complete or absent and the resume
    takes the last complete one. Its ``pt_load`` goes through ``load_checkpoint`` for local files:
    ``weights_only=True``, and a file carrying pickled code is refused with a message. Remote
    (fsspec URL) checkpoints are opened with fsspec as upstream does and loaded the same way (upstream
    relies on torch's default for ``weights_only``).
    """
    import open_clip_train.main as train_main

    _replace_seen(train_main, "torch.save", _atomic_save)
    _replace(train_main, "pt_load", lambda original: _pt_load)


# --- logging: upstream's setup for an in-process run -------------------------------------------------------

@contextmanager
def upstream_logging(notes: Sequence[str] = (), log_files: Optional[list[str]] = None) -> Iterator[None]:
    """While ``open_clip_train.main`` runs: torch's loggers stay at WARNING, and the root handlers it adds go after.

    Upstream: ``main`` calls ``setup_logging``, which sets every logger to INFO (so torch's compiler
    prints its statistics at exit) and adds handlers to the root logger that stay after ``main``
    returns, so an in-process caller (a launcher, the tests) logs every line twice on its next run.
    ``main`` now sees a ``setup_logging`` that does upstream's, puts torch's loggers back to WARNING and
    logs ``notes`` (our own notes on the run, e.g. the BatchNorm sync policy) first thing in the run's
    log; the log file it opens (in the run folder; none on other ranks) is appended to ``log_files``.
    On exit upstream's function is back and the handlers it added are removed and closed.
    """
    import open_clip_train.main as train_main

    root = logging.getLogger()
    handlers_before = list(root.handlers)
    original = train_main.setup_logging

    def setup_logging(log_file: Optional[str], *args: Any, **kwargs: Any) -> None:
        original(log_file, *args, **kwargs)
        if log_files is not None:
            log_files.append(log_file)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch"):
                logging.getLogger(name).setLevel(logging.WARNING)
        for note in notes:
            _logger.info(note)

    train_main.setup_logging = setup_logging
    try:
        yield
    finally:
        train_main.setup_logging = original
        for handler in [h for h in root.handlers if h not in handlers_before]:
            root.removeHandler(handler)
            handler.close()


# --- hooks: the model once built, and every training step ---------------------------------------------------

@contextmanager
def training_hooks(on_model: Optional[Callable[[nn.Module], Any]] = None,
                   on_step: Optional[Callable[[nn.Module, int, int], Any]] = None) -> Iterator[None]:
    """While ``open_clip_train.main`` runs: ``on_model(model)`` once the model to train is built, and
    ``on_step(model, step, total_steps)`` before each of its training steps.

    Upstream has neither hook: ``main`` builds the model (``--pretrained`` loaded into it) and at once its
    optimizer, DDP wrapper and ``--resume`` state; ``train_one_epoch`` calls nothing per step but
    ``scheduler(step)``. A depth-branch run needs both: its branch form must exist before the optimizer and
    the resumed weights meet the parameters, and its join s must be set before every step. ``main`` now sees
    a ``create_model_and_transforms`` that hands its first model (the one trained; a ``--distill`` teacher
    comes second) to ``on_model``, and a ``train_one_epoch`` whose ``scheduler(step)`` calls
    ``on_step(model, step, total_steps)`` first, with upstream's own step and total (its lr schedule's). Not
    called with ``--skip-scheduler``, under which upstream calls no scheduler. On exit both names are
    upstream's (with the other fixes) again.
    """
    import open_clip_train.main as train_main

    create, train_one_epoch = train_main.create_model_and_transforms, train_main.train_one_epoch
    built: list[nn.Module] = []

    @functools.wraps(create)
    def create_model_and_transforms(*args: Any, **kwargs: Any) -> Any:
        model, *transforms = create(*args, **kwargs)
        if not built and on_model is not None:
            on_model(model)
        built.append(model)
        return (model, *transforms)

    @functools.wraps(train_one_epoch)
    def train_one_epoch_with_hook(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, **kwargs):
        total_steps = data["train"].dataloader.num_batches // args.accum_freq * args.epochs

        def scheduler_with_hook(step: int) -> Any:
            if on_step is not None:
                on_step(model, step, total_steps)
            return scheduler(step)

        return train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler_with_hook, dist_model, args,
                               **kwargs)

    train_main.create_model_and_transforms, train_main.train_one_epoch = create_model_and_transforms, \
        train_one_epoch_with_hook
    try:
        yield
    finally:
        train_main.create_model_and_transforms, train_main.train_one_epoch = create, train_one_epoch


_announced = False  # apply() has logged the fixes it installs in this process
FIXES = (fix_checkpoint_io, fix_image_modes, fix_webdataset_end_of_shard, fix_cpu_distributed,
         fix_zero_shot_accuracy_numpy2, fix_skip_and_count, fix_freeze_batch_norm_1d, fix_imagenet_subset_labels,
         fix_unreadable_shards, fix_sync_batchnorm, fix_reproducible_epochs)


def apply() -> None:
    """Install every fix (idempotent). Import-safe in each torchrun/Slurm process.

    Warns when the installed open_clip_torch is not the release the fixes are written for, and logs
    (once per process) which fixes it installs.
    """
    installed = importlib.metadata.version("open_clip_torch")
    if installed != UPSTREAM_VERSION:
        _logger.warning("open_clip_torch %s is installed, but clip.patches fixes open_clip_torch %s: a fix may be "
                        "unneeded or wrong for %s. Install open_clip_torch==%s (pyproject.toml pins it).",
                        installed, UPSTREAM_VERSION, installed, UPSTREAM_VERSION)
    global _announced
    for fix in FIXES:
        fix()
    if not _announced:
        _announced = True
        _logger.info("open_clip_torch %s: installed %d fixes: %s", installed, len(FIXES),
                     ", ".join(f.__name__.removeprefix("fix_") for f in FIXES))
