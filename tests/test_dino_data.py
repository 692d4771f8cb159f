"""DINO data: corrupt images skipped and counted per epoch, clear errors, image-only shards, digits."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dino import train as dino_train
from dino.augment import DataAugmentationDINO
from dino.data import build_dataset
from repa_ssl.checkpoint import load_checkpoint
from repa_ssl.data import verification_batch
from repa_ssl.data import ImageShards, collate_skipping, count_shard_samples, expand_shards
from repa_ssl.data.write_shards import samples_from_folder, write_shards
from repa_ssl.eval.data import eval_transform

from dino_helpers import TINY, epoch_log, make_images


@pytest.fixture(scope="module")
def images_with_bad_files(tmp_path_factory):
    root = make_images(tmp_path_factory.mktemp("bad"), n_per_class=7)
    (root / "class0" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (root / "class1" / "0.jpg").read_bytes()
    (root / "class1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return root  # 14 good + 2 bad = 16 images: every one is visited each epoch


def test_corrupt_jpegs_are_skipped_and_counted_per_epoch(images_with_bad_files, tmp_path):
    dino_train.main(TINY + ["--data-path", str(images_with_bad_files), "--output-dir", str(tmp_path), "--no-export"])
    log = epoch_log(tmp_path)
    assert [e["skipped_images"] for e in log] == [2, 2]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log)


def test_empty_or_missing_directory_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        dino_train.main(TINY + ["--data-path", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dino_train.main(TINY + ["--data-path", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        dino_train.main(TINY + ["--data-source", "wds", "--data-path", str(tmp_path / "empty"),
                                "--output-dir", str(tmp_path / "o")])


@pytest.fixture(scope="module")
def shards(images_with_bad_files, tmp_path_factory):
    samples = [(p, f"a caption for {p.name}") for p, _ in samples_from_folder(images_with_bad_files)]
    out = tmp_path_factory.mktemp("shards")
    write_shards(samples, out, samples_per_shard=6, progress=False)
    return out


def test_shards_are_read_image_only_with_bad_samples_counted(shards):
    urls = expand_shards(shards)
    assert len(urls) == 3 and count_shard_samples(urls) == 16
    torch.manual_seed(0)
    data = ImageShards(urls, transform=eval_transform(32), shuffle_buffer=4)
    loader = DataLoader(data, batch_size=8, collate_fn=collate_skipping)
    batches = [b for _, b in zip(range(8), loader)]  # an endless stream: 64 draws from 16 samples
    skipped = sum(b.num_skipped for b in batches)
    kept = sum(len(b.data[0]) for b in batches if b.data is not None)
    assert skipped + kept == 64 and skipped > 0 and kept > 0
    assert batches[0].data[0].shape[1:] == (3, 32, 32)


def test_file_urls_name_local_shards(shards):
    # webdataset opens file: URLs as local files: they need no --allow-remote-shards and can be counted
    urls = expand_shards(f"file://{shards}/{{00000..00002}}.tar")
    assert urls == expand_shards(shards) and count_shard_samples(urls) == 16


def test_training_from_shards(shards, tmp_path):
    dino_train.main(TINY + ["--data-source", "wds", "--data-path", str(shards), "--output-dir", str(tmp_path),
                            "--epochs", "1"])
    log = epoch_log(tmp_path)
    assert len(log) == 1 and torch.isfinite(torch.tensor(log[0]["loss"])) and log[0]["skipped_images"] >= 0
    assert (tmp_path / "teacher_fused.safetensors").is_file()  # verified on a batch read from the shards


def test_digits_source_gives_multicrop_views():
    aug = DataAugmentationDINO(local_crops_number=2, global_crop_size=32, local_crop_size=16)
    data = build_dataset("digits", None, aug, image_size=32)
    assert len(data) == 1797
    crops, label = data[0]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2 and label == 0
    batch = verification_batch(build_dataset("digits", None, eval_transform(32), image_size=32), size=4)
    assert batch.shape == (4, 3, 32, 32)


def _pixel_sum(image) -> torch.Tensor:  # identifies each (noisy) test image
    return torch.tensor(float(np.asarray(image, dtype=np.float64).sum()))


def _stream(dataset: ImageShards, num_workers: int, n: int) -> list:
    loader = DataLoader(dataset, batch_size=2, num_workers=num_workers, collate_fn=collate_skipping)
    return [(b.data[0].tolist() if b.data is not None else [], b.num_skipped) for _, b in zip(range(n), loader)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shard_stream_skips_exactly_the_batches_already_trained_on(shards, num_workers):
    data = ImageShards(expand_shards(shards), transform=_pixel_sum, shuffle_buffer=4)
    data.set_epoch(seed=7)
    full = _stream(data, num_workers, 8)
    assert len({tuple(b) for b, _ in full}) > 4  # a random stream ...
    data.set_epoch(seed=7)
    assert _stream(data, num_workers, 8) == full  # ... that set_epoch makes reproducible
    data.set_epoch(seed=7, skip_batches=3, batch_size=2)
    assert _stream(data, num_workers, 5) == full[3:]  # batch i came from worker i % num_workers


def test_mid_epoch_resume_from_shards_is_exact(shards, tmp_path, monkeypatch, dino_iterations, caplog):
    args = TINY + ["--data-source", "wds", "--data-path", str(shards), "--no-export", "--saveckp-iters", "3"]
    dino_train.main(args + ["--output-dir", str(tmp_path / "full")])
    original = dino_train.DINOStep.__call__

    def interrupted(self, crops, epoch, it):
        if it == 6:  # epoch 1 (4 iterations per epoch), after the iteration-6 checkpoint
            raise KeyboardInterrupt
        return original(self, crops, epoch, it)

    monkeypatch.setattr(dino_train.DINOStep, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dino_train.main(args + ["--output-dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(dino_train.DINOStep, "__call__", original)
    dino_iterations.clear()
    with caplog.at_level(logging.INFO):
        dino_train.main(args + ["--output-dir", str(tmp_path / "resumed")])
    assert dino_iterations == [6, 7]  # it resumed after the iteration-6 checkpoint ...
    assert "reading past (without decoding) the 8 images of this epoch" in caplog.text
    full, resumed = (load_checkpoint(tmp_path / d / "checkpoint.pth") for d in ("full", "resumed"))
    for key, value in full["teacher"].items():  # ... and saw the same images with the same augmentations
        torch.testing.assert_close(resumed["teacher"][key], value, rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def coloured_shards(tmp_path_factory):
    """Six shards of four images each; every image of shard i is filled with the value 10 * i."""
    from PIL import Image

    root = tmp_path_factory.mktemp("coloured")
    for i in range(24):
        Image.new("RGB", (8, 8), (10 * (i // 4),) * 3).save(root / f"{i:02d}.png")
    out = tmp_path_factory.mktemp("coloured_shards")
    write_shards([(p, "a caption") for p, _ in samples_from_folder(root)], out, samples_per_shard=4, progress=False)
    return out


def _shards_per_batch(dataset, batches: int = 4, batch_size: int = 8) -> list[int]:
    stream = iter(dataset)
    return [len({next(stream)[0] for _ in range(batch_size)}) for _ in range(batches)]


def test_a_batch_draws_from_several_shard_streams(coloured_shards):
    """Without a shuffle buffer, each worker still reads several shards at once and takes their samples in turn:
    a batch mixes shards, so BatchNorm's statistics do not see one shard's correlated samples."""
    def shard_of(image):
        return image.getpixel((0, 0))[0] // 10

    for streams, expected in ((1, 2), (4, 4)):
        data = build_dataset("wds", str(coloured_shards), shard_of, 32, shuffle_buffer=1, shard_streams=streams)
        data.set_epoch(seed=3)
        per_batch = _shards_per_batch(data)
        # one stream: 8 samples = two whole shards; four: each batch holds two samples of each of four draws
        assert max(per_batch) <= expected if streams == 1 else min(per_batch) >= 3, (streams, per_batch)


def test_shuffle_buffer_defaults_and_flags():
    """open_clip's sample shuffle by default (5000, yielding from 1000); both settings on dino.train's command line."""
    data = ImageShards(["a.tar"])
    assert (data.shuffle_buffer, data.shuffle_initial, data.streams) == (5000, 1000, 4)
    cfg = dino_train.DINOConfig(**vars(dino_train.get_args_parser().parse_args(
        ["--shuffle-buffer", "300", "--shard-streams", "2"])))
    assert (cfg.shuffle_buffer, cfg.shard_streams) == (300, 2)
    assert dino_train.DINOConfig().shuffle_buffer == 5000
    with pytest.raises(ValueError, match="at least 1"):
        ImageShards(["a.tar"], streams=0)
