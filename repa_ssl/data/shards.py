"""Image-only reading of img2dataset / LAION webdataset shards, skipping and counting bad samples.

Samples are ``<key>.jpg`` (or ``.png``, ``.webp`` ...) plus captions and metadata, which
are ignored. An undecodable image, or a sample without any image, comes out as ``None``,
so ``collate_skipping`` drops and counts it like ``RobustImageFolder`` does. Shards are
drawn with replacement per process and worker (open_clip's "resampled" mode): every
process gets an endless stream, so all processes run the same number of steps. Each worker reads
several shards at once, taking their samples in turn, and shuffles them in open_clip's buffer
(5000 samples, 1000 before the first), so that a batch, and BatchNorm's batch statistics, do not
come from one shard's correlated samples. A stream
whose last ``MAX_SHARDS_WITHOUT_SAMPLES`` shards gave no sample at all (empty, not tar files)
stops with ``UnreadableShardsError`` naming them instead of drawing shards forever, and a shard
that ends without tar's end-of-archive blocks (cut at a member boundary, which tar reading
cannot tell from a complete file) is reported once per process.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .images import BadImageError, load_rgb

_logger = logging.getLogger(__name__)

__all__ = ["ImageShards", "ShardStreak", "UnreadableShardsError", "count_shard_samples", "expand_shards",
           "is_remote_shard", "warn_if_cut"]

# The image extensions of a shard sample, the one list both pipelines read: of torchvision's ``IMG_EXTENSIONS``
# (image folders) open_clip_train takes only these (``rename(image="jpg;png;jpeg;webp")``), so DINO does too and
# ``write_shards`` writes only these.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# Shards in a row that may give no sample before a stream stops: with 12 of 28 shards empty the
# chance of 100 in a row is 1e-37, while a list of only empty or broken shards stops in seconds.
MAX_SHARDS_WITHOUT_SAMPLES = 100
# open_clip_train's sample shuffle (``_SAMPLE_SHUFFLE_SIZE`` / ``_SAMPLE_SHUFFLE_INITIAL``).
SHUFFLE_BUFFER, SHUFFLE_INITIAL = 5000, 1000
# Shards each worker reads at once, in turn.
SHARD_STREAMS = 4
_TAR_END = 2 * tarfile.BLOCKSIZE  # a complete tar ends with (at least) two zero blocks
_cut_shards_reported: set[str] = set()


class UnreadableShardsError(RuntimeError):
    """Many shards in a row held no sample: the shard list is broken, reading on would loop forever."""


class ShardStreak:
    """Two pipeline stages around tar reading that stop a stream drawing shards without samples forever.

    ``shards`` passes shard dicts (``{"url": ...}``) on and raises ``UnreadableShardsError`` once
    ``limit`` shards in a row, or each of the ``num_shards`` shards there are, have given no sample;
    ``samples`` passes samples on and resets the count.
    """

    def __init__(self, limit: int = MAX_SHARDS_WITHOUT_SAMPLES, num_shards: Optional[int] = None) -> None:
        self.limit, self.num_shards = limit, num_shards  # every one of num_shards without a sample: stop at once
        self.since_last_sample: list[str] = []

    def shards(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in src:
            names = sorted(set(self.since_last_sample))
            if len(self.since_last_sample) >= self.limit or len(names) == self.num_shards:
                raise UnreadableShardsError(
                    f"no sample in the last {len(self.since_last_sample)} shards read ({len(names)} different: "
                    f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}): they are empty or not tar files "
                    "(see the warnings above). Check the shards you gave, or remove the broken ones.")
            self.since_last_sample.append(shard["url"])
            warn_if_cut(shard["url"])
            yield shard

    def samples(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            self.since_last_sample.clear()
            yield sample


def warn_if_cut(shard: str) -> bool:
    """Warn (once per process) when a local shard lacks tar's end-of-archive blocks; True if it does.

    Reading a tar cut at a member boundary stops silently after the last complete member, so only
    the missing end marker tells a copy or download that stopped half-way from a complete shard.
    """
    if is_remote_shard(shard) or shard in _cut_shards_reported:
        return False
    try:
        with open(shard, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAR_END))
            complete = size >= _TAR_END and not any(f.read())
    except OSError:
        return False  # reported where the shard is read
    if not complete:
        _cut_shards_reported.add(shard)
        _logger.warning("shard %s does not end like a complete tar file (%d bytes, no end-of-archive blocks): it "
                        "is truncated or not a tar file; its complete samples are used. Re-download or re-write "
                        "it.", shard, size)
    return not complete


def is_remote_shard(shard: str) -> bool:
    """True for what webdataset does not open as a local file: ``pipe:`` (a shell command), URLs, ``-``."""
    return shard == "-" or urlparse(shard).scheme not in ("", "file")


def _local_path(shard: str) -> str:
    """``shard``, with a ``file:`` URL (which webdataset opens as a local file) as the path it names."""
    parsed = urlparse(shard)
    return url2pathname(parsed.path) if parsed.scheme == "file" else shard


def expand_shards(spec: str | Path, allow_remote: bool = False) -> list[str]:
    """A directory of ``.tar`` files, a brace pattern (``shards/{00000..00099}.tar``) or ``a.tar::b.tar``.

    ``file:`` URLs come back as the local paths they name. ``pipe:`` specs run a shell command and URLs
    open connections, so they are refused unless ``allow_remote``: only command-line code sets it, for a
    spec the user typed and opted into.
    """
    import braceexpand

    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"no .tar shards in {path}: point --data-path at img2dataset's output folder "
                                    "or give a brace pattern like 'shards/{00000..00099}.tar'.")
        return shards
    shards = [_local_path(s) for part in str(spec).split("::") for s in braceexpand.braceexpand(part)]
    remote = [s for s in shards if is_remote_shard(s)]
    if remote and not allow_remote:
        raise ValueError(f"refused to read shards from {remote[0]!r}: 'pipe:' specs run a shell command and URLs "
                         "open connections. If you typed it on purpose, add --allow-remote-shards; otherwise "
                         "give local .tar files.")
    missing = [s for s in shards if not is_remote_shard(s) and not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards do not exist, e.g. {missing[0]}: check "
                                "--data-path (a folder of .tar shards, a brace pattern, or paths joined by '::').")
    return shards


def count_shard_samples(shards: list[str]) -> int:
    """Images in local shards: from img2dataset's ``*_stats.json`` when present, else by listing the tars."""
    remote = [s for s in shards if is_remote_shard(s)]
    if remote:
        raise ValueError(f"cannot count the images of remote shards ({remote[0]}): give their number "
                         "(--train-num-samples), e.g. the sum of 'successes' in img2dataset's *_stats.json.")
    total = 0
    for shard in shards:
        stats = Path(shard).with_name(Path(shard).stem + "_stats.json")
        if stats.is_file():
            total += int(json.loads(stats.read_text())["successes"])
            continue
        total += _count_images(shard)
    return total


def _count_images(shard: str) -> int:
    """Image members of one tar; a truncated or empty shard counts what precedes the damage, with a warning."""
    count = 0
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                count += member.name.rsplit(".", 1)[-1].lower() in IMAGE_KEYS
    except tarfile.ReadError as e:
        _logger.warning("shard %s is truncated or not a tar file (%s): counted its %d images before the damage; "
                        "re-download or re-write it", shard, str(e).splitlines()[0], count)
        _cut_shards_reported.add(shard)  # said here already
    warn_if_cut(shard)  # a cut at a member boundary reads without error
    return count


def _skip_shard_error(exn: Exception) -> bool:
    """webdataset handler: log what cannot be read (it names the shard) and go on, without ``warn_and_continue``'s
    0.5 s sleep, which made a stream of broken shards crawl."""
    _logger.warning("skipping the rest of a shard: %r", exn)
    return True


def interleave(streams: list[Iterable[Any]]) -> Iterator[Any]:
    """One item of each stream in turn (round robin), until one of them ends."""
    for items in zip(*streams):
        yield from items


class ImageShards(IterableDataset):
    """Endless stream of ``transform(image)`` (or ``None`` for a bad sample) from tar shards.

    Each worker reads ``streams`` shards at once (each drawn with replacement), takes their samples in turn
    and shuffles them in a buffer of ``shuffle_buffer`` samples that starts yielding once it holds
    ``shuffle_initial``.
    """

    def __init__(self, shards: list[str], transform: Optional[Callable] = None,
                 shuffle_buffer: int = SHUFFLE_BUFFER, shuffle_initial: int = SHUFFLE_INITIAL,
                 streams: int = SHARD_STREAMS) -> None:
        super().__init__()
        if shuffle_buffer < 1 or shuffle_initial < 1 or streams < 1:
            raise ValueError(f"the shuffle buffer ({shuffle_buffer}), its initial fill ({shuffle_initial}) and the "
                             f"shard streams per worker ({streams}) must each be at least 1 (1: no shuffling / "
                             "one shard at a time).")
        self.shards = shards
        self.transform = transform
        self.shuffle_buffer, self.shuffle_initial, self.streams = shuffle_buffer, shuffle_initial, streams
        self.seed: Optional[int] = None
        self.skip_batches, self.batch_size = 0, 1

    def set_epoch(self, seed: int, skip_batches: int = 0, batch_size: int = 1) -> None:
        """Seed the next pass, and skip the samples of its first ``skip_batches`` batches (mid-epoch resume).

        The loader takes batch ``i`` from worker ``i % n`` of its ``n`` workers, each with its own
        stream, so each worker knows which of the skipped batches it made. The skipped samples are
        read again but not decoded: the rest of the epoch holds the same images as a full pass.
        """
        self.seed, self.skip_batches, self.batch_size = seed, skip_batches, batch_size

    def _samples(self, seed: int) -> Iterator[dict[str, Any]]:
        """The undecoded samples of shards drawn with replacement, one shard after the other."""
        import webdataset as wds

        streak = ShardStreak(num_shards=len(set(self.shards)))
        return iter(wds.DataPipeline(
            wds.ResampledShards(self.shards, worker_seed=lambda: seed, deterministic=True),
            streak.shards,
            wds.tarfile_to_samples(handler=_skip_shard_error),
            streak.samples,
        ))

    def _decode(self, samples: Iterator[dict[str, Any]]) -> Iterator[Any]:
        for sample in samples:
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            if key is None:
                _logger.warning("skipping %s: sample has no image (%s)", name, sorted(sample))
                yield None
                continue
            try:
                image = load_rgb(sample[key], name=f"{name}.{key}")
            except BadImageError as e:
                _logger.warning("skipping %s", e)
                yield None
                continue
            yield (self.transform(image) if self.transform is not None else image), 0

    def __iter__(self) -> Iterator[Any]:
        import webdataset as wds

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader starts its round robin at worker 0, so after skipping k batches worker w plays the
        # part of worker (w + k) % n of the full pass, which made batches i < k with i % n equal to it.
        part = (worker + self.skip_batches) % num_workers
        if self.seed is not None:  # set_epoch: a stream per (seed, part)
            seed = int(np.random.SeedSequence([self.seed, part]).generate_state(1)[0])
        else:  # torch's RNG: a DataLoader worker's is seeded per worker from the loader's generator
            seed = int(torch.randint(2**62, (1,)))
        skip = max(0, self.skip_batches - part + num_workers - 1) // num_workers * self.batch_size
        pipeline = wds.DataPipeline(
            lambda: interleave([self._samples(int(np.random.SeedSequence([seed, j]).generate_state(1)[0]))
                                for j in range(self.streams)]),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_initial,
                        rng=random.Random(seed)),  # noqa: S311 (a seeded shuffle, not cryptography)
            lambda samples: itertools.islice(samples, skip, None),
            self._decode,
        )
        return iter(pipeline)
