"""The DALI degradation graph against the torch reference, in DALI's CPU mode."""
import numpy as np
import pytest
import torch

from srdata import degrade as d
from srdata.degrade_params import sample_params
from srdata.samples import synthetic_image

pytest.importorskip("nvidia.dali", reason="the DALI degradation needs DALI: pip install '.[dali]'")
pytestmark = pytest.mark.dali

from nvidia.dali import fn, pipeline_def  # noqa: E402

from srdata import dali_degrade as dd  # noqa: E402

N, H, S = 8, 64, 4


def constant(values):
    return lambda: list(values)  # a source without arguments: DALI passes none


def run(graph, images, inputs, seed=0):
    """Run ``graph(image node, {name: node})`` once on CPU: per output, an (N, ...) array,
    or a list of N arrays where the samples' shapes differ."""
    sources = {k: constant(v) for k, v in inputs.items()}
    image_source = constant(images)

    @pipeline_def(enable_conditionals=True, batch_size=len(images), num_threads=1,
                  device_id=None, seed=seed)
    def pipe():
        img = fn.external_source(source=image_source, batch=True, layout="HWC")
        return graph(img, {k: fn.external_source(source=s, batch=True)
                           for k, s in sources.items()})

    p = pipe()
    p.build()
    outs = [[np.array(t[i]) for i in range(len(images))] for t in p.run()]
    return [np.stack(o) if len({a.shape for a in o}) == 1 else o for o in outs]


@pytest.fixture(scope="module")
def batch():
    imgs = [synthetic_image(H, H, i) for i in range(N)]
    hr = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    return imgs, hr


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def test_each_stage_matches_reference(batch):
    imgs, hr = batch
    x = hr.float() / 255
    fimgs = [im.astype(np.float32) / 255 for im in imgs]
    p = sample_params(np.random.default_rng(0), N)
    kernels = dd.dali_inputs(p, H, H, S)["kernel1"]
    sizes = np.array([[23, 29], [89, 83], [9, 10]] * 3, np.float32)[:N]
    q = np.linspace(30, 95, N).astype(np.int32)

    def graph(img, a):
        return (dd.blur(img, a["k"]), dd.jpeg(img, a["q"]),
                *[dd.resize(img, a["size"], a[f"m{m}"]) for m in range(3)])

    modes = {f"m{m}": np.full(N, m, np.int32) for m in range(3)}  # area, bilinear, bicubic
    blur, jpg, *resized = run(graph, fimgs, {"k": kernels, "q": q, "size": sizes} | modes)
    ref = nhwc(d.filter2d(x, torch.from_numpy(kernels)))
    assert np.abs(blur - ref).max() * 255 < 0.01
    ref = np.stack([nhwc(d.jpeg(x[i:i + 1], q[i]))[0] for i in range(N)])
    assert np.array_equal(jpg, ref)  # DALI's CPU JPEG is OpenCV's libjpeg
    # resize: bilinear is exact; DALI's cubic is not torch's a = -0.75; DALI has no area
    limits = {0: (3.0, 60.0), 1: (0.01, 0.01), 2: (1.0, 12.0)}  # mean, max grey levels
    for mode, out in enumerate(resized):
        for i in range(N):
            ref = nhwc(d.resize(x[i:i + 1], sizes[i], mode))[0]
            diff = np.abs(out[i] - ref) * 255 if out[i].shape == ref.shape else None
            assert diff is not None, (mode, i, out[i].shape, ref.shape)
            assert diff.mean() < limits[mode][0] and diff.max() <= limits[mode][1], (mode, i)


def test_noise_levels_match_reference():
    grey = np.full((48, 48, 3), 0.5, np.float32)
    ramp = ((np.arange(48 * 48).reshape(48, 48) % 200 + 28) / 255).astype(np.float32)
    ramp = np.repeat(ramp[:, :, None], 3, 2)
    imgs = [grey, grey, ramp, ramp]
    a = {"gaussian": np.array([1, 1, 0, 0], bool), "sigma": np.float32([10, 25, 0, 0]),
         "poisson": np.float32([0, 0, 2, 2]), "gray": np.array([0, 1, 0, 1], bool)}
    (out,) = run(lambda img, n: (dd.add_noise(img, n["gaussian"], n["sigma"], n["poisson"],
                                              n["gray"]),), imgs, a)
    noise = (out - np.stack(imgs)) * 255
    assert noise[0].std() == pytest.approx(10, rel=0.05)
    assert noise[1].std() == pytest.approx(25, rel=0.05)
    assert np.array_equal(out[1][:, :, 0], out[1][:, :, 2])
    assert not np.array_equal(out[0][:, :, 0], out[0][:, :, 2])
    assert np.array_equal(out[3][:, :, 0], out[3][:, :, 1])
    t = torch.from_numpy(ramp).permute(2, 0, 1)[None]
    for i, gray in ((2, False), (3, True)):
        ref = (d.add_noise(t, False, 0.0, 2.0, gray, seed=i) - t) * 255
        assert noise[i].std() == pytest.approx(ref.std().item(), rel=0.1)


def test_whole_chain_against_reference(batch):
    imgs, hr = batch
    p = sample_params(np.random.default_rng(3), N)
    (lr,) = run(lambda img, a: (dd.degrade(img, a),), imgs, dd.dali_inputs(p, H, H, S))
    assert lr.shape == (N, H // S, H // S, 3) and lr.dtype == np.uint8
    ref = nhwc(d.realesrgan_degrade(hr, p, S)) * 255
    diff = lr - ref
    # noise realisations differ (each side draws its own): compare statistics over the batch
    assert abs(diff.mean()) < 2 and diff.std() < 20
    other = nhwc(d.realesrgan_degrade(hr, sample_params(np.random.default_rng(4), N), S))
    assert (lr - other * 255).std() > diff.std()
    # without noise and with bilinear resizes every stage is exact: within one grey level
    p = exact(p)
    (lr,) = run(lambda img, a: (dd.degrade(img, a),), imgs, dd.dali_inputs(p, H, H, S))
    diff = np.abs(lr - nhwc(d.realesrgan_degrade(hr, p, S)) * 255)
    assert diff.max() <= 1 and diff.mean() < 0.01


def exact(p):
    """``p`` without noise and with bilinear resizes only: the stages DALI computes as the
    reference does."""
    p = dict(p)
    for s in "12":
        p[f"gaussian{s}"], p[f"sigma{s}"] = np.ones(N, bool), np.zeros(N)
        p[f"mode{s}"] = np.ones(N, np.int64)
    p["mode_final"] = np.ones(N, np.int64)
    return p


def test_usm_and_the_lr_of_the_sharpened_hr_match_reference(batch):
    imgs, hr = batch
    fimgs = [im.astype(np.float32) / 255 for im in imgs]
    (sharp,) = run(lambda img, a: (dd.usm_sharpen(img),), fimgs, {})
    sharp_ref = d.usm_sharpen(hr.float() / 255)
    assert np.abs(sharp - nhwc(sharp_ref)).max() * 255 < 0.01
    p = exact(sample_params(np.random.default_rng(5), N))
    inputs = dd.dali_inputs(p, H, H, S)
    lr, bic, nn = run(lambda img, a: (dd.degrade(img, a, usm=True),
                                      dd.bicubic_downscale(img, H, S, usm=True),
                                      dd.nn_downscale(img, H, S, usm=True)), imgs, inputs)
    for got, kind in ((lr, "realesrgan"), (bic, "bicubic"), (nn, "nn")):
        want = nhwc(d.make_lr(sharp_ref, S, kind, p)).astype(np.int16)
        diff = np.abs(got.astype(np.int16) - want)
        assert got.dtype == np.uint8 and diff.max() <= 1 and diff.mean() < 0.01, kind
        plain = nhwc(d.make_lr(hr, S, kind, p)).astype(np.int16)
        assert np.abs(got - plain).mean() > 1, kind  # the sharpened HR's LR, not the HR's


def test_dali_inputs_dtypes():
    p = sample_params(np.random.default_rng(0), 3)
    a = dd.dali_inputs(p, 64, 48, 4)
    assert set(a) == set(dd.INPUTS)
    assert all(a[k].dtype == dd.INPUTS[k] and len(a[k]) == 3 for k in a)
    assert a["kernel1"].shape == (3, 21, 21) and (a["size_final"] == [16, 12]).all()
