import os

import numpy as np
import pytest

from srdata.pack import PackConfig
from srdata.samples import synthetic_image, write_image

# Small images keep the suite fast: pack to 96 px short side, keep anything >= 48 px.
SMALL = dict(size=96, min_size=48, workers=1)


@pytest.fixture
def small_cfg():
    return lambda **kw: PackConfig(**(SMALL | kw))


def make_images(root, sizes, exts=(".png", ".jpg"), seed=0):
    paths = []
    for i, (h, w) in enumerate(sizes):
        ext = exts[i % len(exts)]
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"im{i:03d}{ext}"
        write_image(p, synthetic_image(h, w, seed + i))
        paths.append(p)
    return paths


@pytest.fixture
def image_dir(tmp_path):
    """Six varied images: portrait, landscape, one already small enough not to resize."""
    root = tmp_path / "images"
    make_images(root, [(120, 160), (200, 130), (96, 96), (150, 150), (100, 250), (180, 140)])
    return root


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def corrupt_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def no_root():
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
