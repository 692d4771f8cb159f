"""Users turn their own images + captions into LAION-layout webdataset shards."""
import tarfile

import pytest
import webdataset as wds
from PIL import Image

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
    assert names == ["000000000.jpg", "000000000.txt", "000000000.json", "000000001.jpg", "000000001.json"]
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
