"""Real-ESRGAN's second-order degradation as DALI graph functions.

The same stages as ``srdata/degrade.py``'s torch reference, for the DALI pipeline: pure
functions of DataNodes (float32 HWC images in [0, 1]) and per-sample parameter nodes, which
the pipeline gets from an external source fed with ``dali_inputs(sample_params(...))``.
They use DALI conditionals: call them inside ``@pipeline_def(enable_conditionals=True)``.
With ``usm`` each downscale starts from the USM-sharpened HR (``usm_sharpen``, unrounded),
as the reference's loaders do; the HR the pipeline returns stays plain (the loader sharpens
its targets on the device, so both loaders' targets are the same bits).

Where DALI differs from the reference (measured in tests/test_dali_degrade.py, README):
- resize: DALI has no ``area`` mode; it is DALI's linear filter with antialiasing (a
  triangle when shrinking, wider than torch's box; linear interpolation when enlarging),
  the closest of DALI's filters to torch's ``area`` on our measurements. DALI's
  ``INTERP_CUBIC`` is not torch's a = -0.75 cubic. ``bilinear`` and the blur are exact.
- noise: the same kinds and levels, but DALI draws its own random numbers (seeded by the
  pipeline's seed), so realisations differ. Poisson noise uses 256 levels: what Real-ESRGAN
  picks for any sample with more than 128 distinct grey levels, which includes every
  blurred natural-image patch; it cannot count a sample's levels inside the graph.
- JPEG: ``fn.jpeg_compression_distortion``; on the CPU it is bit-identical to the
  reference's OpenCV encode/decode; on the GPU it is nvJPEG's encoder.
"""
from __future__ import annotations

import numpy as np

from . import degrade as reference

try:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types
except ImportError:  # only the graph functions need DALI; dali_inputs does not
    dmath = fn = types = None

POISSON_LEVELS = 256.0

# name -> dtype of each per-sample input the graph takes (see dali_inputs)
INPUTS = {
    "kernel1": np.float32, "kernel2": np.float32, "kernel_final": np.float32,
    "size1": np.float32, "size2": np.float32, "size_final": np.float32,
    "mode1": np.int32, "mode2": np.int32, "mode_final": np.int32,
    "gaussian1": np.bool_, "gaussian2": np.bool_, "sigma1": np.float32, "sigma2": np.float32,
    "poisson1": np.float32, "poisson2": np.float32, "gray1": np.bool_, "gray2": np.bool_,
    "jpeg1": np.int32, "jpeg2": np.int32, "sinc_first": np.bool_,
}


def dali_inputs(params: dict, h: int, w: int, scale: int) -> dict:
    """The graph's per-sample inputs for HR patches of h x w: ``{name: (n, ...) array}``,
    dtypes as ``INPUTS``; kernels (n, 21, 21) and sizes (n, 2) as the torch reference's."""
    sizes = reference.stage_sizes(params, h, w, scale)
    out = {f"kernel{k}": reference.make_kernels(params, w_) for k, w_ in
           (("1", "1"), ("2", "2"), ("_final", "final"))}
    out |= {"size1": sizes["1"], "size2": sizes["2"], "size_final": sizes["final"]}
    out |= {k: params[k] for k in INPUTS if k not in out}
    return {k: np.ascontiguousarray(out[k], INPUTS[k]) for k in INPUTS}


def blur(img, kernel):
    """Correlate each sample with its (k, k) float32 kernel, reflect-101 borders."""
    return fn.filter(img, kernel, border="reflect_101")


def resize(img, size, mode):
    """Resize each sample to ``size`` (float [h, w]) with RESIZE_MODES[mode]."""
    if mode == 0:  # area: the closest of DALI's filters to torch's (measured)
        out = fn.resize(img, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
    elif mode == 1:
        out = fn.resize(img, size=size, interp_type=types.INTERP_LINEAR, antialias=False)
    else:
        out = fn.resize(img, size=size, interp_type=types.INTERP_CUBIC, antialias=False)
    return out


def _gray(img):
    return img[:, :, 0:1] * 0.2989 + img[:, :, 1:2] * 0.587 + img[:, :, 2:3] * 0.114


def _round255(img):
    return dmath.clamp(dmath.floor(img * 255.0 + 0.5), 0.0, 255.0)


def _hwc(x):
    return fn.reshape(x, layout="HWC")  # branches of a conditional merge only alike layouts


def _gaussian(img, sigma):
    color = fn.random.normal(img) * (sigma / 255.0)
    return _hwc(color), _hwc(fn.random.normal(img[:, :, 0:1]) * (sigma / 255.0))


def _shot(base, scale):
    return _hwc((fn.noise.shot(base, factor=255.0 / POISSON_LEVELS) - base) * (scale / 255.0))


def add_noise(img, gaussian, sigma, poisson, gray):
    """Gaussian (``sigma`` grey levels) or Poisson (x ``poisson``) noise, gray (one plane
    for all channels) or per channel; clamped to [0, 1]."""
    if gaussian:
        color, mono = _gaussian(img, sigma)
    else:
        color, mono = _shot(_round255(img), poisson), _shot(_round255(_gray(img)), poisson)
    g = fn.cast(gray, dtype=types.FLOAT)
    return dmath.clamp(img + color * (1.0 - g) + mono * g, 0.0, 1.0)


def jpeg(img, quality):
    """JPEG-compress each sample at its ``quality`` and decode it again."""
    u8 = fn.cast(_round255(img), dtype=types.UINT8)
    return fn.cast(fn.jpeg_compression_distortion(u8, quality=quality), dtype=types.FLOAT) / 255.0


def _gaussian_blur(img, taps):
    """The separable blur ``taps`` (outer) ``taps``, reflect-101 borders, as the
    reference's ``gaussian_blur``: a column filter, then a row filter."""
    for kernel in (taps[:, None], taps[None, :]):
        img = fn.filter(img, types.Constant(np.ascontiguousarray(kernel)),
                        border="reflect_101")
    return img


def usm_sharpen(img, cfg=reference.REALESRGAN_X4PLUS):
    """``degrade.usm_sharpen`` of float32 HWC images in [0, 1] (unrounded)."""
    taps = reference.usm_taps(cfg.usm_size).astype(np.float32)
    detail = img - _gaussian_blur(img, taps)
    mask = fn.cast(dmath.abs(detail) * 255.0 > cfg.usm_threshold, dtype=types.FLOAT)
    soft = _gaussian_blur(mask, taps)
    sharp = dmath.clamp(img + detail * cfg.usm_weight, 0.0, 1.0)
    return soft * sharp + (1.0 - soft) * img


def _unit(hr, usm: bool):
    """uint8 HWC -> float32 in [0, 1], USM-sharpened if asked for."""
    x = fn.cast(hr, dtype=types.FLOAT) / 255.0
    return usm_sharpen(x) if usm else x


def degrade(hr, p: dict, usm: bool = False):
    """The whole chain on ``hr`` (uint8 HWC), USM-sharpened first with ``usm``; ``p``:
    {name: node} for every name of INPUTS. Returns the LR as uint8 HWC (Real-ESRGAN's final
    clamp and round)."""
    x = _unit(hr, usm)
    x = resize(blur(x, p["kernel1"]), p["size1"], p["mode1"])
    x = add_noise(x, p["gaussian1"], p["sigma1"], p["poisson1"], p["gray1"])
    x = jpeg(x, p["jpeg1"])
    x = resize(blur(x, p["kernel2"]), p["size2"], p["mode2"])
    x = add_noise(x, p["gaussian2"], p["sigma2"], p["poisson2"], p["gray2"])
    if p["sinc_first"]:
        x = blur(resize(x, p["size_final"], p["mode_final"]), p["kernel_final"])
        x = jpeg(x, p["jpeg2"])
    else:
        x = jpeg(x, p["jpeg2"])
        x = blur(resize(x, p["size_final"], p["mode_final"]), p["kernel_final"])
    return fn.cast(_round255(x), dtype=types.UINT8)


def bicubic_taps(scale: int) -> tuple[np.ndarray, int]:
    """MATLAB ``imresize(x, 1/scale)``'s weights for one output pixel along one axis, as a
    (taps,) float32 filter, and the filter's anchor such that output pixel y is the filter's
    response at input pixel ``y * scale + scale // 2`` (the pixel INTERP_NN then picks).
    Away from borders every row of ``degrade.matlab_resize_matrix`` is these weights."""
    # Output pixel 0's row, before the border fold; its first tap lies exactly 2 * scale
    # away, where the kernel is 0, so it is dropped.
    idx, w = reference.matlab_contributions(scale, 1, 1 / scale)
    assert w[0, 0] == 0
    first = int(idx[0, 1]) - 1  # 0-based
    return w[0, 1:].astype(np.float32), scale // 2 - first


def bicubic_downscale(hr, patch: int, scale: int, usm: bool = False):
    """``degrade.bicubic_downscale`` of uint8 HWC ``patch``-px squares in the graph (of the
    unrounded USM-sharpened ones with ``usm``): the same separable MATLAB weights as a
    column then a row filter (symmetric borders, as MATLAB's), every ``scale``-th pixel
    picked by INTERP_NN, rounded once. Only float32 instead of float64 accumulation differs
    (a grey level on .5 ties). Each filter is computed at every pixel and 1 in scale² kept:
    cheap next to the decode, and no strided filter exists in DALI."""
    taps, anchor = bicubic_taps(scale)
    x = _unit(hr, True) * 255.0 if usm else fn.cast(hr, dtype=types.FLOAT)
    for kernel, a in ((taps[:, None], [anchor, 0]), (taps[None, :], [0, anchor])):
        x = fn.filter(x, types.Constant(np.ascontiguousarray(kernel)), anchor=a,
                      border="reflect_1001")
    lr = fn.resize(x, size=[patch // scale] * 2, interp_type=types.INTERP_NN, antialias=False)
    return fn.cast(dmath.clamp(dmath.floor(lr + 0.5), 0.0, 255.0), dtype=types.UINT8)


def nn_downscale(hr, patch: int, scale: int, usm: bool = False):
    """``sampler.nn_downscale`` of uint8 HWC ``patch``-px squares (of the USM-sharpened
    ones, rounded, with ``usm``): the pixels INTERP_NN picks."""
    x = _unit(hr, True) if usm else hr
    lr = fn.resize(x, size=[patch // scale] * 2, interp_type=types.INTERP_NN, antialias=False)
    return fn.cast(_round255(lr), dtype=types.UINT8) if usm else lr
