import json

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import srdata
from conftest import make_basicsr_lmdb, run
from srdata import DBError
from srdata.reader import open_db
from srdata import format as fmt
from srdata.pack import PackConfig, pack
from srdata.paired import pair
from srdata.sampler import HFLIP, ID, TRANSPOSE, VFLIP, X, Y, crop_and_flip, lr_row
from srdata.samples import synthetic_image, write_image

# HR sides are multiples of 12, so every scale divides them; LR is HR / 4 by INTER_AREA.
SIZES = [(96, 120), (132, 96), (108, 108), (120, 144), (96, 156), (144, 108)]
KW = dict(batch_size=4, patch_size=48, scale=4, seed=3, dtype=torch.uint8, workers=1,
          device="cpu", drop_last=False)


def area(img, scale):
    h, w = img.shape[:2]
    return cv2.resize(img, (w // scale, h // scale), interpolation=cv2.INTER_AREA)


def make_pair_folders(root, scale=4, lr_suffix="", sizes=SIZES):
    hr_dir, lr_dir = root / "hr", root / "lr"
    for i, (h, w) in enumerate(sizes):
        img = synthetic_image(h, w, 50 + i)
        sub = "a" if i % 2 else "b"
        for d in (hr_dir / sub, lr_dir / sub):
            d.mkdir(parents=True, exist_ok=True)
        write_image(hr_dir / sub / f"im{i:03d}.png", img)
        write_image(lr_dir / sub / f"im{i:03d}{lr_suffix}.png", area(img, scale))
    return hr_dir, lr_dir


def pack_as_is(src, dst, codec):
    cfg = PackConfig(fit="none", min_size=8, codec=codec, workers=1)
    pack(src, dst, cfg, progress=False)
    return dst


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """``paired(hr_codec, lr_codec)``: (HR db, LR db) paths of the SIZES images."""
    root = tmp_path_factory.mktemp("paired")
    hr_dir, lr_dir = make_pair_folders(root)
    built = {}

    def get(hr_codec, lr_codec):
        for d, codec in ((hr_dir, hr_codec), (lr_dir, lr_codec)):
            if (d, codec) not in built:
                built[d, codec] = pack_as_is(d, root / f"{d.name}-{codec}", codec)
        return built[hr_dir, hr_codec], built[lr_dir, lr_codec]
    return get


def reference(hr_db, lr_db, loader, epoch):
    """The sampler's rows cut from the two databases' decoded images."""
    patch, s, ids = loader.sampler.patch, loader.scale, loader.lr.ids
    out = []
    for rows in loader.sampler.batches(epoch):
        hr = np.stack([crop_and_flip(hr_db.image(int(r[ID])), r, patch) for r in rows])
        lr = np.stack([crop_and_flip(lr_db.image(int(ids[r[ID]])), lr_row(r, s), patch // s)
                       for r in rows])
        out.append((lr, hr))
    return out


# each side either cut by the source (raw) or decoded in the graph, whole or just the ROI
@pytest.mark.dali
@pytest.mark.parametrize("codecs, roi", [(("raw", "png"), True), (("png", "raw"), False)])
def test_both_loaders_give_the_same_aligned_pairs(paired, codecs, roi):
    pytest.importorskip("nvidia.dali")
    hr_path, lr_path = paired(*codecs)
    hr_db, lr_db = open_db(hr_path), open_db(lr_path)
    got = {}
    for name in ("torch", "dali"):
        dali = srdata.DaliTuning(roi_decode=roi) if name == "dali" else None
        lo = srdata.make_loader(hr_path, name, lr_db=lr_path, dali=dali, **KW)
        assert lo.sampler.align == 4 and len(lo) == 2
        got[name] = run(lo)
        ref = reference(hr_db, lr_db, lo, 0)
        assert len(got[name]) == len(ref)
        for (lr, hr), (rlr, rhr) in zip(got[name], ref):
            assert lr.shape[1:] == (12, 12, 3) and hr.shape[1:] == (48, 48, 3)
            assert np.array_equal(hr, rhr) and np.array_equal(lr, rlr)
    rows = lo.sampler.plan(0)
    assert (rows[:, [Y, X]] % 4 == 0).all() and rows[:, [Y, X]].max() > 0
    assert rows[:, HFLIP].any() and rows[:, VFLIP].any() and rows[:, TRANSPOSE].any()
    # the LR is the LR database's pixels, not a downscale of the HR: INTER_AREA of each HR
    # patch equals its LR patch only if the crops are aligned and flipped alike
    for lr, hr in got["torch"]:
        for a, b in zip(lr, hr):
            assert np.array_equal(a, area(b, 4))
            assert not np.array_equal(a, b[2::4, 2::4])


def test_resume_and_ranks_keep_working(paired):
    hr_path, lr_path = paired("png", "png")
    kw = KW | {"batch_size": 2, "workers": 0}
    whole = run(srdata.make_loader(hr_path, "torch", lr_db=lr_path, **kw))
    first = srdata.make_loader(hr_path, "torch", lr_db=lr_path, **kw)
    head = run(first, 1)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = srdata.make_loader(hr_path, "torch", lr_db=lr_path, **kw)
    resumed.load_state_dict(state)
    rest = run(resumed)
    assert len(head) == 1 and len(head + rest) == len(whole) == 3
    for (a, b), (c, d) in zip(head + rest, whole):
        assert np.array_equal(a, c) and np.array_equal(b, d)
    rows = resumed.sampler.plan(0)
    for r in range(2):
        lo = srdata.make_loader(hr_path, "torch", lr_db=lr_path, rank=r, world_size=2, **kw)
        assert np.array_equal(lo.sampler.plan(0), rows[r::2])
        for lr, hr in run(lo):
            for a, b in zip(lr, hr):
                assert np.array_equal(a, area(b, 4))


def fake_db(path, names, sizes):
    class DB:
        pass
    db = DB()
    db.path, db.codec = path, "png"
    n = len(names)
    db.records = fmt.Index(np.zeros(n), [b"%08d" % i for i in range(n)],
                           [h for h, _ in sizes], [w for _, w in sizes], np.full(n, 3),
                           np.zeros(n), np.zeros(n), [f"{name}.png" for name in names])
    db.heights, db.widths = db.records.height, db.records.width
    return db


def test_pairing_by_name_and_its_errors():
    names = ["a/0001", "a/0002", "b/0003"]
    hr = fake_db("HR", names, [(96, 120), (48, 48), (120, 96)])
    # matched by name, not by position; DIV2K's x4 suffix accepted
    lr = fake_db("LR", ["b/0003", "a/0001x4", "a/0002"], [(30, 24), (24, 30), (12, 12)])
    assert pair(hr, lr, 4).ids.tolist() == [1, 2, 0]
    with pytest.raises(DBError, match=r"'a/0002'.*has no LR image in LR"):
        pair(hr, fake_db("LR", ["a/0001", "b/0003"], [(24, 30), (30, 24)]), 4)
    with pytest.raises(DBError, match=r"LR image 'c/0009' of LR has no HR image"):
        pair(hr, fake_db("LR", names + ["c/0009"], [(24, 30), (12, 12), (30, 24), (9, 9)]),
             4)
    with pytest.raises(DBError, match=r"image 'a/0002': HR 48x48 px in HR is not 4 x its LR "
                                      r"13x12 px in LR \(2 pair"):
        pair(hr, fake_db("LR", names, [(24, 30), (12, 13), (30, 25)]), 4)
    with pytest.raises(DBError, match=r"holds the name 'a/0001' twice"):
        pair(hr, fake_db("LR", ["a/0001", "a/0001", "b/0003"], [(24, 30)] * 3), 4)
    with pytest.raises(DBError, match=r"'a/0001x4' of LR pairs with two HR images"):
        pair(fake_db("HR", ["a/0001", "a/0001x4"], [(96, 120)] * 2),
             fake_db("LR", ["a/0001x4", "zz"], [(24, 30)] * 2), 4)


def test_errors_through_make_loader(paired, tmp_path):
    hr_path, lr_path = paired("png", "png")
    with pytest.raises(DBError, match=r"image 'a/im001': HR 96x132 px .* is not 2 x its LR "
                                      r"24x33 px .*\(6 pair"):
        srdata.make_loader(hr_path, "torch", lr_db=lr_path, **KW | {"scale": 2})
    # an LR database of other images: refused, the first missing name given
    other = tmp_path / "other"
    other.mkdir()
    write_image(other / "x.png", synthetic_image(24, 30, 1))
    with pytest.raises(DBError, match=r"HR image 'a/im001' .* has no LR image"):
        srdata.make_loader(hr_path, "torch", lr_db=pack_as_is(other, tmp_path / "o", "png"),
                           **KW)


def test_basicsr_lmdb_pair(tmp_path):
    """DIV2K_train_HR_sub.lmdb + DIV2K_train_LR_bicubic_X4_sub.lmdb, as BasicSR writes them:
    the same keys in both; a missing key is named."""
    hr_dir, lr_dir = make_pair_folders(tmp_path, sizes=SIZES[:4])
    files = sorted(str(p.relative_to(hr_dir)) for p in hr_dir.rglob("*.png"))
    keys = [f.rsplit(".", 1)[0] for f in files]
    hr_path, lr_path = tmp_path / "HR_sub.lmdb", tmp_path / "LR_X4_sub.lmdb"
    make_basicsr_lmdb(hr_path, hr_dir, files, keys)
    make_basicsr_lmdb(lr_path, lr_dir, files, keys)
    lo = srdata.make_loader(hr_path, "torch", lr_db=lr_path, **KW | {"workers": 0})
    got = run(lo)
    ref = reference(open_db(hr_path), open_db(lr_path), lo, 0)
    assert len(got) == 1
    for (lr, hr), (rlr, rhr) in zip(got, ref):
        assert np.array_equal(lr, rlr) and np.array_equal(hr, rhr)
        assert all(np.array_equal(a, area(b, 4)) for a, b in zip(lr, hr))
    short = tmp_path / "LR_short.lmdb"
    make_basicsr_lmdb(short, lr_dir, files[1:], keys[1:])
    with pytest.raises(DBError, match=f"HR image {keys[0]!r} .* has no LR image"):
        srdata.make_loader(hr_path, "torch", lr_db=short, **KW)


def test_srtrain_with_lr_db_trains_and_validates_on_the_real_lr(paired, tmp_path):
    from srtrain import checkpoint
    from srtrain.cli import main
    from srtrain.validate import ValSet, split_ids
    hr_path, lr_path = paired("png", "png")
    out = tmp_path / "run"
    args = ["--db", str(hr_path), "--lr-db", str(lr_path), "--out", str(out),
            "--model", "srcnn", "--patch", "48", "--batch-size", "2", "--epochs", "1",
            "--loader", "torch", "--workers", "0", "--device", "cpu", "--val-split", "0.34",
            "--val-images", "2", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    end = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["step"] == 2  # 4 train images
    cfg = checkpoint.load(out / "last.pt")["config"]
    assert cfg["lr_db"] == str(lr_path)
    # validation: the same held-out split, its LR the LR database's centre crops
    hr_db, lr_db = open_db(hr_path), open_db(lr_path)
    _, val_ids = split_ids(len(hr_db), 0.34, 0)
    val = ValSet(hr_db, val_ids, 48, 4, 2, lr=pair(hr_db, lr_db, 4))
    for a, b in zip(val.lr.permute(0, 2, 3, 1).numpy(), val.hr.permute(0, 2, 3, 1).numpy()):
        assert np.array_equal(a, area(b, 4))
    psnr = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if e["event"] == "val"][0]["psnr_bicubic"]
    assert np.isclose(psnr, val.baseline["psnr_bicubic"])
    # a resume left without --lr-db takes the run's own (OUT/config.json)
    r = CliRunner().invoke(main, args[:2] + args[4:] + ["--resume", "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert checkpoint.load(out / "last.pt")["config"]["lr_db"] == str(lr_path)
    # a separate validation set needs its own LR: paired by --val-lr-db (as BasicSR's
    # DIV2K -> Set5 recipe validates), or made by --val-degradation
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "v"), "--val-db",
                                         str(hr_path)])
    assert r.exit_code != 0 and "give them with --val-lr-db" in r.output
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "v"), "--val-lr-db",
                                         str(lr_path)])
    assert r.exit_code != 0 and "give the validation HR database with --val-db" in r.output
    out = tmp_path / "v"
    r = CliRunner().invoke(main, args + ["--out", str(out), "--val-db", str(hr_path),
                                         "--val-lr-db", str(lr_path)])
    assert r.exit_code == 0, r.output
    val = ValSet(hr_db, range(len(hr_db)), 48, 4, 2, lr=pair(hr_db, lr_db, 4))
    psnr = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if e["event"] == "val"][0]["psnr_bicubic"]
    assert np.isclose(psnr, val.baseline["psnr_bicubic"])
    end = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["step"] == 3  # every one of the 6 images trains: validation is --val-db
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "b"), "--val-db",
                                         str(hr_path), "--val-degradation", "bicubic"])
    assert r.exit_code == 0, r.output


@pytest.mark.dali
def test_a_patch_schedule_switches_both_sides_in_both_loaders(paired):
    hr_path, lr_path = paired("png", "raw")
    kw = KW | {"patch_schedule": "24:0,48:1"}
    got = {}
    for name in ("torch", "dali"):
        lo = srdata.make_loader(hr_path, name, lr_db=lr_path, **kw)
        got[name] = [run(lo), run(lo)]  # epoch 0 at 24 px, epoch 1 at 48 px
        assert (lo.sampler.plan(1)[:, [Y, X]] % 4 == 0).all()
    for name in ("torch", "dali"):
        for epoch, side in ((0, 24), (1, 48)):
            for (lr, hr), (rlr, rhr) in zip(got[name][epoch], got["torch"][epoch], strict=True):
                assert hr.shape[1:] == (side, side, 3) and lr.shape[1:] == (side // 4,) * 2 + (3,)
                assert np.array_equal(hr, rhr) and np.array_equal(lr, rlr)
                assert all(np.array_equal(a, area(b, 4)) for a, b in zip(lr, hr))
