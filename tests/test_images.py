import io
import os

import numpy as np
import pytest
from PIL import Image

from srdata import images
from srdata.images import Skip, load_rgb, target_size

CAP = 10_000_000


@pytest.mark.parametrize("hw,size,fit,expected", [
    ((1000, 2000), 512, "short", (512, 1024)),
    ((2000, 1000), 512, "short", (1024, 512)),
    ((1000, 2000), 512, "long", (256, 512)),
    ((300, 400), 512, "short", (300, 400)),  # never upscale
    ((300, 4000), 512, "long", (38, 512)),
    ((1000, 2000), 512, "none", (1000, 2000)),
    ((513, 700), 512, "short", (512, 699)),
])
def test_target_size(hw, size, fit, expected):
    assert target_size(*hw, size, fit) == expected


def test_resize_uses_area_filter_and_keeps_small_images():
    img = np.zeros((40, 40, 3), np.uint8)
    img[::2] = 255  # 1-px stripes average to grey under an area filter
    out = images.resize(img, 20, "short")
    assert out.shape == (20, 20, 3) and np.all(np.abs(out.astype(int) - 128) <= 1)
    assert images.resize(img, 64, "short") is img


def save(tmp_path, name, im, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return os.fsencode(p)


def test_rgb_png_is_read_exactly(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
    got = load_rgb(save(tmp_path, "x.png", Image.fromarray(a)), CAP)
    assert got.dtype == np.uint8 and np.array_equal(got, a)


def test_grayscale_becomes_rgb(tmp_path):
    g = np.arange(600, dtype=np.uint8).reshape(20, 30)
    got = load_rgb(save(tmp_path, "g.png", Image.fromarray(g)), CAP)
    assert got.shape == (20, 30, 3) and np.array_equal(got[:, :, 1], g)


def test_16bit_gray_keeps_top_byte(tmp_path):
    g = (np.arange(600, dtype=np.uint16) * 100).reshape(20, 30)
    got = load_rgb(save(tmp_path, "g16.png", Image.fromarray(g)), CAP)
    assert got.dtype == np.uint8 and np.array_equal(got[:, :, 0], (g >> 8).astype(np.uint8))


def test_16bit_rgb(tmp_path):
    import cv2
    a = np.random.default_rng(1).integers(0, 65536, (10, 12, 3)).astype(np.uint16)
    p = tmp_path / "rgb16.png"
    cv2.imwrite(str(p), a[:, :, ::-1])
    got = load_rgb(os.fsencode(p), CAP)
    assert np.array_equal(got, (a >> 8).astype(np.uint8))


def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 200
    a[:2, :, 3] = 255  # top opaque red-ish, bottom fully transparent
    got = load_rgb(save(tmp_path, "a.png", Image.fromarray(a, "RGBA")), CAP)
    assert (got[:2] == [200, 0, 0]).all() and (got[2:] == 255).all()


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    got = load_rgb(save(tmp_path, "p.png", im, transparency=1), CAP)
    assert (got == 255).all()


def test_cmyk_jpeg(tmp_path):
    im = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    got = load_rgb(save(tmp_path, "c.jpg", im, quality=95), CAP)
    assert got.shape == (8, 16, 3)
    assert got[..., 0].mean() > 200 and got[..., 1].mean() < 60


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    got = load_rgb(save(tmp_path, "o.jpg", Image.fromarray(a), exif=exif, quality=100), CAP)
    assert got.shape == (20, 10, 3)
    assert got[:8].mean() > 200 and got[12:].mean() < 50  # white half is now on top


@pytest.mark.parametrize("name,content,reason", [
    ("empty.jpg", b"", "empty file"),
    ("notes.txt", b"hello, not a picture", "not an image"),
    ("fake.jpg", b"\xff\xd8\xff\xe0 garbage", "corrupt or truncated"),
])
def test_bad_bytes_are_skipped_with_reason(tmp_path, name, content, reason):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(Skip, match=reason):
        load_rgb(os.fsencode(p), CAP)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(Skip, match="corrupt or truncated"):
        load_rgb(os.fsencode(p), CAP)


def test_pixel_cap_refuses_before_decoding(tmp_path):
    p = save(tmp_path, "big.png", Image.new("RGB", (200, 100)))
    with pytest.raises(Skip, match="too large: 200x100"):
        load_rgb(p, 19_999)


def test_unsupported_format(tmp_path):
    with pytest.raises(Skip, match="unsupported format GIF"):
        load_rgb(save(tmp_path, "x.gif", Image.new("P", (8, 8))), CAP)


def test_broken_symlink_fifo_and_unreadable(tmp_path, request):
    link = tmp_path / "gone.jpg"
    link.symlink_to(tmp_path / "missing.jpg")
    with pytest.raises(Skip, match="broken symlink"):
        load_rgb(os.fsencode(link), CAP)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(Skip, match="not a regular file"):
        load_rgb(os.fsencode(fifo), CAP)


def test_permission_denied(tmp_path, no_root):
    p = save(tmp_path, "locked.png", Image.new("RGB", (8, 8)))
    os.chmod(p, 0)
    with pytest.raises(Skip, match="unreadable"):
        load_rgb(p, CAP)
