import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from srdata import degrade as d
from srdata.degrade_params import REALESRGAN_X4PLUS, sample_params
from srdata.samples import synthetic_image

CFG = REALESRGAN_X4PLUS


def nchw(img):
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]


def hwc(t):
    return t[0].permute(1, 2, 0).numpy()


def test_matlab_weight_table_and_hand_computed_case():
    # imresize(v, 0.5), output 1: centre u = 1/0.5 + 0.5 * (1 - 2) = 1.5, taps -3..6,
    # w_j = 0.5 * cubic(0.5 * (1.5 - j)); cubic(0.25) = 0.8671875, cubic(0.75) = 0.2265625,
    # cubic(1.25) = -0.0703125, cubic(1.75) = -0.0234375: already sums to 1
    idx, w = d.matlab_contributions(8, 4, 0.5)
    assert idx[0].tolist() == list(range(-3, 7))
    half = [-0.01171875, -0.03515625, 0.11328125, 0.43359375]
    np.testing.assert_allclose(w[0], [0] + half + half[::-1] + [0], atol=1e-15)
    np.testing.assert_allclose(w.sum(1), 1)
    # symmetric borders fold 1-based indices 0, -1, -2 onto 1, 2, 3
    v = np.array([10, 200, 30, 90, 120, 60, 250, 5], np.float64)
    img = np.repeat(v[None, :, None], 8, 0).repeat(3, 2)  # constant along H
    out = hwc(d.bicubic_downscale(nchw(img), 2))
    v1, v2, v3, v4, v5 = v[:5]
    hand = (-0.01171875 * v3 - 0.03515625 * v2 + 0.11328125 * v1 + 0.43359375 * v1
            + 0.43359375 * v2 + 0.11328125 * v3 - 0.03515625 * v4 - 0.01171875 * v5)
    assert out.shape == (4, 4, 3)
    assert out[0, 0, 0] == pytest.approx(hand, abs=1e-9)
    # Keys' cubic reproduces straight lines: inside, output x is the input at u = 2x - 0.5
    ramp = np.repeat(np.arange(32, dtype=np.float64)[None, :, None] * 3, 8, 0)
    out = hwc(d.bicubic_downscale(nchw(ramp), 2))[0, :, 0]
    np.testing.assert_allclose(out[3:-3], 3 * (2 * np.arange(1, 17) - 1.5)[3:-3])
    const = np.full((12, 12, 3), 77, np.uint8)
    assert (hwc(d.bicubic_downscale(nchw(const), 3)) == 77).all()


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_against_pil_and_opencv(scale):
    # unsaturated values, so neither MATLAB's nor PIL's intermediate clipping applies
    img = (40 + synthetic_image(96, 96, scale).astype(np.float64) * (175 / 255)).round()
    img = img.astype(np.uint8)
    ours = d.bicubic_downscale(nchw(img), scale)
    assert ours.dtype == torch.uint8 and ours.shape == (1, 3, 96 // scale, 96 // scale)
    ours = hwc(ours).astype(int)
    size = (96 // scale, 96 // scale)
    pil = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC)).astype(int)
    cub = cv2.resize(img, size, interpolation=cv2.INTER_CUBIC).astype(int)
    area = cv2.resize(img, size, interpolation=cv2.INTER_AREA).astype(int)
    b = 3  # PIL renormalises truncated taps at borders where MATLAB mirrors
    # PIL's BICUBIC is the same filter (a = -0.5, widened, pixel-centre mapping), fixed-point
    assert np.abs(pil - ours)[b:-b, b:-b].max() <= 1
    assert np.abs(pil - ours).mean() < 0.35
    # OpenCV's INTER_CUBIC (a = -0.75, no antialiasing) aliases; INTER_AREA is a box filter
    assert np.abs(cub - ours).mean() > 1.0
    assert 0.3 < np.abs(area - ours).mean() < 3
    flt = d.bicubic_downscale(nchw(img).double(), scale)
    assert flt.dtype == torch.float64 and not torch.equal(flt, flt.round())


def test_sample_params_deterministic_and_in_range():
    n = 4000
    p = sample_params(np.random.default_rng(5), n)
    q = sample_params(np.random.default_rng(5), n)
    r = sample_params(np.random.default_rng(6), n)
    assert p.keys() == q.keys()
    assert all(np.array_equal(p[k], q[k]) for k in p)
    assert not np.array_equal(p["sigma_x1"], r["sigma_x1"])
    assert all(len(v) == n for v in p.values())
    for s, st in (("1", CFG.first), ("2", CFG.second)):
        lo, hi = st.blur_sigma
        assert lo <= p[f"sigma_x{s}"].min() and p[f"sigma_y{s}"].max() <= hi
        assert set(np.unique(p[f"ksize{s}"])) == set(CFG.kernel_sizes)
        freq = np.bincount(p[f"kernel{s}"], minlength=7) / n
        expect = np.append(np.asarray(st.kernel_prob) * (1 - st.sinc_prob), st.sinc_prob)
        np.testing.assert_allclose(freq, expect, atol=0.03)
        iso = np.isin(p[f"kernel{s}"], (0, 2, 4))
        assert (p[f"sigma_x{s}"][iso] == p[f"sigma_y{s}"][iso]).all()
        assert (p[f"theta{s}"][iso] == 0).all() and np.abs(p[f"theta{s}"]).max() <= np.pi
        gen, plat = np.isin(p[f"kernel{s}"], (2, 3)), np.isin(p[f"kernel{s}"], (4, 5))
        assert st.betag_range[0] <= p[f"beta{s}"][gen].min() <= p[f"beta{s}"][gen].max() \
            <= st.betag_range[1]
        assert st.betap_range[0] <= p[f"beta{s}"][plat].min() <= p[f"beta{s}"][plat].max() \
            <= st.betap_range[1]
        small = p[f"ksize{s}"] < 13
        assert p[f"omega{s}"][small].min() >= np.pi / 3 and p[f"omega{s}"].max() <= np.pi
        assert p[f"omega{s}"][~small].min() < np.pi / 3  # larger kernels reach pi / 5
        np.testing.assert_allclose(np.bincount(p[f"resize{s}"], minlength=3) / n,
                                   st.resize_prob, atol=0.03)
        f, kind = p[f"factor{s}"], p[f"resize{s}"]
        assert (f[kind == 0] >= 1).all() and f[kind == 0].max() <= st.resize_range[1]
        assert (f[kind == 1] <= 1).all() and f[kind == 1].min() >= st.resize_range[0]
        assert (f[kind == 2] == 1).all()
        assert set(np.unique(p[f"mode{s}"])) == {0, 1, 2}
        assert p[f"gaussian{s}"].mean() == pytest.approx(st.gaussian_noise_prob, abs=0.03)
        assert p[f"gray{s}"].mean() == pytest.approx(st.gray_noise_prob, abs=0.03)
        assert st.noise_range[0] <= p[f"sigma{s}"].min() < p[f"sigma{s}"].max() \
            <= st.noise_range[1]
        assert st.poisson_scale_range[0] <= p[f"poisson{s}"].min() \
            < p[f"poisson{s}"].max() <= st.poisson_scale_range[1]
        assert p[f"jpeg{s}"].min() == st.jpeg_range[0] and p[f"jpeg{s}"].max() == st.jpeg_range[1]
        assert p[f"blur{s}"].mean() == pytest.approx(st.blur_prob, abs=0.03)
    assert p["final_sinc"].mean() == pytest.approx(CFG.final_sinc_prob, abs=0.03)
    assert p["sinc_first"].mean() == pytest.approx(0.5, abs=0.03)
    assert np.pi / 3 <= p["omega_final"].min() and p["omega_final"].max() <= np.pi
    assert len(sample_params(np.random.default_rng(0), 0)["jpeg1"]) == 0


def test_kernels_shapes_sums_and_shapes_of_blur():
    p = sample_params(np.random.default_rng(1), 64)
    for which in ("1", "2", "final"):
        k = d.make_kernels(p, which)
        assert k.shape == (64, 21, 21) and k.dtype == np.float32
        np.testing.assert_allclose(k.sum((1, 2)), 1, atol=1e-5)
        np.testing.assert_allclose(k, k[:, ::-1, ::-1], atol=1e-6)  # conv == correlation
    k2 = d.make_kernels(p, "2")
    off = ~p["blur2"]
    assert off.any() and (k2[off, 10, 10] == 1).all()
    fin = d.make_kernels(p, "final")
    assert (fin[~p["final_sinc"], 10, 10] == 1).all()
    # a kernel of size k lives in the centre k x k of the padded 21 x 21
    k1 = d.make_kernels(p, "1")
    for i in range(64):
        o = (21 - p["ksize1"][i]) // 2
        if o:
            assert np.abs(k1[i, :o]).max() == 0 and np.abs(k1[i, :, -o:]).max() == 0
    # iso Gaussian equals OpenCV's separable Gaussian; aniso is rotated (not transposable)
    g = cv2.getGaussianKernel(15, 1.7)
    np.testing.assert_allclose(d.gaussian_kernel(15, 1.7, 1.7, 0.0), g @ g.T, atol=1e-12)
    a = d.gaussian_kernel(15, 3.0, 0.8, 0.6)
    assert np.abs(a - a.T).max() > 1e-3
    np.testing.assert_allclose(d.gaussian_kernel(15, 3.0, 0.8, np.pi / 2),
                               d.gaussian_kernel(15, 0.8, 3.0, 0.0), atol=1e-12)
    # the sinc passes frequencies below its cutoff and stops those above
    resp = np.abs(np.fft.fft2(np.pad(d.sinc_kernel(21, np.pi / 2), ((0, 43), (0, 43)))))
    freqs = 2 * np.pi * np.fft.fftfreq(64)
    rad = np.hypot(*np.meshgrid(freqs, freqs))
    assert np.abs(resp[rad < 0.3 * np.pi] - 1).max() < 0.15
    assert resp[rad > 0.7 * np.pi].max() < 0.15


def test_stages_filter_resize_noise_jpeg():
    img = torch.from_numpy(synthetic_image(32, 40, 3)).permute(2, 0, 1)[None].float() / 255
    k = torch.from_numpy(d.gaussian_kernel(21, 2.0, 0.7, 0.4)).float()
    ours = hwc(d.filter2d(img, k[None]))
    ref = cv2.filter2D(hwc(img), -1, k.numpy(), borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    tiny = img[:, :, :6, :7]  # kernels wider than the image still reflect
    assert d.filter2d(tiny, k[None]).shape == tiny.shape
    delta = torch.zeros(1, 21, 21)
    delta[0, 10, 10] = 1
    assert torch.allclose(d.filter2d(img, delta), img, atol=1e-7)
    blocks = img.reshape(1, 3, 8, 4, 10, 4).mean((3, 5))
    assert torch.allclose(d.resize(img, (8, 10), 0), blocks, atol=1e-6)
    assert d.resize(img, (50, 61), 2).shape == (1, 3, 50, 61)

    grey = torch.full((1, 3, 64, 64), 0.5)
    g = d.add_noise(grey, True, 10.0, 0.0, False, seed=7)
    assert torch.equal(g, d.add_noise(grey, True, 10.0, 0.0, False, seed=7))
    assert not torch.equal(g, d.add_noise(grey, True, 10.0, 0.0, False, seed=8))
    assert (g - 0.5).std().item() * 255 == pytest.approx(10.0, rel=0.05)
    gray = d.add_noise(grey, True, 10.0, 0.0, True, seed=7)
    assert torch.equal(gray[:, 0], gray[:, 2]) and not torch.equal(g[:, 0], g[:, 2])
    # Poisson: 129..256 grey levels -> 256 levels, variance x / 256 before scaling
    ramp = (torch.arange(64 * 64).reshape(1, 1, 64, 64) % 200 + 28).float().expand(1, 3, 64, 64)
    ramp = ramp / 255
    p = d.add_noise(ramp, False, 0.0, 2.0, False, seed=1) - ramp
    expect = 2.0 * (ramp.mean().item() / 256) ** 0.5
    assert p.std().item() == pytest.approx(expect, rel=0.1)

    q95, q30 = d.jpeg(img, 95), d.jpeg(img, 30)
    err95, err30 = (q95 - img).abs().mean(), (q30 - img).abs().mean()
    assert err95 < err30 and err95 < 0.02
    ok, buf = cv2.imencode(".jpg", (hwc(img)[:, :, ::-1] * 255).round().astype(np.uint8),
                           [cv2.IMWRITE_JPEG_QUALITY, 30])
    ref = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    assert (hwc(q30) * 255).round().astype(np.uint8).tolist() == ref.tolist()


def test_realesrgan_degrade_batch():
    hr = torch.from_numpy(np.stack([synthetic_image(64, 64, i) for i in range(4)]))
    hr = hr.permute(0, 3, 1, 2)
    p = sample_params(np.random.default_rng(0), 4)
    lr = d.realesrgan_degrade(hr, p, 4)
    assert lr.shape == (4, 3, 16, 16) and lr.dtype == torch.float32
    assert 0 <= lr.min() and lr.max() <= 1
    assert torch.equal(lr * 255, (lr * 255).round())  # rounded to grey levels
    # a sample's LR depends on its parameters only, not on the batch or the input dtype
    first = {k: v[1:3] for k, v in p.items()}
    assert torch.equal(lr[1:3], d.realesrgan_degrade(hr[1:3].float() / 255, first, 4))
    other = {k: v[1:] for k, v in sample_params(np.random.default_rng(1), 2).items()}
    assert not torch.equal(lr[1:2], d.realesrgan_degrade(hr[1:2], other, 4))
    # degraded but still the same picture: close to the bicubic LR on average
    bic = d.bicubic_downscale(hr.float() / 255, 4).clamp(0, 1)
    assert (lr - bic).abs().mean() < 0.15
    with pytest.raises(ValueError, match="expected 4"):
        d.realesrgan_degrade(hr, sample_params(np.random.default_rng(0), 5), 4)
    with pytest.raises(ValueError, match="expected N x 3 x H x W"):
        d.realesrgan_degrade(hr[0], p, 4)


def test_usm_sharpen():
    flat = torch.full((2, 3, 40, 40), 0.3)
    assert torch.allclose(d.usm_sharpen(flat), flat)
    edge = torch.full((1, 3, 8, 160), 0.3)
    edge[..., 80:] = 0.7
    sharp = d.usm_sharpen(edge)
    assert 0 <= sharp.min() and sharp.max() <= 1
    assert sharp[0, 0, 4, 78] < 0.3 - 0.01 and sharp[0, 0, 4, 81] > 0.7 + 0.01  # overshoot
    assert torch.allclose(sharp[..., :20], edge[..., :20], atol=1e-3)  # 7 sigmas away


def usm_by_opencv(img):
    """BasicSR's USMSharp() written out with OpenCV, float64, for an HxWx3 image in [0, 1]:
    the 2-D kernel getGaussianKernel(51, 0) x its transpose, reflect-101 borders."""
    g = cv2.getGaussianKernel(51, 0)
    k2 = g @ g.T
    blur = cv2.filter2D(img, -1, k2, borderType=cv2.BORDER_REFLECT_101)
    detail = img - blur
    mask = (np.abs(detail) * 255 > 10).astype(np.float64)
    soft = cv2.filter2D(mask, -1, k2, borderType=cv2.BORDER_REFLECT_101)
    sharp = np.clip(img + 0.5 * detail, 0, 1)
    return soft * sharp + (1 - soft) * img


def test_usm_is_basicsr_s_usmsharp_to_a_grey_level():
    # OpenCV's sigma for 51 taps: 0.3 * ((51 - 1) / 2 - 1) + 0.8 = 8.0
    g = np.exp(-np.arange(-25, 26) ** 2 / (2 * 8.0**2))
    np.testing.assert_allclose(cv2.getGaussianKernel(51, 0)[:, 0], g / g.sum(), atol=1e-12)
    np.testing.assert_allclose(d.usm_taps(51), g / g.sum(), atol=1e-12)
    for seed in range(3):
        img = synthetic_image(96, 80, seed)
        ref = usm_by_opencv(img.astype(np.float64) / 255)
        ours = hwc(d.usm_sharpen(nchw(img).float() / 255)).astype(np.float64)
        assert np.abs(ours - ref).max() * 255 < 0.01  # float32 against float64
        levels = np.abs((ours * 255).round() - (ref * 255).round())
        assert levels.max() <= 1 and levels.mean() < 1e-3
        assert np.abs(ref - img / 255).max() * 255 > 10  # and it does sharpen
    with pytest.raises(ValueError, match="expected an odd size above 7"):
        d.usm_taps(50)


def keys_cubic(x):
    x = abs(x)
    return 1.5 * x**3 - 2.5 * x**2 + 1 if x <= 1 else (
        -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2 if x < 2 else 0.0)


def imresize_down_matrix(n, s):
    """MATLAB imresize(., 1/s) along one axis, from its definition: output i's centre at
    input (i + 0.5) s - 0.5 (0-based), Keys' cubic widened by s, symmetric borders."""
    out = -(-n // s)
    m = np.zeros((out, n))
    for i in range(out):
        u = (i + 0.5) * s - 0.5
        for j in range(int(np.floor(u - 2 * s)), int(np.ceil(u + 2 * s)) + 1):
            folded = -j - 1 if j < 0 else (2 * n - 1 - j if j >= n else j)
            m[i, folded] += keys_cubic((u - j) / s) / s
    return m / m.sum(1, keepdims=True)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_rounds_once_as_matlab_on_double_input(scale):
    # im2uint8(imresize(im2double(hr), 1/s)): float all the way, one rounding at the end
    img = synthetic_image(72, 60, scale)
    mh, mw = imresize_down_matrix(72, scale), imresize_down_matrix(60, scale)
    ref = np.einsum("oh,hwc->owc", mh, img.astype(np.float64))
    ref = np.clip(np.floor(np.einsum("pw,owc->opc", mw, ref) + 0.5), 0, 255)
    ours = hwc(d.bicubic_downscale(nchw(img), scale)).astype(np.float64)
    diff = np.abs(ours - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # .5 ties only
    # rounding after each pass (MATLAB on uint8 input) is measurably apart
    twice = np.clip(np.floor(np.einsum("pw,owc->opc", mw, np.clip(np.floor(
        np.einsum("oh,hwc->owc", mh, img.astype(np.float64)) + 0.5), 0, 255)) + 0.5), 0, 255)
    assert (np.abs(twice - ref) > 0).mean() > 0.02


def test_make_lr_of_the_sharpened_float_hr_rounds_once():
    hr = torch.from_numpy(np.stack([synthetic_image(64, 64, i) for i in range(2)]))
    hr = hr.permute(0, 3, 1, 2)
    sharp = d.usm_sharpen(hr.float() / 255)
    target = (sharp * 255).round().to(torch.uint8)
    nn = d.make_lr(sharp, 4, "nn")
    assert nn.dtype == torch.uint8 and torch.equal(nn, target[..., 2::4, 2::4])
    bic = d.make_lr(sharp, 4, "bicubic")
    ref = d.bicubic_downscale(sharp.double() * 255, 4)
    assert bic.dtype == torch.uint8 and torch.equal(bic, ref.add(0.5).floor().clamp(0, 255)
                                                    .to(torch.uint8))
    assert (bic.float() - d.make_lr(hr, 4, "bicubic").float()).abs().mean() > 0.5
    with pytest.raises(ValueError, match="expected nn, bicubic or realesrgan"):
        d.make_lr(hr, 4, "box")
