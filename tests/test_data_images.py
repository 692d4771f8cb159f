"""Every image mode a user's data holds becomes RGB; unreadable files are skipped and counted."""
import io

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from repa_ssl.data import BadImageError, RobustImageFolder, collate_skipping, load_rgb


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16"])
def test_modes_become_rgb(mode):
    if mode == "I;16":
        img = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    else:
        img = Image.new("RGB", (4, 4), (200, 100, 50)).convert(mode)
    out = load_rgb(_png_bytes(img))
    assert out.mode == "RGB" and out.size == (4, 4)
    if mode == "I;16":
        assert out.getpixel((0, 0)) == (255, 255, 255)  # full-scale 16-bit is white, not clipped garbage


def test_cmyk_jpeg_becomes_rgb():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).convert("CMYK").save(buf, format="JPEG")
    assert load_rgb(buf.getvalue()).mode == "RGB"


def test_transparent_pixels_composite_on_white():
    img = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert load_rgb(_png_bytes(img)).getpixel((0, 0)) == (255, 255, 255)


def test_bad_bytes_are_named_errors():
    with pytest.raises(BadImageError, match="zero-byte"):
        load_rgb(b"", name="a.jpg")
    with pytest.raises(BadImageError, match="b.jpg: cannot decode"):
        load_rgb(b"not an image", name="b.jpg")


def test_folder_skips_and_counts_corrupt_images(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "b" / "empty.png").write_bytes(b"")
    data = RobustImageFolder(tmp_path, transform=transforms.ToTensor())
    loader = DataLoader(data, batch_size=4, collate_fn=collate_skipping, num_workers=1)
    batches = list(loader)
    assert sum(b.num_skipped for b in batches) == 2
    assert sum(len(b.data[1]) for b in batches if b.data is not None) == 6


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RobustImageFolder(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        RobustImageFolder(tmp_path / "empty")


def test_truncated_jpeg_is_refused_not_half_decoded():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    with pytest.raises(BadImageError, match="cannot decode"):
        load_rgb(buf.getvalue()[: len(buf.getvalue()) // 2], name="cut.jpg")


def test_verification_batch_skips_bad_samples_and_never_loops_forever():
    import itertools

    import torch

    from repa_ssl.data import verification_batch

    good = (torch.zeros(3, 4, 4), 0)
    batch = verification_batch(iter([None, good, None, good, good]), size=2)
    assert batch.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="no decodable images in shards"):
        verification_batch(itertools.repeat(None), size=2, source="shards")  # an endless stream of bad samples


def test_pixel_budget_is_checked_from_the_header_and_can_be_raised(monkeypatch, tmp_path):
    import importlib.util

    from repa_ssl.data import images

    data = _png_bytes(Image.new("L", (20, 10)))
    with pytest.raises(BadImageError, match=r"a.png: 20x10 L image \(200 pixels\) is above the budget of 199 pixels"):
        load_rgb(data, name="a.png", max_pixels=199)
    assert load_rgb(data, max_pixels=200).size == (20, 10)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image above the budget"))
    with pytest.raises(BadImageError, match="budget"):
        load_rgb(data, max_pixels=199)  # refused before decoding
    monkeypatch.undo()
    # REPA_SSL_MAX_IMAGE_PIXELS sets the default, and raises PIL's own limit with it (a fresh copy of the module)
    monkeypatch.setenv("REPA_SSL_MAX_IMAGE_PIXELS", "300000000")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    spec = importlib.util.spec_from_file_location("images_copy", images.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.MAX_IMAGE_PIXELS == 300_000_000 == Image.MAX_IMAGE_PIXELS
    assert images.MAX_IMAGE_PIXELS == 64_000_000
    for bad in ("1e8", "0"):  # a clear error naming the variable, not int()'s "invalid literal"
        monkeypatch.setenv("REPA_SSL_MAX_IMAGE_PIXELS", bad)
        with pytest.raises(ValueError, match=f"REPA_SSL_MAX_IMAGE_PIXELS={bad!r} is not a positive whole number"):
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
