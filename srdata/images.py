"""Turning one source file into the 8-bit RGB image that gets packed, or a reason it cannot be.

Pillow reads the sources: it applies EXIF orientation, reads the header before the pixels
(so a decompression bomb is refused before it is decoded) and knows every mode users' folders
hold (grayscale, palette, RGBA/LA, CMYK, 16-bit). OpenCV's INTER_AREA does the downscale.
"""
from __future__ import annotations

import os
import stat
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "BMP": "BMP", "TIFF": "TIFF",
           "WEBP": "WebP"}
FITS = ("short", "long", "none")


class Skip(Exception):
    """This file cannot be packed; the message is the reason recorded in the manifest."""


def target_size(height: int, width: int, size: int, fit: str) -> tuple[int, int]:
    """Output (height, width): ``fit`` side becomes ``size``, aspect kept, never upscaled."""
    if fit == "none":
        return height, width
    side = min(height, width) if fit == "short" else max(height, width)
    if side <= size:
        return height, width
    scale = size / side
    return max(1, round(height * scale)), max(1, round(width * scale))


def has_alpha(im: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha band or a transparent colour)."""
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """Any Pillow mode to HxWx3 uint8 RGB; transparency is composited on white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        # 16-bit data keeps its top byte, as Pillow does for 16-bit RGB; 32-bit ints clip
        a = (a >> 8) if (im.mode.startswith("I;16") or a.max() > 255) else a
        return np.repeat(np.clip(a, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im, np.float64)
        a = a * 255 if a.max() <= 1.0 else a
        return np.repeat(np.clip(np.rint(a), 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if has_alpha(im):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def load_rgb(path: bytes, max_pixels: int) -> np.ndarray:
    """Read ``path`` as HxWx3 uint8 RGB, upright; raises Skip with the reason."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Skip("broken symlink" if os.path.islink(path) else "file vanished") from None
    except OSError as e:
        raise Skip(f"unreadable: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Skip("not a regular file")
    if st.st_size == 0:
        raise Skip("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format not in FORMATS:
                    raise Skip(f"unsupported format {im.format}; packs "
                               f"{', '.join(sorted(set(FORMATS.values())))}")
                w, h = im.size
                if w * h > max_pixels:
                    raise Skip(f"too large: {w}x{h} = {w * h:,} px exceeds --max-pixels "
                               f"{max_pixels:,}")
                im.load()  # decode now: truncation surfaces here, not later
                im = ImageOps.exif_transpose(im)
                return _to_rgb8(im)
    except Skip:
        raise
    except Image.UnidentifiedImageError:
        raise Skip("not an image (no decoder recognises it)") from None
    except PermissionError as e:
        raise Skip(f"unreadable: {e.strerror}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Skip(f"too large: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise Skip(f"corrupt or truncated: {e}") from None


def resize(rgb: np.ndarray, size: int, fit: str) -> np.ndarray:
    h, w = target_size(rgb.shape[0], rgb.shape[1], size, fit)
    if (h, w) == rgb.shape[:2]:
        return rgb
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
