"""Validation metrics (PSNR and SSIM on Y) and the sample grid, following BasicSR.

Super-resolution papers, BasicSR and Real-ESRGAN report scores under one set of conventions,
and a number computed any other way is not comparable with theirs (differences of 0.1-0.5 dB
are common, as big as the gains being claimed). So, as BasicSR's ``calculate_psnr`` and
``calculate_ssim`` with ``test_y_channel=True``:

* Quantization: images are clamped to [0, 1], scaled to 0..255 and rounded first, as
  ``tensor2img`` does before a result is saved; scores are of the image a user would get.
* Y channel: ITU-R BT.601 luma, ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` on
  0..255 values (``rgb2ycbcr(img, y_only=True)``), so Y lies in [16, 235]; colour shifts
  the eye barely sees do not dominate the score.
* Border crop: ``border`` pixels (by convention the scale factor) are dropped from each edge
  of both images, where upscaling has no neighbours to work from.
* PSNR with data range 255; SSIM with an 11-tap Gaussian window of sigma 1.5, population
  covariances and the mean over the window-valid region (Wang et al. 2004), computed by
  scikit-image rather than by hand.

Inputs are NCHW RGB float tensors in [0, 1], of any float dtype, memory format and device.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from srdata.format import atomic_file

# BT.601 weights for R, G, B on 0..255 values, as BasicSR's rgb2ycbcr (which sees BGR
# images from OpenCV and so lists them reversed).
_Y_WEIGHTS = (65.481, 128.553, 24.966)
# Gaussian SSIM with sigma 1.5 truncated at 3.5 sigma: an 11 x 11 window, which scikit-image
# needs to fit inside the image.
_SSIM_WINDOW = 11
GAP = 4
# grid tiles are enlarged (nearest, whole multiples) to at least this side, so a 32-64 px
# validation patch is big enough to judge by eye
MIN_TILE = 192
LABEL_H = 28  # px: the strip above the grid that names its columns


def _check_images(name: str, t: torch.Tensor) -> None:
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"{name} must be an N x 3 x H x W RGB tensor, got shape {tuple(t.shape)}")


def quantize(t: torch.Tensor) -> torch.Tensor:
    """``t`` clamped to [0, 1] and rounded to 0..255 levels, as float64 on ``t``'s device."""
    # float32 before scaling and rounding, as tensor2img, so ties round the same way it does.
    return t.detach().float().clamp(0, 1).mul(255.0).round().double()


def rgb_to_y(t255: torch.Tensor) -> torch.Tensor:
    """BT.601 luma (N x H x W float64 in [16, 235]) of N x 3 x H x W RGB on 0..255."""
    _check_images("t255", t255)
    w = torch.tensor(_Y_WEIGHTS, dtype=torch.float64, device=t255.device)
    return torch.einsum("nchw,c->nhw", t255.double(), w) / 255.0 + 16.0


def _pair(sr: torch.Tensor, hr: torch.Tensor, border: int,
          convert=lambda t: t) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images quantized, passed through ``convert`` and border-cropped, after the
    checks every metric shares."""
    _check_images("sr", sr)
    _check_images("hr", hr)
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr differ in shape: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    h, w = hr.shape[-2:]
    if min(h, w) - 2 * border < 1:
        raise ValueError(f"the {h}x{w} validation image is too small for a border of {border}")
    a, b = (convert(quantize(t.to(hr.device)))[..., border:h - border, border:w - border]
            for t in (sr, hr))
    return a, b


def _y_pair(sr: torch.Tensor, hr: torch.Tensor, border: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized, border-cropped Y of both images."""
    return _pair(sr, hr, border, rgb_to_y)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of 0..255 images, float64 on the CPU; inf where identical."""
    mse = (a - b).square().mean(dim=tuple(range(1, a.ndim)))
    psnr = 10.0 * torch.log10(255.0 ** 2 / mse)
    # Explicit rather than relying on x / 0 = inf: BasicSR returns inf there too.
    return torch.where(mse == 0, torch.inf, psnr).cpu()


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, border: int) -> torch.Tensor:
    """Per-image PSNR (dB) on Y, shape (N,), float64 on the CPU; inf where identical."""
    return _psnr(*_y_pair(sr, hr, border))


def psnr_rgb(sr: torch.Tensor, hr: torch.Tensor, border: int) -> torch.Tensor:
    """Per-image PSNR (dB) over the R, G and B values, shape (N,), float64 on the CPU: what
    BasicSR's training logs report (``calculate_psnr`` with ``test_y_channel=False``)."""
    return _psnr(*_pair(sr, hr, border))


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, border: int) -> torch.Tensor:
    """Per-image SSIM on Y, shape (N,), float64 on the CPU."""
    h, w = hr.shape[-2:]
    if min(h, w) - 2 * border < _SSIM_WINDOW:
        # Caught here: scikit-image's own message speaks of win_size and channel_axis,
        # which mean nothing to someone who chose --patch and --scale.
        raise ValueError(f"the {h}x{w} validation image is too small for SSIM with a border "
                         f"of {border}: it needs at least {_SSIM_WINDOW} px after cropping "
                         f"{border} px from each edge; use a larger --patch")
    y_sr, y_hr = (y.cpu().numpy() for y in _y_pair(sr, hr, border))
    scores = [structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255)
              for a, b in zip(y_sr, y_hr)]
    return torch.tensor(scores, dtype=torch.float64)


def bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The bicubic upscale of ``lr``: the baseline every SR result is compared against."""
    return F.interpolate(lr.float(), scale_factor=scale, mode="bicubic",
                         align_corners=False).clamp(0, 1)


def _to_uint8_hwc(t: torch.Tensor) -> np.ndarray:
    """N x H x W x 3 uint8, rounded as the metrics see the images."""
    return quantize(t).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _grid(tiles: list[np.ndarray]) -> np.ndarray:
    """Tiles (columns) of N x H x W x 3 uint8 laid out a row per image, GAP px white apart."""
    n, h, w, _ = tiles[0].shape
    cols = len(tiles)
    out = np.full((n * h + (n - 1) * GAP, cols * w + (cols - 1) * GAP, 3), 255, np.uint8)
    for c, tile in enumerate(tiles):
        for r in range(n):
            y, x = r * (h + GAP), c * (w + GAP)
            out[y:y + h, x:x + w] = tile[r]
    return out


def _labelled(grid: np.ndarray, labels: tuple[str, ...], tile_w: int) -> np.ndarray:
    """The grid under a white strip naming each column, so a grid opened alone (in a file
    browser, in TensorBoard) says which column is the model's."""
    head = np.full((LABEL_H, grid.shape[1], 3), 255, np.uint8)
    for c, text in enumerate(labels):
        cv2.putText(head, text, (c * (tile_w + GAP) + 6, LABEL_H - 9),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([head, grid])


def save_grid(path, lr: torch.Tensor, bic: torch.Tensor, sr: torch.Tensor,
              hr: torch.Tensor, max_rows: int = 4,
              labels: tuple[str, ...] = ("LR", "bicubic", "SR", "HR")) -> Path:
    """A PNG at ``path``: a row per image (up to ``max_rows``), LR | bicubic | SR | HR,
    tiles enlarged by nearest neighbour to at least MIN_TILE px, under a strip of
    LABEL_H px naming the columns (``labels``)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    for name, t in (("lr", lr), ("bic", bic), ("sr", sr), ("hr", hr)):
        _check_images(name, t)
    n = min(max_rows, len(lr), len(bic), len(sr), len(hr))
    size = tuple(hr.shape[-2:])
    for name, t in (("bic", bic), ("sr", sr)):
        if tuple(t.shape[-2:]) != size:
            raise ValueError(f"{name} is {tuple(t.shape[-2:])}, hr is {size}: tiles must match")
    # Nearest keeps LR's pixels visible as blocks, so the columns line up pixel for pixel.
    lr_up = F.interpolate(lr[:n].float(), size=size, mode="nearest")
    zoom = -(-MIN_TILE // min(size))  # whole pixels: nearest keeps every pixel a square
    tiles = [_to_uint8_hwc(t[:n]) for t in (lr_up, bic, sr, hr)]
    if zoom > 1:
        tiles = [t.repeat(zoom, axis=1).repeat(zoom, axis=2) for t in tiles]
    grid = _labelled(_grid(tiles), labels, tiles[0].shape[2])
    ok, buf = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"OpenCV could not encode the {grid.shape} sample grid as PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A viewer or a sync job reading the file mid-write sees the old grid, never half a PNG.
    with atomic_file(path, "wb") as f:
        f.write(buf.tobytes())
    return path
