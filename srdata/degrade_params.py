"""Real-ESRGAN's degradation, its numbers: the table of ranges and probabilities
(``RealESRGANConfig``, ``REALESRGAN_X4PLUS``: the values of Real-ESRGAN's
``train_realesrnet_x4plus.yml``) and every random parameter of ``n`` samples drawn from it
(``sample_params``), as plain numpy arrays.

numpy only: the sampler draws these for both loaders (and for DALI's source workers) without
importing torch. ``srdata.degrade`` (torch) and ``srdata.dali_degrade`` apply them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# ------------------------------------------------------------------ Real-ESRGAN: the table

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                "plateau_aniso", "sinc")
SINC = KERNEL_TYPES.index("sinc")
RESIZE_TYPES = ("up", "down", "keep")
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class StageRanges:
    """One degradation stage: blur, random resize, noise, JPEG (ranges are [low, high])."""
    blur_prob: float
    kernel_prob: tuple  # over KERNEL_TYPES[:6]
    sinc_prob: float  # replaces the Gaussian-family kernel by a sinc (ringing)
    blur_sigma: tuple
    betag_range: tuple  # generalized Gaussian shape
    betap_range: tuple  # plateau shape
    resize_prob: tuple  # up, down, keep
    resize_range: tuple
    gaussian_noise_prob: float  # else Poisson noise
    noise_range: tuple  # Gaussian sigma, grey levels of 255
    poisson_scale_range: tuple
    gray_noise_prob: float
    jpeg_range: tuple  # quality, whole numbers


@dataclass(frozen=True)
class RealESRGANConfig:
    """Real-ESRGAN's published x4plus table (train_realesrnet_x4plus.yml; the GAN stage,
    train_realesrgan_x4plus.yml, uses the same degradation)."""
    first: StageRanges = field(default_factory=lambda: StageRanges(
        blur_prob=1.0, kernel_prob=(0.45, 0.25, 0.12, 0.03, 0.12, 0.03), sinc_prob=0.1,
        blur_sigma=(0.2, 3.0), betag_range=(0.5, 4.0), betap_range=(1.0, 2.0),
        resize_prob=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5), gaussian_noise_prob=0.5,
        noise_range=(1.0, 30.0), poisson_scale_range=(0.05, 3.0), gray_noise_prob=0.4,
        jpeg_range=(30, 95)))
    second: StageRanges = field(default_factory=lambda: StageRanges(
        blur_prob=0.8, kernel_prob=(0.45, 0.25, 0.12, 0.03, 0.12, 0.03), sinc_prob=0.1,
        blur_sigma=(0.2, 1.5), betag_range=(0.5, 4.0), betap_range=(1.0, 2.0),
        resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2), gaussian_noise_prob=0.5,
        noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5), gray_noise_prob=0.4,
        jpeg_range=(30, 95)))
    kernel_sizes: tuple = (7, 9, 11, 13, 15, 17, 19, 21)  # odd, drawn uniformly
    kernel_pad: int = 21  # every kernel is zero-padded to this size
    final_sinc_prob: float = 0.8
    final_sinc_first_prob: float = 0.5  # [resize back + sinc] before the last JPEG
    # USM sharpening of the HR (their gt_usm), which is then degraded and trained against:
    # BasicSR's USMSharp(), whose radius=50 is its Gaussian's size (made odd: 51 taps)
    usm_weight: float = 0.5
    usm_threshold: float = 10.0
    usm_size: int = 51


REALESRGAN_X4PLUS = RealESRGANConfig()


# ------------------------------------------------------------------ Real-ESRGAN: sampling


def _uniform(rng, lo_hi, n):
    return rng.uniform(lo_hi[0], lo_hi[1], n)


def _sample_kernel(rng, st: StageRanges, sizes, n, prefix):
    ksize = rng.choice(np.asarray(sizes), n)
    ktype = rng.choice(6, n, p=np.asarray(st.kernel_prob) / np.sum(st.kernel_prob))
    ktype = np.where(rng.random(n) < st.sinc_prob, SINC, ktype)
    sx, sy = _uniform(rng, st.blur_sigma, n), _uniform(rng, st.blur_sigma, n)
    theta = rng.uniform(-np.pi, np.pi, n)
    iso = np.isin(ktype, (0, 2, 4))
    sy, theta = np.where(iso, sx, sy), np.where(iso, 0.0, theta)
    # shapes: half the draws below 1 (peaky), half above (flat), as BasicSR does
    low = rng.random(n) < 0.5
    betag = np.where(low, _uniform(rng, (st.betag_range[0], 1), n),
                     _uniform(rng, (1, st.betag_range[1]), n))
    betap = np.where(low, _uniform(rng, (st.betap_range[0], 1), n),
                     _uniform(rng, (1, st.betap_range[1]), n))
    beta = np.where(ktype >= 4, betap, betag)
    omega = np.where(ksize < 13, rng.uniform(np.pi / 3, np.pi, n),
                     rng.uniform(np.pi / 5, np.pi, n))
    return {f"kernel{prefix}": ktype.astype(np.int64), f"ksize{prefix}": ksize.astype(np.int64),
            f"sigma_x{prefix}": sx, f"sigma_y{prefix}": sy, f"theta{prefix}": theta,
            f"beta{prefix}": beta, f"omega{prefix}": omega}


def _sample_stage(rng, st: StageRanges, sizes, n, s):
    p = {f"blur{s}": rng.random(n) < st.blur_prob}
    p |= _sample_kernel(rng, st, sizes, n, s)
    updown = rng.choice(3, n, p=np.asarray(st.resize_prob) / np.sum(st.resize_prob))
    up, down = _uniform(rng, (1, st.resize_range[1]), n), _uniform(rng, (st.resize_range[0], 1), n)
    p[f"resize{s}"] = updown.astype(np.int64)
    p[f"factor{s}"] = np.select([updown == 0, updown == 1], [up, down], 1.0)
    p[f"mode{s}"] = rng.integers(0, 3, n)
    p[f"gaussian{s}"] = rng.random(n) < st.gaussian_noise_prob
    p[f"sigma{s}"] = _uniform(rng, st.noise_range, n)
    p[f"poisson{s}"] = _uniform(rng, st.poisson_scale_range, n)
    p[f"gray{s}"] = rng.random(n) < st.gray_noise_prob
    p[f"noise_seed{s}"] = rng.integers(0, 2**62, n)
    p[f"jpeg{s}"] = rng.integers(st.jpeg_range[0], st.jpeg_range[1] + 1, n)
    return p


def sample_params(rng: np.random.Generator, n: int,
                  cfg: RealESRGANConfig = REALESRGAN_X4PLUS) -> dict:
    """Every random parameter of ``n`` samples' degradations: ``{name: array of n}``.

    Every parameter is drawn for every sample, used or not (a sinc's cutoff for a Gaussian
    kernel, Poisson's scale for Gaussian noise), so the draws of one call depend only on
    ``(rng state, n)``. Keys, stage s in {1, 2}: ``blur{s}``, ``kernel{s}`` (index into
    KERNEL_TYPES), ``ksize{s}``, ``sigma_x{s}``, ``sigma_y{s}``, ``theta{s}``, ``beta{s}``,
    ``omega{s}`` (sinc cutoff), ``resize{s}`` (up/down/keep), ``factor{s}``, ``mode{s}``
    (index into RESIZE_MODES), ``gaussian{s}`` (else Poisson), ``sigma{s}`` (grey levels),
    ``poisson{s}``, ``gray{s}``, ``noise_seed{s}``, ``jpeg{s}``; and ``sinc_first`` (resize
    back + sinc before the last JPEG), ``mode_final``, ``final_sinc``, ``ksize_final``,
    ``omega_final``.
    """
    if n < 0:
        raise ValueError(f"got n={n}, expected n >= 0")
    p = _sample_stage(rng, cfg.first, cfg.kernel_sizes, n, 1)
    p |= _sample_stage(rng, cfg.second, cfg.kernel_sizes, n, 2)
    p["sinc_first"] = rng.random(n) < cfg.final_sinc_first_prob
    p["mode_final"] = rng.integers(0, 3, n)
    p["final_sinc"] = rng.random(n) < cfg.final_sinc_prob
    p["ksize_final"] = rng.choice(np.asarray(cfg.kernel_sizes), n).astype(np.int64)
    p["omega_final"] = rng.uniform(np.pi / 3, np.pi, n)
    return p
