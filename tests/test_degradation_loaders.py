"""The LR degradations in both loaders: the sampler's parameters, parity, resume, refusals."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import srdata
from conftest import run
from srdata import degrade
from srdata.sampler import Sampler

KW = dict(batch_size=4, patch_size=64, scale=4, seed=3, dtype=torch.uint8, workers=1,
          device="cpu")


def batches(loader, n=None):
    return [(lr.astype(np.int16), hr.astype(np.int16)) for lr, hr in run(loader, n)]


def test_dali_sources_do_not_import_torch():
    code = "import sys, srdata.dali_source; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_degradation_params_depend_only_on_seed_epoch_and_row():
    sizes = np.full(600, 96)
    one = Sampler(sizes, sizes, 8, 64, seed=5)
    p = one.degradation_params(2)
    assert len(p["jpeg1"]) == len(one.plan(2)) == 600
    ranks = [Sampler(sizes, sizes, 8, 64, seed=5, rank=r, world_size=3) for r in range(3)]
    for r, s in enumerate(ranks):  # rank r holds rows r, r + 3, ...
        q = s.degradation_params(2)
        for k in p:
            assert np.array_equal(q[k], p[k][r::3][:len(q[k])]), k
    # some rows alone, directly or a chunk at a time, across a chunk's end too
    from srdata.sampler import RowParams
    rows = RowParams(one, 2)
    for a, b in ((10, 20), (250, 262), (300, 301), (255, 256)):
        for got in (one.degradation_params(2, a, b), rows.rows(a, b)):
            assert all(np.array_equal(got[k], p[k][a:b]) for k in p), (a, b)
    # a different length of epoch keeps the first rows' parameters
    fewer = Sampler(sizes, sizes, 8, 64, seed=5, sample_ratio=0.5).degradation_params(2)
    assert all(np.array_equal(fewer[k], p[k][:len(fewer[k])]) for k in p)
    # other epochs and seeds differ; crops and flips are drawn as before
    assert not np.array_equal(one.degradation_params(3)["sigma1"], p["sigma1"])
    assert not np.array_equal(Sampler(sizes, sizes, 8, 64, seed=6).degradation_params(2)
                              ["sigma1"], p["sigma1"])
    rng = np.random.default_rng([5, 2])
    assert np.array_equal(one.plan(2)[:, 0], np.arange(600)[rng.permutation(600)])


def test_bad_degradation_and_paired_data_are_refused(packed):
    path = packed("png")
    with pytest.raises(ValueError, match="expected one of nn, bicubic, realesrgan"):
        srdata.make_loader(path, "torch", **KW, degradation="bilinear")
    with pytest.raises(ValueError, match="paired database brings its own LR"):
        srdata.make_loader(path, "torch", **KW, degradation="bicubic", lr_db=path)


@pytest.mark.dali
def test_bicubic_within_one_grey_level_across_loaders(packed):
    pytest.importorskip("nvidia.dali")
    path = packed("png")
    kw = KW | {"patch_size": 48, "scale": 3}
    got = {name: batches(srdata.make_loader(path, name, **kw, degradation="bicubic"))
           for name in ("torch", "dali")}
    for (lr_t, hr_t), (lr_d, hr_d) in zip(got["torch"], got["dali"], strict=True):
        assert np.array_equal(hr_t, hr_d)
        assert lr_t.shape == lr_d.shape == (4, 16, 16, 3)
        diff = np.abs(lr_t - lr_d)
        assert diff.max() <= 1 and diff.mean() < 0.01  # float32 vs float64 on .5 ties
        ref = degrade.bicubic_downscale(torch.from_numpy(hr_t).permute(0, 3, 1, 2)
                                        .to(torch.uint8), 3)
        assert np.array_equal(lr_t, ref.permute(0, 2, 3, 1).numpy())
        nn = hr_t[:, 1::3, 1::3]
        assert np.abs(lr_t - nn).mean() > 1  # not the nearest-neighbour LR


@pytest.mark.dali
def test_realesrgan_same_parameters_and_statistics_across_loaders(packed):
    pytest.importorskip("nvidia.dali")
    path = packed("png")
    kw = KW | {"sample_ratio": 1.0}
    torch_lo = srdata.make_loader(path, "torch", **kw, degradation="realesrgan", usm=True)
    dali_lo = srdata.make_loader(path, "dali", **kw, degradation="realesrgan", usm=True)
    (lr_t, hr_t), = batches(torch_lo, 1)
    (lr_d, hr_d), = batches(dali_lo, 1)
    assert np.array_equal(hr_t, hr_d)  # the same crops, the same USM targets
    assert lr_t.shape == lr_d.shape == (4, 16, 16, 3)
    # the torch reference with the sampler's parameters of these rows, on the sharpened HR
    s = torch_lo.sampler
    p = {k: v[:4] for k, v in s.degradation_params(0).items()}
    hr = plain_hr(path, s)
    sharp = degrade.usm_sharpen(hr.float() / 255)
    assert np.array_equal(nhwc((sharp * 255).round()), hr_t)  # the targets: sharpened
    ref = nhwc(degrade.make_lr(sharp, 4, "realesrgan", p))
    assert np.array_equal(lr_t, ref)
    assert np.abs(lr_t - nhwc(degrade.make_lr(hr, 4, "realesrgan", p))).mean() > 1
    diff = (lr_d - lr_t).astype(np.float64)  # bounds of tests/test_dali_degrade.py
    assert abs(diff.mean()) < 2 and diff.std() < 20
    other = {k: v[4:8] for k, v in s.degradation_params(0).items()}
    other = nhwc(degrade.make_lr(sharp, 4, "realesrgan", other))
    assert np.std(lr_d - other) > diff.std()


def plain_hr(path, sampler, n=4):
    """The first ``n`` HR patches of the sampler's epoch 0, unsharpened, uint8 NCHW."""
    from srdata.sampler import ID, crop_and_flip
    db = srdata.PackedDB(path)
    hr = [crop_and_flip(db.image(int(r[ID])), r, sampler.patch) for r in sampler.plan(0)[:n]]
    return torch.from_numpy(np.stack(hr)).permute(0, 3, 1, 2)


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy().astype(np.int16)


@pytest.mark.dali
@pytest.mark.parametrize("degradation", ["nn", "bicubic"])
def test_usm_lr_is_made_from_the_sharpened_hr_in_both_loaders(packed, degradation):
    pytest.importorskip("nvidia.dali")
    path = packed("png")
    loaders = [srdata.make_loader(path, name, **KW, degradation=degradation, usm=True)
               for name in ("torch", "dali")]
    (lr_t, hr_t), (lr_d, hr_d) = (batches(lo, 1)[0] for lo in loaders)
    assert np.array_equal(hr_t, hr_d)  # the targets: sharpened on the device in both
    diff = np.abs(lr_t - lr_d)
    assert diff.max() <= 1 and diff.mean() < 0.01  # float32 sums apart on .5 ties
    hr = plain_hr(path, loaders[0].sampler)
    sharp = degrade.usm_sharpen(hr.float() / 255)
    assert np.array_equal(nhwc((sharp * 255).round()), hr_t)
    assert np.array_equal(lr_t, nhwc(degrade.make_lr(sharp, 4, degradation)))
    assert np.abs(lr_t - nhwc(degrade.make_lr(hr, 4, degradation))).mean() > 1  # not plain


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_realesrgan_resume_is_exact(packed, loader):
    """Mid-epoch and at an epoch's end. DALI draws the noise with generators of its own
    pipeline, which a resume rebuilt from its seed: the LR differed (by up to 38 levels)."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    path = packed("png")
    kw = KW | {"batch_size": 2, "sample_ratio": 0.7}
    lo = srdata.make_loader(path, loader, **kw, degradation="realesrgan")
    first = batches(lo, 1)
    mid = lo.state_dict()
    rest = batches(lo)  # the epoch's other batches
    end = lo.state_dict()
    later = batches(lo, 2)  # the next epoch: the same pipeline goes on
    for state, want in ((mid, rest[:1]), (end, later)):
        again = srdata.make_loader(path, loader, **kw, degradation="realesrgan")
        again.load_state_dict(state)
        resumed = batches(again, len(want))
        for (lr, hr), (lr_want, hr_want) in zip(resumed, want):
            assert np.array_equal(hr, hr_want)
            assert np.array_equal(lr, lr_want)
    assert not np.array_equal(first[0][1], rest[0][1])


@pytest.mark.dali
def test_a_pipeline_dali_cannot_checkpoint_still_trains(packed, monkeypatch):
    """Checkpointing is checked on the CPU only: should a GPU build refuse it, training goes
    on (with a warning that resumed noise will differ), from the right batch."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali.pipeline import Pipeline

    from srdata import dali_loader
    real = Pipeline.build

    def refuse(self):
        if self._enable_checkpointing:
            raise RuntimeError("Checkpointing is not implemented for this operator")
        return real(self)
    path, kw = packed("png"), KW | {"batch_size": 2}
    want = batches(srdata.make_loader(path, "torch", **kw, degradation="realesrgan"), 3)[2]
    monkeypatch.setattr(Pipeline, "build", refuse)
    lo = srdata.make_loader(path, "dali", **kw, degradation="realesrgan")
    lo.load_state_dict(lo.state_dict() | {"batch": 2})
    with pytest.warns(UserWarning, match="DALI cannot checkpoint this pipeline"):
        got = batches(lo, 1)[0]
    assert np.array_equal(got[1], want[1]) and not lo._rng
    assert isinstance(lo, dali_loader.DaliLoader)


def test_validation_lr_is_fixed_per_image_and_baseline_is_its_bicubic(packed):
    from srtrain import metrics
    from srtrain.validate import ValSet
    db = srdata.PackedDB(packed("png"))
    sets = {d: ValSet(db, [0, 2, 4], 64, 4, 3, degradation=d)
            for d in ("nn", "bicubic", "realesrgan")}
    again = ValSet(db, [4, 2], 64, 4, 3, degradation="realesrgan")  # other order, fewer
    assert torch.equal(again.lr[0], sets["realesrgan"].lr[2])  # an image's LR is its own
    assert torch.equal(sets["bicubic"].lr, degrade.bicubic_downscale(sets["nn"].hr, 4))
    psnr = {d: v.baseline["psnr_bicubic"] for d, v in sets.items()}
    assert len(set(psnr.values())) == 3  # each baseline upscales its own LR
    v = sets["realesrgan"]
    bic = metrics.bicubic(v.lr.float() / 255, 4)
    assert psnr["realesrgan"] == pytest.approx(
        float(metrics.psnr_y(bic, v.hr.float() / 255, 4).mean()))


def test_srtrain_degradation_options(packed, tmp_path):
    from srtrain import checkpoint
    from test_train import train
    db, tiny = packed("png"), ("--batch-size", 4, "--epochs", 1)
    r = train(db, tmp_path / "a", *tiny, "--degradation", "realesrgan", "--val-degradation",
              "bicubic", "--usm")
    assert r.exit_code == 0, r.output
    cfg = checkpoint.load(tmp_path / "a" / "last.pt")["config"]
    assert (cfg["degradation"], cfg["val_degradation"], cfg["usm"]) == ("realesrgan",
                                                                        "bicubic", True)
    assert cfg["augment"] == "all"  # the default: every symmetry, as runs before the option
    r = train(db, tmp_path / "d", *tiny, "--degradation", "realesrgan", "--usm",
              "--augment", "hflip")
    assert r.exit_code == 0, r.output
    assert checkpoint.load(tmp_path / "d" / "last.pt")["config"]["augment"] == "hflip"
    r = train(db, tmp_path / "e", *tiny, "--augment", "rot")
    assert r.exit_code == 2 and "'rot' is not one of 'all', 'hflip', 'none'" in r.output
    r = train(db, tmp_path / "b", *tiny, "--degradation", "box")
    assert r.exit_code == 2 and "'box' is not one of 'nn', 'bicubic', 'realesrgan'" in r.output
    r = train(db, tmp_path / "c", *tiny, "--lr-db", db, "--degradation", "bicubic")
    assert r.exit_code == 1 and "--lr-db brings its own LR; drop --degradation" in r.output
