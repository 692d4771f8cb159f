"""Image-only reading of img2dataset / LAION webdataset shards, skipping and counting bad samples.

Samples are ``<key>.jpg`` (or ``.png``, ``.webp`` ...) plus captions and metadata, which
are ignored. An undecodable image, or a sample without any image, comes out as ``None``,
so ``collate_skipping`` drops and counts it like ``RobustImageFolder`` does. Shards are
drawn with replacement per process and worker (open_clip's "resampled" mode): every
process gets an endless stream, so all processes run the same number of steps.
"""
from __future__ import annotations

import json
import logging
import random
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlparse

import torch
from torch.utils.data import IterableDataset

from .images import BadImageError, load_rgb

_logger = logging.getLogger(__name__)

__all__ = ["ImageShards", "expand_shards", "count_shard_samples", "is_remote_shard"]

# The image extensions of a shard sample, the one list both pipelines read: open_clip_train takes only these
# (``rename(image="jpg;png;jpeg;webp")``), so DINO does too and ``write_shards`` writes only these.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def is_remote_shard(shard: str) -> bool:
    """True for what webdataset does not open as a local file: ``pipe:`` (a shell command), URLs, ``-``."""
    return shard == "-" or urlparse(shard).scheme not in ("", "file")


def expand_shards(spec: str | Path, allow_remote: bool = False) -> list[str]:
    """A directory of ``.tar`` files, a brace pattern (``shards/{00000..00099}.tar``) or ``a.tar::b.tar``.

    ``pipe:`` specs run a shell command and URLs open connections, so they are refused unless
    ``allow_remote``: only command-line code sets it, for a spec the user typed and opted into.
    """
    import braceexpand

    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"no .tar shards in {path}: point --data-path at img2dataset's output folder "
                                    "or give a brace pattern like 'shards/{00000..00099}.tar'.")
        return shards
    shards = [s for part in str(spec).split("::") for s in braceexpand.braceexpand(part)]
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
    return count


class ImageShards(IterableDataset):
    """Endless stream of ``transform(image)`` (or ``None`` for a bad sample) from tar shards."""

    def __init__(self, shards: list[str], transform: Optional[Callable] = None, shuffle_buffer: int = 1000) -> None:
        super().__init__()
        self.shards = shards
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer

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

        # Drawn from torch's RNG: a DataLoader worker's is seeded per worker and epoch from the
        # main process, which the run seeds per rank, so every stream differs and is reproducible.
        seed = int(torch.randint(2**62, (1,)))
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.shards, worker_seed=lambda: seed, deterministic=True),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=random.Random(seed)),
            self._decode,
        )
        return iter(pipeline)
