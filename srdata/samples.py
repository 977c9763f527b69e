"""Synthetic photo-like images, so the demo and the tests need no download.

Each image mixes smooth gradients, hard-edged shapes, fine stripes and sensor-like noise:
the edges and textures super-resolution has to recover, at sizes and aspect ratios a user's
folder would hold.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """An HxWx3 uint8 RGB image, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[:, :, c] = 128 + 60 * np.sin(a * x / 37 + b * y / 53 + p * 6)
    for _ in range(int(rng.integers(4, 12))):
        color = rng.integers(0, 256, 3).tolist()
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(4, max(5, min(height, width) // 3)))
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), r, color, -1, lineType=cv2.LINE_AA)
        else:
            cv2.rectangle(img, (cx - r, cy - r // 2), (cx + r, cy + r // 2), color, -1)
    period = rng.uniform(3, 9)
    stripes = 40 * (np.sin(2 * np.pi * (x + y * rng.uniform(-1, 1)) / period) > 0)
    mask = (x > width * rng.uniform(0, 0.5)) & (y > height * rng.uniform(0, 0.5))
    img += (stripes * mask)[:, :, None]
    img = cv2.GaussianBlur(img, (0, 0), 0.7)  # optics: real photos are band-limited
    img += rng.normal(0, 1.5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_image(ext: str, rgb: np.ndarray, quality: int = 95) -> bytes:
    """An RGB array as the bytes of a ``.jpg`` (at ``quality``) or ``.png`` file."""
    ext = ext.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[:, :, ::-1]), params)
    assert ok, ext
    return buf.tobytes()


def write_image(path: str | os.PathLike, rgb: np.ndarray, quality: int = 95) -> None:
    Path(path).write_bytes(encode_image(Path(path).suffix, rgb, quality))


def make_folder(root: str | os.PathLike, count: int, min_side: int = 320,
                max_side: int = 768, seed: int = 0) -> list[Path]:
    """Write ``count`` images (JPEG, PNG, some in sub-folders) under ``root``, only as new
    files: a name that exists is refused (ValueError) before anything is written."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    plan = []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        ext = ".png" if i % 5 == 0 else ".jpg"
        plan.append((root / f"set{i % 3}" / f"img{i:04d}{ext}", h, w, seed * 100_003 + i))
    taken = [p for p, *_ in plan if os.path.lexists(p)]
    if taken:
        raise ValueError(f"{taken[0]} exists ({len(taken)} of the {count} names are taken); "
                         "samples are written only as new files: choose a new or empty folder")
    for path, h, w, s in plan:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as f:  # one made since the check is refused, not overwritten
            f.write(encode_image(path.suffix, synthetic_image(h, w, s)))
    return [p for p, *_ in plan]
