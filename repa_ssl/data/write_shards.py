"""Write webdataset shards in img2dataset's layout from your own images and captions.

Each sample is ``<key>.jpg`` (or ``.png`` …, the original bytes, not re-encoded),
``<key>.txt`` (the caption) and ``<key>.json`` (key, caption, source path), in tar shards
named ``00000.tar``, ``00001.tar`` …, exactly as LAION-400M is distributed, so the DINO
and CLIP pipelines read them like LAION shards.

    # an image folder whose images have a caption file beside them (cat.jpg + cat.txt)
    python -m repa_ssl.data.write_shards --images my_images/ --output shards/ --samples-per-shard 1000
    # or a CSV with columns path,caption
    python -m repa_ssl.data.write_shards --csv captions.csv --output shards/
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import tarfile
import time
from pathlib import Path
from typing import Iterable, Optional

from tqdm import tqdm

from ..checkpoint import atomic_write

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

__all__ = ["write_shards", "samples_from_folder", "samples_from_csv"]


def samples_from_folder(root: Path) -> list[tuple[Path, Optional[str]]]:
    """Images under ``root`` (sorted), each with the caption from its sibling ``.txt`` if any."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    out = []
    for p in images:
        txt = p.with_suffix(".txt")
        out.append((p, txt.read_text(encoding="utf-8").strip() if txt.is_file() else None))
    return out


def samples_from_csv(csv_path: Path) -> list[tuple[Path, Optional[str]]]:
    """Rows of a CSV with ``path`` and ``caption`` columns (paths relative to the CSV's folder)."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path} needs a header with 'path' and 'caption' columns, got {reader.fieldnames}")
        return [((csv_path.parent / row["path"]), row["caption"] or None) for row in reader]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def write_shards(
        samples: Iterable[tuple[Path, Optional[str]]],
        output_dir: Path,
        samples_per_shard: int = 1000,
        progress: bool = True,
) -> list[Path]:
    """Write ``(image_path, caption)`` samples into tar shards; returns the shard paths.

    A sample without caption is written without ``.txt`` (as img2dataset does when a caption
    is missing); readers skip and count it. Each shard is written atomically.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    samples = list(samples)
    if not samples:
        raise ValueError("no samples to write: the folder or CSV holds no images")
    shards = []
    for shard_idx, start in enumerate(range(0, len(samples), samples_per_shard)):
        path = output_dir / f"{shard_idx:05d}.tar"
        with atomic_write(path) as tmp, tarfile.open(tmp, "w") as tar:
            chunk = samples[start:start + samples_per_shard]
            for i, (image_path, caption) in enumerate(
                    tqdm(chunk, desc=path.name, disable=not progress, leave=False)):
                key = f"{shard_idx:05d}{i:04d}"
                ext = image_path.suffix.lower().lstrip(".")
                _add(tar, f"{key}.{'jpg' if ext == 'jpeg' else ext}", image_path.read_bytes())
                if caption is not None:
                    _add(tar, f"{key}.txt", caption.encode("utf-8"))
                meta = {"key": key, "caption": caption, "source": str(image_path)}
                _add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
        shards.append(path)
    _logger.info("wrote %d samples into %d shards in %s", len(samples), len(shards), output_dir)
    return shards


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="image folder; captions from sibling .txt files")
    src.add_argument("--csv", type=Path, help="CSV with columns path,caption")
    p.add_argument("--output", type=Path, required=True, help="directory for 00000.tar, 00001.tar, ...")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    samples = samples_from_folder(args.images) if args.images else samples_from_csv(args.csv)
    write_shards(samples, args.output, args.samples_per_shard)


if __name__ == "__main__":
    main()
