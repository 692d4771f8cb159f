"""Users turn their own images + captions into LAION-layout webdataset shards."""
import os
import tarfile
import threading

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clip.patches import SkipCounter, _keep
from repa_ssl.data import ImageShards
from repa_ssl.data.write_shards import main, samples_from_csv, samples_from_folder, write_shards


def _make_images(root, n):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(root / f"img{i}.jpg")
        if i != 1:  # image 1 has no caption
            (root / f"img{i}.txt").write_text(f"a red square number {i}")


def test_folder_to_shards_in_img2dataset_layout(tmp_path):
    _make_images(tmp_path / "imgs", 5)
    shards = write_shards(samples_from_folder(tmp_path / "imgs"), tmp_path / "shards", samples_per_shard=2,
                          progress=False)
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    names = tarfile.open(shards[0]).getnames()
    assert names == ["000000000.jpg", "000000000.json", "000000000.txt", "000000001.jpg", "000000001.json"]
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False).decode("pil"))
    assert len(samples) == 5
    assert samples[0]["txt"] == "a red square number 0" and "txt" not in samples[1]
    assert samples[0]["jpg"].size == (16, 16) and samples[0]["json"]["key"] == "000000000"


def test_csv_source_and_cli(tmp_path):
    _make_images(tmp_path / "imgs", 2)
    (tmp_path / "captions.csv").write_text("path,caption\nimgs/img0.jpg,first\nimgs/img1.jpg,second\n")
    assert [c for _, c in samples_from_csv(tmp_path / "captions.csv")] == ["first", "second"]
    main(["--csv", str(tmp_path / "captions.csv"), "--output", str(tmp_path / "out")])
    assert (tmp_path / "out" / "00000.tar").is_file()


def test_bad_sources_are_clear_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("file,text\nx.jpg,y\n")
    with pytest.raises(ValueError, match="'path' and 'caption'"):
        samples_from_csv(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        samples_from_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no samples"):
        write_shards(samples_from_folder(tmp_path / "empty"), tmp_path / "out")


def test_files_outside_the_input_folder_are_refused_unless_asked(tmp_path):
    _make_images(tmp_path / "imgs", 2)
    (tmp_path / "private").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "private" / "secret.jpg")
    (tmp_path / "imgs" / "link.jpg").symlink_to(tmp_path / "private" / "secret.jpg")
    with pytest.raises(PermissionError, match="lead outside .*--allow-outside"):
        samples_from_folder(tmp_path / "imgs")
    assert len(samples_from_folder(tmp_path / "imgs", allow_outside=True)) == 3
    for row in ("/etc/passwd", "../private/secret.jpg"):
        (tmp_path / "imgs" / "c.csv").write_text(f"path,caption\nimg0.jpg,ok\n{row},stolen\n")
        with pytest.raises(PermissionError, match="--allow-outside"):
            samples_from_csv(tmp_path / "imgs" / "c.csv")


def test_fifos_are_skipped_never_opened(tmp_path):
    _make_images(tmp_path / "imgs", 2)
    fifo = tmp_path / "imgs" / "fifo.jpg"
    os.mkfifo(fifo)
    done = []
    worker = threading.Thread(daemon=True, target=lambda: done.append(write_shards(
        samples_from_folder(tmp_path / "imgs"), tmp_path / "out", progress=False)))
    worker.start()
    worker.join(20)
    if worker.is_alive():  # blocked opening the FIFO: release it before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert done, "writing shards hung on a FIFO"
    assert len(list(wds.WebDataset([str(p) for p in done[0]], shardshuffle=False))) == 2


def test_arguments_are_validated(tmp_path, capsys):
    _make_images(tmp_path / "imgs", 2)
    with pytest.raises(SystemExit) as e:
        main(["--images", str(tmp_path / "imgs"), "--output", str(tmp_path / "out"), "--samples-per-shard", "-1"])
    assert e.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="positive integer"):
        write_shards(samples_from_folder(tmp_path / "imgs"), tmp_path / "out", samples_per_shard=0)


def test_excel_bom_csv_is_read_and_non_utf8_csv_is_a_clear_error(tmp_path):
    _make_images(tmp_path / "imgs", 2)
    (tmp_path / "excel.csv").write_bytes("path,caption\nimgs/img0.jpg,café\n".encode("utf-8-sig"))
    assert [c for _, c in samples_from_csv(tmp_path / "excel.csv")] == ["café"]
    (tmp_path / "latin1.csv").write_bytes("path,caption\nimgs/img0.jpg,ok\nimgs/img1.jpg,café\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"latin1.csv, line 3: not UTF-8 .*CSV UTF-8.*iconv"):
        samples_from_csv(tmp_path / "latin1.csv")


def test_a_non_empty_output_folder_is_refused_and_overwrite_replaces_only_shards(tmp_path):
    _make_images(tmp_path / "imgs", 5)
    samples = samples_from_folder(tmp_path / "imgs")
    write_shards(samples, tmp_path / "out", samples_per_shard=1, progress=False)
    (tmp_path / "out" / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        write_shards(samples[:2], tmp_path / "out", progress=False)
    write_shards(samples[:2], tmp_path / "out", progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.tar", "notes.md"]
    assert len(list(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False))) == 2


def test_other_formats_become_png_that_dino_and_clip_both_read(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "imgs" / "a.bmp")
    (tmp_path / "imgs" / "a.txt").write_text("a red bmp")
    shards = write_shards(samples_from_folder(tmp_path / "imgs"), tmp_path / "out", progress=False)
    assert tarfile.open(shards[0]).getnames() == ["000000000.json", "000000000.png", "000000000.txt"]
    (sample,) = wds.WebDataset([str(shards[0])], shardshuffle=False).decode("pil")
    assert _keep(SkipCounter(), sample)  # CLIP's filter
    assert sample["png"].getpixel((0, 0)) == (200, 10, 10)
    image, _ = next(iter(ImageShards([str(shards[0])], transform=np.asarray)))  # DINO's reader
    assert image.shape == (16, 16, 3)


def test_an_interrupted_shard_leaves_neither_a_partial_shard_nor_a_temporary_file(tmp_path, monkeypatch):
    import repa_ssl.data.write_shards as ws

    _make_images(tmp_path / "imgs", 4)
    samples = samples_from_folder(tmp_path / "imgs")
    read, calls = ws._read_regular, []

    def interrupted(path):  # Ctrl-C while the second image of the second shard is read
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return read(path)

    monkeypatch.setattr(ws, "_read_regular", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_shards(samples, tmp_path / "shards", samples_per_shard=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00000.tar"]  # complete, nothing else
    assert len(list(wds.WebDataset(str(tmp_path / "shards" / "00000.tar"), shardshuffle=False))) == 2
