"""Bad input, one test per case, for both applications' data paths (the README's table).

DINO reads an ImageFolder (``RobustImageFolder``) or shards image-only (``ImageShards``); CLIP reads
shards through open_clip_train's webdataset pipeline with our fixes (``clip.patches``). Each case is
converted, skipped and counted, or stopped with a message that names the file and the fix.
"""
from __future__ import annotations

import io
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import open_clip_train.data as oc_data
import pytest
import torch
import webdataset as wds
from PIL import Image

import clip.train
from clip import patches
from clip.train import check_train_data
from clip_helpers import TRAIN_FLAGS
from dino import train as dino_train
from dino.data import build_dataset
from dino_helpers import TINY, epoch_log
from repa_ssl.data import collate_skipping, count_shard_samples
from repa_ssl.data import shards as shards_module
from repa_ssl.data.shards import UnreadableShardsError

GREY = 100  # every test image is this grey (or its 16-bit equivalent), so conversions are checked exactly


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def jpeg() -> bytes:
    return encode(Image.new("RGB", (40, 40), (GREY,) * 3), "JPEG")


def png_claiming(width: int, height: int, bit_depth: int) -> bytes:
    """A grayscale PNG whose header claims ``width`` x ``height`` pixels, with (almost) no pixel data.

    Enough to test what happens before decoding; decoding it would fail as truncated.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(100)))
            + chunk(b"IEND", b""))


MODES = {  # name: (extension, bytes) of a grey image in that mode
    "grayscale": ("png", lambda: encode(Image.new("L", (40, 40), GREY), "PNG")),
    "cmyk": ("jpg", lambda: encode(Image.new("RGB", (40, 40), (GREY,) * 3).convert("CMYK"), "JPEG")),
    "rgba": ("png", lambda: encode(Image.new("RGBA", (40, 40), (GREY, GREY, GREY, 255)), "PNG")),
    "16-bit": ("png", lambda: encode(Image.fromarray(np.full((40, 40), GREY * 257, np.uint16)), "PNG")),
}


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def clip_samples(shard: Path) -> list[dict]:
    """open_clip_train's webdataset pipeline for one shard as ``get_wds_dataset`` builds it, up to decoding."""
    patches.apply()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(shard)]),
        oc_data.tarfile_to_samples_nothrow,
        wds.select(oc_data.filter_no_caption_or_no_image),
        oc_data.wds.decode("pilrgb", handler=oc_data.log_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
    )
    return list(pipeline)


def dino_shard_samples(shard: Path | str, n: int) -> list:
    """The first ``n`` samples of DINO's endless image-only stream over ``shard`` (None = skipped).

    Seeded: the stream draws its shard order from torch's RNG; unseeded, ``a::b`` may read ``a`` four
    times before ``b`` (1 run in 16 for 8 samples), whatever ran before, and ``b`` is never read.
    """
    torch.manual_seed(0)
    dataset = build_dataset("wds", str(shard), transform=None, image_size=32, shuffle_buffer=1,
                            shard_streams=1)  # a::b for several; one stream reads a shard's samples in order
    stream = iter(dataset)
    return [next(stream) for _ in range(n)]


def folder(root: Path, files: dict[str, bytes]) -> Path:
    (root / "class0").mkdir(parents=True)
    for name, data in files.items():
        (root / "class0" / name).write_bytes(data)
    return root


def dino_folder_batch(root: Path):
    """DINO's ImageFolder samples collated as in training; images as (H, W, 3) uint8 arrays."""
    dataset = build_dataset("folder", str(root), transform=np.array, image_size=32)
    return collate_skipping([dataset[i] for i in range(len(dataset))])


@pytest.fixture
def skip_counts():
    patches.apply()
    patches.skip_counter.since_last_report()
    return patches.skip_counter.since_last_report


def test_corrupt_jpeg(tmp_path, skip_counts):
    torn = jpeg()[:300]
    batch = dino_folder_batch(folder(tmp_path / "f", {"a.jpg": jpeg(), "b.jpg": torn}))
    assert batch.num_skipped == 1 and len(batch.data[0]) == 1  # DINO: skipped and counted
    shard = write_tar(tmp_path / "s.tar", {"0.jpg": jpeg(), "0.txt": b"ok", "1.jpg": torn, "1.txt": b"torn"})
    assert [s["text"] for s in clip_samples(shard)] == ["ok"]  # CLIP: skipped ...
    assert skip_counts()["corrupt_image"] == 1  # ... and counted in the epoch's log line


def cut_tar(path: Path, members: dict[str, bytes], at_member_boundary: bool) -> Path:
    """A shard of ``members`` cut inside the fifth member, or right after the fourth (2 complete samples)."""
    data = write_tar(path.with_suffix(".full"), members).read_bytes()
    with tarfile.open(path.with_suffix(".full")) as tar:
        fifth = tar.getmembers()[4]
    cut = fifth.offset if at_member_boundary else fifth.offset_data + fifth.size // 2
    path.write_bytes(data[:cut])
    return path


@pytest.mark.parametrize("where", ["inside a member", "at a member boundary"])
def test_truncated_tar(where, tmp_path, caplog, monkeypatch):
    members = {f"{i}.{ext}": (jpeg() if ext == "jpg" else b"a grey square") for i in range(3) for ext in ("jpg", "txt")}
    shard = cut_tar(tmp_path / "00000.tar", members, at_member_boundary=where == "at a member boundary")
    with caplog.at_level(logging.WARNING):
        samples = clip_samples(shard)
    assert len(samples) == 2  # CLIP: the complete samples are read, the rest of the shard is skipped ...
    assert any(str(shard) in r.getMessage() for r in caplog.records)  # ... with a warning naming the shard
    for read in (lambda: dino_shard_samples(shard, 4), lambda: count_shard_samples([str(shard)])):  # DINO
        monkeypatch.setattr(shards_module, "_cut_shards_reported", set())  # a new process: it warns again
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            read()
        assert any(str(shard) in r.getMessage() for r in caplog.records), "no warning names the shard"
    assert all(s is not None and s[0].size == (40, 40) for s in dino_shard_samples(shard, 4))
    assert count_shard_samples([str(shard)]) in (2, 3)  # DINO's epoch length: no crash (the cut image's header
    #                                                     may survive the cut, then it is counted)


HUGE = {  # name: (PNG bytes, what the skip warning says)
    "decompression bomb": (png_claiming(20000, 20000, 1), "above the pixel budget, not decoded (Image size (400000000"),
    "16-bit 12000x12000": (png_claiming(12000, 12000, 16), "(144,000,000 pixels) is above the budget of 64,000,000"),
}


@pytest.mark.parametrize("case", HUGE)
def test_huge_images_are_refused_before_decoding(case, tmp_path, skip_counts, caplog):
    data, why = HUGE[case]
    with caplog.at_level(logging.WARNING):
        batch = dino_folder_batch(folder(tmp_path / "f", {"a.jpg": jpeg(), "huge.png": data}))  # also k-NN, linear
    assert batch.num_skipped == 1 and len(batch.data[0]) == 1  # DINO folder: skipped and counted ...
    assert any("huge.png" in r.getMessage() and why in r.getMessage() for r in caplog.records)  # ... named, why
    shard = write_tar(tmp_path / "s.tar", {"0.jpg": jpeg(), "0.txt": b"ok", "1.png": data, "1.txt": b"huge"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        samples = dino_shard_samples(shard, 4)
    assert sum(s is None for s in samples) == 2  # DINO shards: skipped and counted, named
    assert any(f"{shard}:1.png" in r.getMessage() and why in r.getMessage() for r in caplog.records)
    assert [s["text"] for s in clip_samples(shard)] == ["ok"] and skip_counts()["corrupt_image"] == 1  # CLIP


def test_sample_without_image_or_caption(tmp_path, skip_counts):
    shard = write_tar(tmp_path / "s.tar", {"0.jpg": jpeg(), "0.txt": b"ok", "1.jpg": jpeg(), "2.txt": b"no image"})
    assert [s["text"] for s in clip_samples(shard)] == ["ok"]
    counts = skip_counts()
    assert (counts["no_caption"], counts["no_image"]) == (1, 1)  # CLIP: both skipped and counted
    samples = dino_shard_samples(shard, 6)  # DINO reads images only: captions do not matter
    assert sum(s is None for s in samples) == 2 and sum(s is not None for s in samples) == 4  # no image: counted


@pytest.mark.parametrize("mode", MODES)
def test_image_modes_become_rgb(mode, tmp_path):
    ext, make = MODES[mode]
    data = make()
    batch = dino_folder_batch(folder(tmp_path / "f", {f"a.{ext}": data}))
    shard = write_tar(tmp_path / "s.tar", {f"0.{ext}": data, "0.txt": b"grey"})
    (sample,) = clip_samples(shard)
    assert sample["image"].mode == "RGB"
    for arr in (batch.data[0][0].numpy(), np.asarray(sample["image"])):  # DINO folder, CLIP shards
        assert arr.shape == (40, 40, 3)
        assert np.abs(arr.astype(int) - GREY).max() <= 3, f"{mode} decoded to mean {arr.mean():.1f}, not {GREY}"


def test_zero_byte_files(tmp_path, skip_counts, caplog):  # images and shards
    batch = dino_folder_batch(folder(tmp_path / "f", {"a.jpg": jpeg(), "empty.jpg": b""}))
    assert batch.num_skipped == 1  # DINO: skipped and counted
    shard = write_tar(tmp_path / "s.tar", {"0.jpg": jpeg(), "0.txt": b"ok", "1.jpg": b"", "1.txt": b"empty"})
    assert [s["text"] for s in clip_samples(shard)] == ["ok"] and skip_counts()["corrupt_image"] == 1
    empty_shard = tmp_path / "00001.tar"
    empty_shard.write_bytes(b"")
    assert clip_samples(empty_shard) == []  # a zero-byte shard holds no sample: skipped with a warning
    with caplog.at_level(logging.WARNING):
        assert count_shard_samples([str(shard), str(empty_shard)]) == 2  # DINO: counted as empty, with a warning
    assert any(f"shard {empty_shard} is truncated or not a tar" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        samples = dino_shard_samples(f"{shard}::{empty_shard}", 8)
    assert sum(s is None for s in samples) == 4 and sum(s is not None for s in samples) == 4
    assert any("skipping the rest of a shard" in r.getMessage() and str(empty_shard) in r.getMessage()
               for r in caplog.records)  # DINO: the stream goes on, with a warning naming the shard


def test_only_empty_or_garbage_shards_stop_with_an_error_naming_them(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "00000.tar", {})  # an empty tar
    (shards / "00001.tar").write_bytes(b"<html>404 Not Found</html>" * 40)  # a failed download
    named = rf"{shards}/00000.tar, {shards}/00001.tar"
    stopped = rf"DINO stopped at epoch 0: no sample in .* shards read \(2 different: {named}"
    with pytest.raises(SystemExit, match=stopped):
        dino_train.main(TINY + ["--data-source", "wds", "--data-path", str(shards), "--train-num-samples", "16",
                                "--output-dir", str(tmp_path / "dino")])  # an endless stream: hung before
    assert not (tmp_path / "dino" / "checkpoint.pth").exists()  # nothing trained, nothing saved
    flags = TRAIN_FLAGS + ["--train-data", f"{shards}/{{00000..00001}}.tar", "--train-num-samples", "16",
                           "--epochs", "1", "--logs", str(tmp_path / "logs")]
    with pytest.raises(UnreadableShardsError, match=rf"no sample in the last 100 shards read \(2 different: {named}"):
        clip.train.main(flags + ["--dataset-resampled", "--name", "resampled"])  # looped, logging, before
    with pytest.raises(UnreadableShardsError, match=rf"no training sample was read from --train-data {shards}/"):
        clip.train.main(flags + ["--name", "once"])  # wrote an untrained epoch_1.pt and exited 0 before
    assert not list((tmp_path / "logs").rglob("*.pt"))


def test_clip_shards_of_only_corrupt_images_stop_instead_of_looping(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):  # valid tars whose samples are read, counted and dropped: no shard is "empty"
        write_tar(shards / f"{i:05d}.tar", {f"{i}_{j}.{ext}": jpeg()[:300] if ext == "jpg" else b"a caption"
                                            for j in range(4) for ext in ("jpg", "txt")})
    monkeypatch.setattr(patches, "MAX_SAMPLES_DROPPED_IN_A_ROW", 40)  # 10,000 in a real run
    flags = TRAIN_FLAGS + ["--train-data", f"{shards}/{{00000..00001}}.tar", "--train-num-samples", "16",
                           "--epochs", "1", "--logs", str(tmp_path / "logs"), "--dataset-resampled", "--name", "r"]
    with pytest.raises(UnreadableShardsError, match=rf"the last 40 samples read had no decodable image with a "
                                                    rf"caption \(2 shards: {shards}/00000.tar, {shards}/00001.tar"):
        clip.train.main(flags)  # drew and dropped samples forever before
    assert not list((tmp_path / "logs").rglob("*.pt"))


def test_mostly_unreadable_shards_skip_batches_and_stop_only_past_the_limit_after_saving(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(28):  # 16 good shards, 12 of corrupt JPEGs: 43 % of the images are unreadable
        write_tar(shards / f"{i:05d}.tar", {f"{i}_{j}.jpg": jpeg() if i < 16 else jpeg()[:300] for j in range(2)})
    flags = TINY + ["--data-source", "wds", "--data-path", str(shards), "--train-num-samples", "16", "--no-export",
                    "--batch-size-per-gpu", "2"]  # 8 iterations per epoch
    dino_train.main(flags + ["--max-bad-fraction", "0.9", "--output-dir", str(tmp_path / "lenient")])
    log = epoch_log(tmp_path / "lenient")
    assert len(log) == 2 and sum(e["skipped_batches"] for e in log) >= 1  # an all-unreadable batch: skipped ...
    assert all(e["skipped_images"] > 0 and 0 < e["bad_fraction"] < 0.9 for e in log)  # ... and counted
    with pytest.raises(SystemExit, match=r"% of the images read in epoch 0 were unreadable, more than "
                                         r"--max-bad-fraction 0.2. The run is saved in .*checkpoint.pth"):
        dino_train.main(flags + ["--max-bad-fraction", "0.2", "--output-dir", str(tmp_path / "strict")])
    assert len(epoch_log(tmp_path / "strict")) == 1
    assert torch.load(tmp_path / "strict" / "checkpoint.pth", weights_only=True)["epoch"] == 1  # saved first



def test_an_epoch_without_one_readable_batch_stops_even_with_no_bad_fraction_limit(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(4):  # valid tars of corrupt JPEGs: every sample is read, none decodes
        write_tar(shards / f"{i:05d}.tar", {f"{i}_{j}.jpg": jpeg()[:300] for j in range(4)})
    flags = TINY + ["--data-source", "wds", "--data-path", str(shards), "--train-num-samples", "8", "--no-export",
                    "--batch-size-per-gpu", "2", "--max-bad-fraction", "1.0", "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=r"no batch of epoch 0 had a readable image .* nothing was written"):
        dino_train.main(flags)  # not an epoch logged with a NaN loss and exit 0
    assert not (tmp_path / "run" / "checkpoint.pth").exists() and not (tmp_path / "run" / "log.txt").exists()

def test_empty_shard_list(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards in .*shards: point --data-path"):
        build_dataset("wds", str(tmp_path / "shards"), transform=None, image_size=32)  # DINO
    with pytest.raises(ValueError, match="--train-data is empty"):
        check_train_data("")  # CLIP
    with pytest.raises(ValueError, match=r"is a folder: give its shards as a brace pattern"):
        check_train_data(str(tmp_path / "shards"))


def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist: check the path"):
        build_dataset("folder", str(missing), transform=None, image_size=32)  # DINO ImageFolder
    with pytest.raises(FileNotFoundError, match=r"1 of 1 shards do not exist, e\.g\. .*nowhere/00000\.tar"):
        build_dataset("wds", f"{missing}/00000.tar", transform=None, image_size=32)  # DINO shards
    with pytest.raises(FileNotFoundError, match=r"2 of 2 shards do not exist, e\.g\. .*nowhere/00000\.tar: check"):
        check_train_data(f"{missing}/{{00000..00001}}.tar")  # CLIP
