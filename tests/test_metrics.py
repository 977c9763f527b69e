"""srtrain.metrics against hand values and independent BasicSR-style references."""
import math

import cv2
import numpy as np
import pytest
import torch

from srtrain import metrics


def rgb_uint8(n, h, w, seed):
    """Smooth-ish random RGB images (N x H x W x 3 uint8), so SSIM is neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, h // 4 + 1, w // 4 + 1, 3)).astype(np.float32)
    imgs = [cv2.resize(b, (w, h), interpolation=cv2.INTER_CUBIC) for b in base]
    return np.clip(np.stack(imgs) + rng.normal(0, 3, (n, h, w, 3)), 0, 255).round().astype(np.uint8)


def degrade(img, seed, sigma=8):
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).round().astype(np.uint8)


def to_tensor(img):
    """uint8 N x H x W x 3 -> float NCHW in [0, 1], as the trainer holds images."""
    return torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255


def ref_y(img):
    """BasicSR's to_y_channel on an RGB uint8 HWC image, in numpy float64."""
    return img.astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255.0 + 16.0


def ref_psnr(a, b, border):
    ya, yb = (ref_y(x)[border:x.shape[0] - border, border:x.shape[1] - border] for x in (a, b))
    mse = np.mean((ya - yb) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ref_ssim(a, b, border):
    """BasicSR's ``_ssim`` (basicsr/metrics/psnr_ssim.py) on cropped Y, written out again."""
    img, img2 = (ref_y(x)[border:x.shape[0] - border, border:x.shape[1] - border] for x in (a, b))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    mu1 = cv2.filter2D(img, -1, window)[5:-5, 5:-5]
    mu2 = cv2.filter2D(img2, -1, window)[5:-5, 5:-5]
    mu1_sq, mu2_sq, mu1_mu2 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    sigma1_sq = cv2.filter2D(img ** 2, -1, window)[5:-5, 5:-5] - mu1_sq
    sigma2_sq = cv2.filter2D(img2 ** 2, -1, window)[5:-5, 5:-5] - mu2_sq
    sigma12 = cv2.filter2D(img * img2, -1, window)[5:-5, 5:-5] - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / (
        (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean()


def test_quantize_clamps_and_rounds_to_levels():
    t = torch.tensor([-0.2, 0.0, 0.4 / 255, 0.6 / 255, 100.4 / 255, 1.0, 1.3]).view(1, 1, 1, 7)
    q = metrics.quantize(t)
    assert q.dtype == torch.float64
    assert q.flatten().tolist() == [0, 0, 0, 1, 100, 255, 255]


def test_rgb_to_y_hand_values():
    rgb = torch.tensor([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]],
                       dtype=torch.float64).T.reshape(1, 3, 1, 5)
    y = metrics.rgb_to_y(rgb)
    assert y.shape == (1, 1, 5) and y.dtype == torch.float64
    expected = [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966]
    np.testing.assert_allclose(y.flatten().numpy(), expected, atol=1e-9)


def test_rgb_to_y_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        metrics.rgb_to_y(torch.zeros(1, 1, 4, 4))


def test_psnr_identical_is_inf():
    hr = to_tensor(rgb_uint8(2, 24, 20, 0))
    p = metrics.psnr_y(hr, hr.clone(), 4)
    assert p.shape == (2,) and p.dtype == torch.float64 and p.device.type == "cpu"
    assert torch.isinf(p).all()


@pytest.mark.parametrize("border", [0, 2, 4])
def test_psnr_matches_numpy_reference(border):
    hr8 = rgb_uint8(3, 32, 40, 1)
    sr8 = np.stack([degrade(x, 10 + i, sigma=2 + 4 * i) for i, x in enumerate(hr8)])
    p = metrics.psnr_y(to_tensor(sr8), to_tensor(hr8), border)
    expected = [ref_psnr(a, b, border) for a, b in zip(sr8, hr8)]
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-10)
    assert p[0] > p[1] > p[2]  # more noise, lower PSNR


def test_psnr_border_crop_ignores_the_border():
    hr = to_tensor(rgb_uint8(1, 24, 24, 2))
    sr = hr.clone()
    sr[..., :3, :] = 1 - sr[..., :3, :]
    sr[..., :, -3:] = 0
    assert torch.isinf(metrics.psnr_y(sr, hr, 3)).all()
    assert torch.isfinite(metrics.psnr_y(sr, hr, 2)).all()


def test_psnr_sees_quantized_images():
    """Sub-level differences and values outside [0, 1] vanish, as in BasicSR's tensor2img."""
    hr = to_tensor(rgb_uint8(1, 16, 16, 3))
    assert torch.isinf(metrics.psnr_y(hr + 0.4 / 255, hr, 0)).all()
    wild = hr * 1.5 - 0.25  # out of [0, 1]: clamped, as the saved image would be
    assert torch.isinf(metrics.psnr_y(wild, wild.clamp(0, 1), 0)).all()


def test_metrics_ignore_dtype_and_memory_format():
    hr8 = rgb_uint8(2, 32, 32, 4)
    sr8 = np.stack([degrade(x, 20) for x in hr8])
    sr, hr = to_tensor(sr8), to_tensor(hr8)
    p, s = metrics.psnr_y(sr, hr, 4), metrics.ssim_y(sr, hr, 4)
    for f in (lambda t: t.double(), lambda t: t.half(),
              lambda t: t.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(metrics.psnr_y(f(sr), f(hr), 4), p)
        assert torch.equal(metrics.ssim_y(f(sr), f(hr), 4), s)


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        metrics.psnr_y(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 20), 0)


@pytest.mark.parametrize("border", [0, 4])
def test_ssim_matches_basicsr_reference(border):
    hr8 = rgb_uint8(3, 40, 48, 5)
    sr8 = np.stack([degrade(x, 30 + i, sigma=3 + 6 * i) for i, x in enumerate(hr8)])
    s = metrics.ssim_y(to_tensor(sr8), to_tensor(hr8), border)
    assert s.shape == (3,) and s.dtype == torch.float64 and s.device.type == "cpu"
    expected = [ref_ssim(a, b, border) for a, b in zip(sr8, hr8)]
    np.testing.assert_allclose(s.numpy(), expected, rtol=0, atol=1e-10)
    assert 0 < s[2] < s[1] < s[0] < 1


def test_ssim_identical_is_one():
    hr = to_tensor(rgb_uint8(2, 40, 48, 6))
    np.testing.assert_allclose(metrics.ssim_y(hr, hr.clone(), 4).numpy(), 1.0, atol=1e-12)


@pytest.mark.parametrize("size,border", [(16, 4), (12, 4), (20, 5)])
def test_ssim_too_small_for_border(size, border):
    t = torch.rand(1, 3, size, size)
    with pytest.raises(ValueError, match="too small for SSIM with a border of"):
        metrics.ssim_y(t, t, border)


def test_psnr_too_small_for_border():
    t = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="too small for a border of 4"):
        metrics.psnr_y(t, t, 4)


def test_bicubic_shape_and_range():
    lr = torch.zeros(2, 3, 6, 5)
    lr[..., ::2, ::2] = 1  # a checkerboard: bicubic overshoots, the clamp must catch it
    out = metrics.bicubic(lr.half(), 4)
    assert out.shape == (2, 3, 24, 20) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_save_grid_layout_and_pixels(tmp_path):
    n, scale, h, w = 5, 2, 12, 16
    hr = to_tensor(rgb_uint8(n, h, w, 7))
    lr = torch.nn.functional.interpolate(hr, scale_factor=1 / scale, mode="nearest")
    sr8 = np.stack([degrade(x, 40) for x in (hr.permute(0, 2, 3, 1) * 255).round().byte().numpy()])
    sr = to_tensor(sr8)
    bic = metrics.bicubic(lr, scale)
    path = tmp_path / "deep" / "dir" / "grid.png"
    assert metrics.save_grid(path, lr, bic, sr, hr, max_rows=3) == path
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary left over
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    gap, rows, zoom = 4, 3, 16  # 12 px tiles enlarged to 192, the smallest legible size
    th, tw, head = h * zoom, w * zoom, metrics.LABEL_H
    assert img.shape == (head + rows * th + (rows - 1) * gap, 4 * tw + 3 * gap, 3)
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    # a white strip naming each column: dark text above every column, nowhere else
    strip = rgb[:head].min(axis=2)
    for c in range(4):
        x = c * (tw + gap)
        assert (strip[:, x:x + tw] < 128).sum() > 20, f"no label above column {c}"
    widths = [(strip[:, c * (tw + gap):c * (tw + gap) + tw] < 128).any(0).sum()
              for c in range(4)]
    assert widths[1] > widths[0]  # "bicubic" is wider than "LR"
    rgb = rgb[head:]

    def tile(r, c):
        y, x = r * (th + gap), c * (tw + gap)
        return rgb[y:y + th, x:x + tw]

    def big(a):
        return a.repeat(zoom, 0).repeat(zoom, 1)

    for r in range(rows):
        np.testing.assert_array_equal(tile(r, 2), big(sr8[r]))
        hr8 = (hr[r].permute(1, 2, 0) * 255).round().byte().numpy()
        np.testing.assert_array_equal(tile(r, 3), big(hr8))
        lr8 = (lr[r].permute(1, 2, 0) * 255).round().byte().numpy()
        np.testing.assert_array_equal(tile(r, 0), big(lr8.repeat(scale, 0).repeat(scale, 1)))
    assert (rgb[th:th + gap] == 255).all() and (rgb[:, tw:tw + gap] == 255).all()


def test_save_grid_fewer_images_than_rows(tmp_path):
    hr = torch.rand(1, 3, 8, 8)
    lr = hr[..., ::2, ::2]
    path = metrics.save_grid(tmp_path / "g.png", lr, metrics.bicubic(lr, 2), hr, hr)
    assert cv2.imread(str(path)).shape == (metrics.LABEL_H + 192, 4 * 192 + 3 * 4, 3)
