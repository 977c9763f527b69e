"""LR degradations: MATLAB-style bicubic, and Real-ESRGAN's second-order degradation.

``bicubic_downscale`` makes LR as DIV2K/Set5 were made: MATLAB ``imresize(hr, 1/s)``
(Keys cubic, a = -0.5, the kernel widened by s when shrinking, symmetric borders).

The Real-ESRGAN degradation is split in three, so that the seeded sampler can decide every
random number and both loaders apply the same degradation to a sample:

- ``srdata.degrade_params`` (numpy): ``REALESRGAN_X4PLUS``, the one table of ranges and
  probabilities (``RealESRGANConfig``), the values of Real-ESRGAN's
  ``train_realesrnet_x4plus.yml``, and ``sample_params(rng, n)``, every random parameter of
  ``n`` samples as plain numpy arrays;
- ``make_kernels`` (numpy) and ``realesrgan_degrade`` (torch, on the tensor's device): apply
  them. ``srdata/dali_degrade.py`` is the same graph in DALI.

As theirs, with USM on (their ``gt_usm``, both x4plus stages) the HR is sharpened first
(``usm_sharpen``, BasicSR's ``USMSharp``); the sharpened HR is what is degraded (unrounded,
as theirs) and what the model is trained against (rounded to grey levels by the loaders).

Where we differ from Real-ESRGAN's training step (``RealESRNetModel.feed_data``):
every parameter is drawn per sample (they draw resize, noise type and stage order once per
batch and rely on a 180-sample pool for variety); JPEG qualities are whole numbers and the
reference encodes with OpenCV (libjpeg, 4:2:0) instead of their differentiable DiffJPEG;
gray Gaussian noise is drawn per sample (theirs shares one pattern across the batch); resize
takes explicit output sizes, ``floor(side * factor)``, so DALI can be given the same sizes.
Kept on purpose:

- no 180-sample pool (``queue_size``): it exists to mix, within a batch, samples degraded
  with different per-batch draws; ours draws per sample, so every batch is mixed already,
  and a pool would carry samples across batches and epochs, which the two loaders' equal
  samples and an exact resume cannot have.
- the HR patch is sharpened and degraded as cut, not a 400-px crop degraded and then cut
  to the patch: 2.4x fewer pixels to degrade at 256 px, and the crop is the sampler's. The
  cost is context at the patch's edges: within ~2 sigma (16 px) of them the USM sees the
  patch mirrored where theirs sees more image (sharpened 256-px patches of three
  scikit-image photos: 0.19 grey levels apart on average, up to 40 at edge pixels, 4
  beyond 16 px), the blur kernels within 10 px; and the JPEG block grids start at the
  patch's corner, where theirs fall anywhere relative to it.
"""
from __future__ import annotations

import math
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .degrade_params import REALESRGAN_X4PLUS, RESIZE_MODES, SINC, RealESRGANConfig
from .sampler import DEGRADATIONS, nn_downscale

# ------------------------------------------------------------------ MATLAB bicubic


def cubic(x, a: float = -0.5):
    """Keys' cubic convolution kernel; MATLAB's ``imresize`` uses a = -0.5."""
    x = np.abs(np.asarray(x, np.float64))
    return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def matlab_contributions(in_len: int, out_len: int, scale: float):
    """MATLAB ``imresize``'s ``contributions()``: 1-based input indices (before the
    symmetric border fold) and normalised weights, one row per output sample."""
    width = 4.0 / scale if scale < 1 else 4.0  # antialiasing widens the kernel when shrinking
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel x's centre in input coordinates
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    dist = u[:, None] - idx
    w = scale * cubic(dist * scale) if scale < 1 else cubic(dist)
    w /= w.sum(1, keepdims=True)
    return idx.astype(np.int64), w


def matlab_resize_matrix(in_len: int, out_len: int, scale: float) -> np.ndarray:
    """The (out_len, in_len) float64 matrix of one ``imresize`` pass, borders folded."""
    idx, w = matlab_contributions(in_len, out_len, scale)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])  # symmetric
    cols = mirror[(idx - 1) % (2 * in_len)]
    m = np.zeros((out_len, in_len))
    np.add.at(m, (np.repeat(np.arange(out_len), idx.shape[1]), cols.ravel()), w.ravel())
    return m


def _matlab_round(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5).clamp_(0, 255)  # half away from zero, saturating, as MATLAB


def bicubic_downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """``imresize(hr, 1/scale, 'bicubic')`` of an NCHW batch, on its device.

    MATLAB resizes along H first (the smaller scale first; ties keep dimension order).
    Both passes run in float64 and a uint8 input is rounded once, at the end (half up,
    saturating): MATLAB's ``im2uint8(imresize(im2double(hr), 1/scale))``, which is how
    DIV2K's and Set5-style LR are made, and BasicSR's ``imresize`` on float input. (MATLAB
    given uint8 itself rounds after each pass: 0.1 grey levels apart on average, up to 5.)
    Float input is not rounded (and may leave [0, 1] near edges, as MATLAB's does). Sides
    are ``ceil(side / scale)``.

    Measured against ours on three scikit-image photos at x2-x4 (grey levels, mean / max):
    PIL BICUBIC 0.16-0.22 / 3-13 (the same filter; PIL renormalises taps at borders and
    resizes W first), OpenCV INTER_AREA 0.84-1.4 / 11-30, OpenCV INTER_CUBIC 1.9-5.7 /
    45-140 (a = -0.75, no antialiasing).
    """
    if hr.ndim != 4:
        raise ValueError(f"got a tensor of shape {tuple(hr.shape)}, expected NCHW")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"got scale={scale}, expected a whole number >= 1")
    h, w = hr.shape[-2:]
    oh, ow = math.ceil(h / scale), math.ceil(w / scale)
    mh = torch.from_numpy(matlab_resize_matrix(h, oh, 1 / scale)).to(hr.device)
    mw = torch.from_numpy(matlab_resize_matrix(w, ow, 1 / scale)).to(hr.device)
    x = torch.einsum("oh,nchw->ncow", mh, hr.to(torch.float64))
    x = torch.einsum("pw,nchw->nchp", mw, x)
    if hr.dtype == torch.uint8:
        return _matlab_round(x).to(torch.uint8)
    return x.to(hr.dtype)


# ------------------------------------------------------------------ Real-ESRGAN: kernels


def _grid(k: int):
    ax = np.arange(k, dtype=np.float64) - (k - 1) / 2
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def gaussian_kernel(k, sigma_x, sigma_y, theta, beta=1.0, plateau=False) -> np.ndarray:
    """Bivariate (generalized / plateau) Gaussian, rotated by ``theta``, summing to 1."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    inv = np.linalg.inv(rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T)
    xx, yy = _grid(k)
    q = inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy
    kern = 1 / (q**beta + 1) if plateau else np.exp(-0.5 * q**beta)
    return kern / kern.sum()


def sinc_kernel(k: int, omega: float) -> np.ndarray:
    """Circular low-pass (2-D sinc) with cutoff ``omega`` rad/px, summing to 1."""
    xx, yy = _grid(k)
    r = np.hypot(xx, yy)
    j1 = torch.special.bessel_j1(torch.from_numpy(omega * r)).numpy()  # torch, not scipy
    with np.errstate(divide="ignore", invalid="ignore"):
        kern = omega * j1 / (2 * np.pi * r)
    kern[r == 0] = omega**2 / (4 * np.pi)
    return kern / kern.sum()


def _one_kernel(ktype, k, sx, sy, theta, beta, omega):
    if ktype == SINC:
        return sinc_kernel(k, omega)
    shaped = ktype >= 2
    return gaussian_kernel(k, sx, sy, theta, beta if shaped else 1.0, plateau=ktype >= 4)


def make_kernels(params: dict, which: str,
                 pad: int = REALESRGAN_X4PLUS.kernel_pad) -> np.ndarray:
    """(n, pad, pad) float32 kernels of stage ``which`` in {"1", "2", "final"}; a stage's
    blur that is off (``blur2``, ``final_sinc``) gets the identity (a centred 1)."""
    n = len(params["sinc_first"])
    out = np.zeros((n, pad, pad), np.float32)
    for i in range(n):
        if which == "final":
            on, k = params["final_sinc"][i], int(params["ksize_final"][i])
            kern = sinc_kernel(k, params["omega_final"][i]) if on else None
        elif which in ("1", "2"):
            on, k = params[f"blur{which}"][i], int(params[f"ksize{which}"][i])
            kern = _one_kernel(*(params[f"{name}{which}"][i] for name in (
                "kernel", "ksize", "sigma_x", "sigma_y", "theta", "beta", "omega"))) if on else None
        else:
            raise ValueError(f"got which={which!r}, expected '1', '2' or 'final'")
        if kern is None:
            out[i, pad // 2, pad // 2] = 1
        else:
            o = (pad - k) // 2
            out[i, o:o + k, o:o + k] = kern
    return out


# ------------------------------------------------------------------ Real-ESRGAN: torch


def _reflect_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of a reflect-101 padding (edge not repeated) that works for any pad."""
    i = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def filter2d(img: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Correlate each sample of an NCHW float batch with its own (k, k) kernel, borders
    reflected without repeating the edge (as BasicSR's filter2D and OpenCV's default)."""
    n, c, h, w = img.shape
    k = kernels.shape[-1]
    p = k // 2
    x = img[:, :, _reflect_index(h, p, img.device)][..., _reflect_index(w, p, img.device)]
    weight = kernels.to(img).reshape(n, 1, k, k).repeat_interleave(c, 0)
    out = F.conv2d(x.reshape(1, n * c, h + 2 * p, w + 2 * p), weight, groups=n * c)
    return out.reshape(n, c, h, w)


def resize(img: torch.Tensor, size, mode: int) -> torch.Tensor:
    """``F.interpolate`` to ``size`` with RESIZE_MODES[mode], as Real-ESRGAN (no antialias)."""
    name = RESIZE_MODES[int(mode)]
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if name == "area":
        return F.interpolate(img, size=size, mode="area")
    return F.interpolate(img, size=size, mode=name, align_corners=False)


def _gray(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # ITU-R 601, as torchvision


def _poisson_levels(img: torch.Tensor) -> torch.Tensor:
    """Real-ESRGAN scales Poisson noise by the next power of two above the number of
    distinct grey levels of the (rounded) sample."""
    vals = [len(torch.unique(img[i])) for i in range(img.shape[0])]
    return img.new_tensor([2.0 ** math.ceil(math.log2(v)) for v in vals]).view(-1, 1, 1, 1)


def add_noise(img: torch.Tensor, gaussian: bool, sigma: float, poisson: float, gray: bool,
              seed: int) -> torch.Tensor:
    """Gaussian (``sigma`` grey levels) or Poisson (scaled by ``poisson``) noise on one
    1CHW sample in [0, 1], gray (the same in every channel) or per channel; drawn from a
    torch generator seeded with ``seed`` on the tensor's device; clamped to [0, 1]."""
    gen = torch.Generator(device=img.device).manual_seed(int(seed))
    if gaussian:
        shape = (img.shape[0], 1 if gray else img.shape[1], *img.shape[2:])
        noise = torch.randn(shape, generator=gen, device=img.device, dtype=img.dtype)
        noise = noise * (sigma / 255.0)
    else:
        base = _gray(img) if gray else img
        base = torch.clamp((base * 255.0).round(), 0, 255) / 255.0
        vals = _poisson_levels(base)
        noise = (torch.poisson(base * vals, generator=gen) / vals - base) * poisson
    return torch.clamp(img + noise, 0, 1)


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG-compress one 1CHW RGB sample in [0, 1] at ``quality`` with OpenCV (libjpeg,
    4:2:0) on the CPU; returns it decoded, on the input's device."""
    arr = torch.clamp((img[0] * 255.0).round(), 0, 255).to(torch.uint8)
    bgr = np.ascontiguousarray(arr.permute(1, 2, 0).cpu().numpy()[:, :, ::-1])
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    assert ok
    rgb = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    out = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    return out.to(img.device, img.dtype) / 255.0


def _stage(x, p, i, s, kernel, size):
    if kernel is not None:
        x = filter2d(x, kernel[None])
    x = resize(x, size, p[f"mode{s}"][i])
    return add_noise(x, bool(p[f"gaussian{s}"][i]), float(p[f"sigma{s}"][i]),
                     float(p[f"poisson{s}"][i]), bool(p[f"gray{s}"][i]),
                     int(p[f"noise_seed{s}"][i]))


def stage_sizes(params: dict, h: int, w: int, scale: int) -> dict:
    """Each sample's (height, width) after the resize of stage "1", "2" and "final", as
    (n, 2) int arrays: ``floor(side * factor1)``, ``int(side / scale * factor2)`` (as
    Real-ESRGAN), ``side // scale``; at least 1 pixel."""
    f1, f2 = params["factor1"][:, None], params["factor2"][:, None]
    hw = np.array([[h, w]], np.float64)
    out = {"1": np.floor(hw * f1), "2": np.trunc(hw / scale * f2),
           "final": np.repeat(hw // scale, len(f1), 0)}
    return {k: np.maximum(v, 1).astype(np.int64) for k, v in out.items()}


def degrade_one(hr: torch.Tensor, p: dict, i: int, kernels, sizes) -> torch.Tensor:
    """Sample ``i``'s degradation of one 1CHW float HR in [0, 1] (unrounded output), given
    the batch's ``make_kernels`` (as tensors) and ``stage_sizes``."""
    k1, k2, ks = (k[i] for k in kernels)
    sizes = {k: v[i] for k, v in sizes.items()}
    x = _stage(hr, p, i, 1, k1, sizes["1"])
    x = jpeg(x, p["jpeg1"][i])
    x = _stage(x, p, i, 2, k2 if p["blur2"][i] else None, sizes["2"])
    if p["sinc_first"][i]:
        x = resize(x, sizes["final"], p["mode_final"][i])
        x = filter2d(x, ks[None])
        x = jpeg(x, p["jpeg2"][i])
    else:
        x = jpeg(x, p["jpeg2"][i])
        x = resize(x, sizes["final"], p["mode_final"][i])
        x = filter2d(x, ks[None])
    return x


def realesrgan_degrade(hr: torch.Tensor, params: dict, scale: int) -> torch.Tensor:
    """Real-ESRGAN's second-order degradation of an NCHW RGB batch on its device.

    ``hr``: uint8 (0-255) or float in [0, 1]; ``params``: ``sample_params(rng, N)``.
    Returns the float LR batch (N, C, H // scale, W // scale) in [0, 1], rounded to grey
    levels as Real-ESRGAN's ``lq``. Samples are degraded one at a time (their sizes differ
    after the random resize); JPEG runs on the CPU (OpenCV).
    """
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"got a tensor of shape {tuple(hr.shape)}, expected N x 3 x H x W")
    n = hr.shape[0]
    if len(params["sinc_first"]) != n:
        raise ValueError(f"got parameters for {len(params['sinc_first'])} samples, "
                         f"expected {n}")
    x = hr.float() / 255.0 if hr.dtype == torch.uint8 else hr.float()
    kernels = [torch.from_numpy(make_kernels(params, which)).to(hr.device)
               for which in ("1", "2", "final")]
    sizes = stage_sizes(params, hr.shape[2], hr.shape[3], scale)
    out = torch.cat([degrade_one(x[i:i + 1], params, i, kernels, sizes) for i in range(n)])
    return torch.clamp((out * 255.0).round(), 0, 255) / 255.0


def make_lr(hr: torch.Tensor, scale: int, degradation: str, params: dict | None = None
            ) -> torch.Tensor:
    """The LR of an NCHW HR batch as ``degradation`` makes it (uint8, on hr's device).

    ``hr``: uint8, or float in [0, 1] (the USM-sharpened HR before it is rounded: Real-ESRGAN
    degrades that, and every degradation here rounds once, at the end); ``params``:
    Real-ESRGAN's, one per sample (``sample_params``)."""
    if degradation not in DEGRADATIONS:
        raise ValueError(f"got degradation={degradation!r}, expected nn, bicubic or "
                         "realesrgan")
    if degradation == "realesrgan":
        lr = realesrgan_degrade(hr, params, scale)
        return lr.mul_(255).round_().to(torch.uint8)  # already whole grey levels
    if hr.is_floating_point():
        hr = hr.to(torch.float64) * 255
    lr = nn_downscale(hr, scale) if degradation == "nn" else bicubic_downscale(hr, scale)
    return lr if lr.dtype == torch.uint8 else _matlab_round(lr).to(torch.uint8)


def usm_taps(size: int = REALESRGAN_X4PLUS.usm_size) -> np.ndarray:
    """The 1-D Gaussian of the USM: OpenCV's ``getGaussianKernel(size, 0)`` for odd sizes
    above 7 (sigma = 0.3 ((size - 1) / 2 - 1) + 0.8: 8.0 at 51 taps), float64, sum 1."""
    if size % 2 == 0 or size <= 7:
        raise ValueError(f"got usm size {size}, expected an odd size above 7")
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    g = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
    return g / g.sum()


def gaussian_blur(img: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The separable blur ``taps`` (outer) ``taps`` of an NCHW float batch, borders
    reflected without repeating the edge: BasicSR's ``filter2D`` with that 2-D kernel, in
    2k instead of k² multiplies per pixel."""
    n, c, h, w = img.shape
    k, p = len(taps), len(taps) // 2
    x = img.reshape(n * c, 1, h, w)[:, :, _reflect_index(h, p, img.device)]
    x = F.conv2d(x, taps.to(img).view(1, 1, k, 1))
    x = F.conv2d(x[..., _reflect_index(w, p, img.device)], taps.to(img).view(1, 1, 1, k))
    return x.reshape(n, c, h, w)


def usm_sharpen(img: torch.Tensor, cfg: RealESRGANConfig = REALESRGAN_X4PLUS) -> torch.Tensor:
    """Unsharp masking of an NCHW float batch in [0, 1], as BasicSR's ``USMSharp()`` that
    Real-ESRGAN's ``gt_usm`` runs: add ``weight`` x the detail (image minus its Gaussian
    blur, ``usm_taps``) where the detail exceeds ``threshold`` grey levels, blended in
    through the mask blurred by the same Gaussian, so no edge is hard. Unrounded."""
    taps = torch.from_numpy(usm_taps(cfg.usm_size)).float().to(img.device)
    detail = img - gaussian_blur(img, taps)
    mask = ((detail.abs() * 255) > cfg.usm_threshold).to(img.dtype)
    soft = gaussian_blur(mask, taps)
    sharp = torch.clamp(img + cfg.usm_weight * detail, 0, 1)
    return soft * sharp + (1 - soft) * img
