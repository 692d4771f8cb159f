"""Write webdataset shards in img2dataset's layout from your own images and captions.

Each sample is ``<key>.jpg`` (``.png``, ``.webp``: the original bytes, not re-encoded; other
formats such as ``.bmp`` or ``.tif`` are converted to 8-bit RGB ``.png``, the extensions both the
DINO and the CLIP pipelines read), ``<key>.txt`` (the caption) and ``<key>.json`` (key, caption,
source path), in tar shards named ``00000.tar``, ``00001.tar`` …, exactly as LAION-400M is
distributed, so the DINO and CLIP pipelines read them like LAION shards.

    # an image folder whose images have a caption file beside them (cat.jpg + cat.txt)
    python -m repa_ssl.data.write_shards --images my_images/ --output shards/ --samples-per-shard 1000
    # or a CSV with columns path,caption (UTF-8; paths relative to the CSV's folder)
    python -m repa_ssl.data.write_shards --csv captions.csv --output shards/

Only regular files inside the image folder (or the CSV's folder) are read: symlinks and CSV paths
that lead elsewhere are refused unless ``--allow-outside`` is given, and FIFOs, devices or missing
files are skipped and counted, never opened. The output folder must be empty or new; with
``--overwrite`` the shards (``NNNNN.tar``) already in it are replaced and other files are kept.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import logging
import os
import re
import stat
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional

import webdataset as wds
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from ..checkpoint import atomic_write
from ..cli import positive_int
from .images import BadImageError, load_rgb
from .shards import IMAGE_KEYS

_logger = logging.getLogger(__name__)

SHARD_NAME = re.compile(r"\d{5}\.tar")

__all__ = ["write_shards", "samples_from_folder", "samples_from_csv"]

Sample = tuple[Path, Optional[str]]


def _read_regular(path: Path) -> Optional[bytes]:
    """The bytes of ``path`` if it is a regular file, else ``None`` (a FIFO or device is never opened)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # swapped for a FIFO since the stat: still no hang
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read() if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else None


def _refuse_outside(paths: Iterable[Path], root: Path, source: str) -> None:
    """Raise, naming the first one, when any of ``paths`` resolves outside ``root`` (symlinks, ``..``)."""
    root = root.resolve()
    outside = [p for p in paths if not p.resolve().is_relative_to(root)]
    if outside:
        raise PermissionError(
            f"{len(outside)} file(s) of {source} lead outside {root}, e.g. {outside[0]} -> {outside[0].resolve()}: "
            "refused, so that a shard never picks up a file you did not mean to share. Pass --allow-outside "
            "(allow_outside=True) to include them.")


def _caption(txt: Path) -> Optional[str]:
    data = _read_regular(txt)
    if data is None:
        return None
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"caption file {txt} is not UTF-8 ({e.reason} at byte {e.start}): save it as UTF-8, "
                         f"e.g. `iconv -f cp1252 -t utf-8 {txt.name}`.") from None


def samples_from_folder(root: Path, allow_outside: bool = False) -> list[Sample]:
    """Images under ``root`` (sorted), each with the caption from its sibling ``.txt`` if any.

    Symlinks leading outside ``root`` are refused unless ``allow_outside``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and not p.is_dir())
    captions = [p.with_suffix(".txt") for p in images]
    if not allow_outside:
        _refuse_outside(images + [c for c in captions if c.exists()], root, f"folder {root}")
    return [(p, _caption(txt)) for p, txt in zip(images, captions)]


def _decode_csv(csv_path: Path) -> str:
    data = csv_path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte order mark
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(
            f"{csv_path}, line {line}: not UTF-8 text ({e.reason} at byte {e.start}). Save it as UTF-8 (Excel: "
            f"'CSV UTF-8'), or convert it: `iconv -f cp1252 -t utf-8 {csv_path.name} > utf8.csv`.") from None


def samples_from_csv(csv_path: Path, allow_outside: bool = False) -> list[Sample]:
    """Rows of a UTF-8 CSV with ``path`` and ``caption`` columns (paths relative to the CSV's folder).

    Paths leading outside the CSV's folder (absolute, ``..``, symlinks) are refused unless ``allow_outside``.
    """
    csv_path = Path(csv_path)
    reader = csv.DictReader(io.StringIO(_decode_csv(csv_path), newline=""))
    if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
        raise ValueError(f"{csv_path} needs a header with 'path' and 'caption' columns, got {reader.fieldnames}")
    samples = []
    for row in reader:
        if not row["path"]:
            raise ValueError(f"{csv_path}, line {reader.line_num}: empty 'path'")
        samples.append((csv_path.parent / row["path"], row["caption"] or None))
    if not allow_outside:
        _refuse_outside([p for p, _ in samples], csv_path.parent, f"{csv_path}")
    return samples


def _prepare_output(output_dir: Path, overwrite: bool) -> None:
    """Make ``output_dir``; refuse one with files in it, unless ``overwrite`` (then remove our old shards)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(output_dir.iterdir())
    if existing and not overwrite:
        raise FileExistsError(
            f"output folder {output_dir} is not empty ({len(existing)} entries, e.g. {existing[0].name}): new shards "
            "would mix with what is there. Choose a new folder, or pass --overwrite to replace its shards "
            "(NNNNN.tar; other files are kept).")
    for old in existing:
        if SHARD_NAME.fullmatch(old.name) and old.is_file():
            old.unlink()


def _image_member(path: Path, skipped: Counter) -> Optional[tuple[str, bytes]]:
    """``(extension, bytes)`` of the image at ``path`` in a form both pipelines read; ``None`` (counted) if not."""
    data = _read_regular(path)
    if data is None:
        skipped["missing or not a regular file"] += 1
        _logger.warning("skipping %s: missing, unreadable or not a regular file", path)
        return None
    ext = path.suffix.lower().lstrip(".")
    if ext in IMAGE_KEYS:
        return "jpg" if ext == "jpeg" else ext, data
    try:
        image = load_rgb(data, name=str(path))
    except BadImageError as e:
        skipped["undecodable"] += 1
        _logger.warning("skipping %s", e)
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def write_shards(
        samples: Iterable[Sample],
        output_dir: Path,
        samples_per_shard: int = 1000,
        progress: bool = True,
        overwrite: bool = False,
) -> list[Path]:
    """Write ``(image_path, caption)`` samples into tar shards; returns the shard paths.

    A sample without caption is written without ``.txt`` (as img2dataset does when a caption
    is missing); readers skip and count it. Images that cannot be read (missing, FIFOs, devices)
    or converted are skipped and counted. Each shard is written atomically.
    """
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
    output_dir = Path(output_dir)
    samples = list(samples)
    if not samples:
        raise ValueError("no samples to write: the folder or CSV holds no images")
    _prepare_output(output_dir, overwrite)
    skipped: Counter = Counter()
    members: Iterator[tuple[Sample, tuple[str, bytes]]] = (
        (sample, member) for sample in tqdm(samples, disable=not progress, leave=False)
        if (member := _image_member(sample[0], skipped)) is not None)
    shards = []
    while first := next(members, None):
        path = output_dir / f"{len(shards):05d}.tar"
        with atomic_write(path) as tmp, open(tmp, "wb") as f, contextlib.closing(wds.TarWriter(f)) as tar:
            for i, ((image_path, caption), (ext, data)) in enumerate(
                    itertools.chain([first], itertools.islice(members, samples_per_shard - 1))):
                key = f"{len(shards):05d}{i:04d}"
                meta = {"key": key, "caption": caption, "source": str(image_path)}
                sample = {"__key__": key, ext: data, "json": meta}
                if caption is not None:
                    sample["txt"] = caption
                tar.write(sample)
        shards.append(path)
    written = len(samples) - sum(skipped.values())
    if skipped:
        _logger.warning("skipped %d of %d images: %s", sum(skipped.values()), len(samples),
                        ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
    if not shards:
        raise ValueError(f"none of the {len(samples)} images could be read; nothing was written")
    _logger.info("wrote %d samples into %d shards in %s", written, len(shards), output_dir)
    return shards


def main(argv=None) -> None:
    p = argparse.ArgumentParser("python -m repa_ssl.data.write_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="image folder; captions from sibling .txt files")
    src.add_argument("--csv", type=Path, help="UTF-8 CSV with columns path,caption (paths relative to its folder)")
    p.add_argument("--output", type=Path, required=True, help="new or empty folder for 00000.tar, 00001.tar, ...")
    p.add_argument("--samples-per-shard", type=positive_int, default=1000)
    p.add_argument("--allow-outside", action="store_true",
                   help="include files that symlinks or CSV paths lead to outside the image (CSV) folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the NNNNN.tar shards already in --output (other files are kept)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.images:
        samples = samples_from_folder(args.images, allow_outside=args.allow_outside)
    else:
        samples = samples_from_csv(args.csv, allow_outside=args.allow_outside)
    write_shards(samples, args.output, args.samples_per_shard, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
