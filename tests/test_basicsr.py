import json
import multiprocessing
import pickle
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_basicsr_lmdb
from test_cli import run
from srdata import DBError, PackedDB
from srdata.basicsr import BasicSRDB
from srdata.reader import open_db, same_database
from srdata.pack import pack


def test_round_trip_bit_exact(basicsr_db):
    path, image_dir, files, keys = basicsr_db
    db = BasicSRDB(path)
    assert len(db) == 7 and db.codec == "png"
    assert db.manifest == {"format": "basicsr-lmdb", "count": 7, "codec": "png",
                           "source_root": str(path), "skipped": [], "shards": []}
    assert [r.key for r in db.records] == keys and [r.id for r in db.records] == list(range(7))
    for i, f in enumerate(files):
        bgr = cv2.imread(str(image_dir / f), cv2.IMREAD_COLOR)
        rgb = db.image(i)
        assert rgb.dtype == np.uint8 and rgb.shape == bgr.shape
        assert np.array_equal(rgb, bgr[:, :, ::-1]), f
        assert (db.heights[i], db.widths[i]) == bgr.shape[:2]
        assert db.records[i].shape == (*bgr.shape[:2], 3) and db.records[i].shard == 0
    assert db.heights.dtype == db.widths.dtype == np.int64
    assert db.read(0)[:8] == b"\x89PNG\r\n\x1a\n"


def test_grayscale_decodes_to_three_channels(basicsr_db):
    path, image_dir, files, keys = basicsr_db
    meta = (path / "meta_info.txt").read_text()
    assert "gray v1.5.png (120,160,1) 1\n" in meta
    db = BasicSRDB(path)
    i = keys.index("gray v1.5")
    gray = cv2.imread(str(image_dir / files[i]), cv2.IMREAD_UNCHANGED)
    assert gray.ndim == 2 and db.records[i].channels == 3
    rgb = db.image(i)
    assert rgb.shape == (*gray.shape, 3)
    assert all(np.array_equal(rgb[:, :, c], gray) for c in range(3))


def test_open_db_dispatch(basicsr_db, image_dir, tmp_path, small_cfg):
    path = basicsr_db[0]
    assert type(open_db(path)) is BasicSRDB
    pack(image_dir, tmp_path / "packed", small_cfg(codec="png"), progress=False)
    packed = open_db(tmp_path / "packed")
    assert type(packed) is PackedDB and len(packed) == 7
    (tmp_path / "neither").mkdir()
    for bad in (tmp_path / "neither", tmp_path / "absent"):
        with pytest.raises(DBError, match="srdata pack"):
            open_db(bad)


def test_missing_meta(basicsr_db):
    path = basicsr_db[0]
    (path / "meta_info.txt").unlink()
    with pytest.raises(DBError, match=r"meta_info\.txt is missing"):
        BasicSRDB(path)
    # what a user opens: not "not an srpipe database (no manifest.json)"
    with pytest.raises(DBError, match=r"is not a BasicSR LMDB: .*meta_info\.txt is missing"):
        open_db(path)


def test_missing_data_mdb(basicsr_db):
    path = basicsr_db[0]
    (path / "data.mdb").unlink()
    with pytest.raises(DBError, match=r"data\.mdb is missing"):
        BasicSRDB(path)


@pytest.mark.parametrize("bad", ["im009.png", "im009.png (120,160) 1", "im009.png 120x160x3 1",
                                 "(120,160,3) 1", "im009.png (120,160,3)",
                                 "im009.png\xa0(120,160,3) 1"])  # not dropped in silence
def test_malformed_line_names_file_and_line(basicsr_db, bad):
    path = basicsr_db[0]
    meta = path / "meta_info.txt"
    lines = meta.read_text().splitlines()
    lines[2] = bad
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(DBError) as e:
        BasicSRDB(path)
    assert str(e.value) == (f"line 3 of {meta}: expected `name (h,w,c) level`, "
                            f"got {bad!r}")


def test_empty_meta(basicsr_db):
    path = basicsr_db[0]
    (path / "meta_info.txt").write_text("\n\n")
    with pytest.raises(DBError, match="lists no images"):
        BasicSRDB(path)


def test_missing_key_named(basicsr_db):
    path = basicsr_db[0]
    with open(path / "meta_info.txt", "a") as f:
        f.write("000/00000099.png (96,96,3) 1\n")
    db = BasicSRDB(path)
    assert db.records[-1].key == "000/00000099"
    for get in (db.read, db.image):
        with pytest.raises(DBError, match=r"key '000/00000099' .* missing from data\.mdb"):
            get(len(db) - 1)
    assert db.image(0).shape[2] == 3  # the rest still reads


def _read_all(db):
    return [db.image(i).sum() for i in range(len(db))]


def test_pickles_and_reads_in_workers(basicsr_db):
    db = BasicSRDB(basicsr_db[0])
    expected = _read_all(db)  # the parent holds an open environment before forking
    clone = pickle.loads(pickle.dumps(db))
    assert clone.path == db.path and clone.records == db.records
    assert _read_all(clone) == expected
    methods = [m for m in ("fork", "spawn") if m in multiprocessing.get_all_start_methods()]
    for method in methods:
        with multiprocessing.get_context(method).Pool(1) as pool:
            assert pool.apply(_read_all, (db,)) == expected, method


def test_cli_inspects_verifies_and_warms_a_basicsr_lmdb(basicsr_db):
    from conftest import corrupt_byte
    path, image_dir, files, keys = basicsr_db
    r = run("inspect", path, "--json")
    d = json.loads(r.output)
    assert r.exit_code == 0 and d["format"] == "basicsr-lmdb" and d["count"] == 7
    assert d["bytes"] > 0
    assert run("inspect", path).exit_code == 0
    r = run("verify", path, "-q")
    assert r.exit_code == 0 and "all 7 records OK" in r.output, r.output
    assert run("warm", path, "-q").exit_code == 0
    value = BasicSRDB(path).read(2)
    data = (path / "data.mdb").read_bytes()
    corrupt_byte(path / "data.mdb", data.index(value) + 20)  # inside the PNG's IHDR
    r = run("verify", path, "-q")
    assert r.exit_code == 1 and f"key {keys[2]}" in r.output, r.output


def test_meta_info_shapes_that_differ_from_the_images_read_as_basicsr_does(basicsr_db):
    # BasicSR's own test LMDBs list 480x500 for a 480x492 image; BasicSR trusts the image
    import torch

    import srdata
    path, image_dir, files, keys = basicsr_db
    meta = path / "meta_info.txt"
    lines = meta.read_text().splitlines()
    stored = cv2.imread(str(image_dir / files[1])).shape[:2]
    lines[1] = f"{keys[1]}.png ({stored[0] + 8},{stored[1] + 40},3) 1"
    meta.write_text("\n".join(lines) + "\n")
    db = BasicSRDB(path)
    assert (db.heights[1], db.widths[1]) == stored and db.image(1).shape[:2] == stored
    assert db.mismatches == [(1, stored[0] + 8, stored[1] + 40)]
    lo = srdata.make_loader(db, "torch", batch_size=1, patch_size=min(stored) // 4 * 4,
                            scale=4, workers=0, device="cpu", dtype=torch.uint8, ids=[1])
    for _ in range(12):  # crops drawn all over the image: none may fall outside it
        assert sum(len(hr) for _, hr in lo) == 1
    r = run("verify", path, "-q")
    assert r.exit_code == 0 and "all 7 records OK, 1 warning(s)" in r.output, r.output
    assert (f"WARNING key {keys[1]!r} (image 1): meta_info.txt lists {stored[0] + 8}x"
            f"{stored[1] + 40} (HxW), the stored PNG is {stored[0]}x{stored[1]}") in r.output
    r = run("verify", path, "-q", "--strict")
    assert r.exit_code == 1 and "0 problem(s) and 1 warning(s)" in r.output, r.output


def test_exact_meta_parser_reads_what_the_general_pattern_reads(tmp_path, monkeypatch):
    from srdata import basicsr
    meta = tmp_path / "meta_info.txt"
    exact = "a.png (10,20,3) 1\nsub/b c.png (7,8,1) 0\nx.y.png (100,2,4) 3\n"
    odd = ["a.png  (10,20,3) 1\n", "a.png\t(1,2,3)\t1\r\n", " lead.png (1,2,3) 1\n",
           "p (q).png (1,2,3) 1\n", "a.png (1, 2, 3) 1\n", "ünï.png (1,2,3) 1\n",
           "a.png (1,2,3) 1", "a.png (1,2,3) 1\n\nb.png (4,5,3) 2\n", "a) b.png (1,2,3) 1\n"]
    for text in [exact] + odd:
        meta.write_text(text, encoding="utf-8")
        assert (basicsr._parse_exact(text) is not None) == (text == exact), text
        fast = basicsr._parse_meta(meta)
        with monkeypatch.context() as m:
            m.setattr(basicsr, "_parse_exact", lambda text: None)
            general = basicsr._parse_meta(meta)
        assert list(fast[0]) == list(general[0]) and fast[1] == general[1], text
        assert all(np.array_equal(a, b) and a.dtype == b.dtype
                   for a, b in zip(fast[2:], general[2:])), text


def remake_from_other_images(path, image_dir, files, keys, tmp_path):
    """``path`` made again, as BasicSR makes it, from other images under the same names and
    of the same sizes and channels (each one inverted): meta_info.txt is byte for byte
    the same."""
    other = tmp_path / "other-images"
    for f in files:
        img = cv2.imread(str(image_dir / f), cv2.IMREAD_UNCHANGED)
        (other / f).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(other / f), 255 - img)
    meta = (path / "meta_info.txt").read_bytes()
    shutil.rmtree(path)
    make_basicsr_lmdb(path, other, files, keys)
    assert (path / "meta_info.txt").read_bytes() == meta


def test_identity_covers_the_data_not_only_the_listing(basicsr_db, tmp_path):
    """meta_info.txt and the image sizes alone let a rewrite with the same names and sizes
    pass for the same LMDB; a copy must still pass."""
    path, image_dir, files, keys = basicsr_db
    first = BasicSRDB(path)
    ident, image = first.identity, first.image(3)
    shutil.copytree(path, tmp_path / "copy.lmdb")
    assert BasicSRDB(tmp_path / "copy.lmdb").identity == ident
    remake_from_other_images(path, image_dir, files, keys, tmp_path)
    again = BasicSRDB(path)  # in this process too: the new file, not the one mapped before
    assert not np.array_equal(again.image(3), image) and again.identity != ident
    # a change in place (another process: LMDB maps a file once per process): the LMDB's
    # transaction count moves on
    ident = again.identity
    subprocess.run([sys.executable, "-c", f"""if True:
        import lmdb
        with lmdb.open({str(path)!r}).begin(write=True) as txn:
            txn.put({keys[3].encode()!r}, txn.get({keys[3].encode()!r}))"""], check=True)
    assert BasicSRDB(path).identity != ident


def test_an_identity_saved_before_the_data_digest_still_matches():
    """Checkpoints of earlier versions hold a BasicSR LMDB's listing digest alone."""
    now = "sha256:" + "a" * 64 + ";data:" + "b" * 64
    assert same_database(now, now) and same_database("sha256:" + "a" * 64, now)
    assert not same_database("sha256:" + "c" * 64, now)
    assert not same_database("sha256:" + "a" * 64 + ";data:" + "c" * 64, now)
    assert same_database("0123abcd", "0123abcd") and not same_database("0123abcd", now)
    assert same_database(None, None) and not same_database(None, now)


def test_resume_refuses_an_lr_lmdb_made_again_from_other_images(tmp_path):
    """--db HR.lmdb --lr-db LR.lmdb, LR.lmdb made again from other images with the same
    names and sizes, --resume: training went on with mismatched pairs."""
    from srtrain.cli import main as train_main
    from test_paired import make_pair_folders
    hr_dir, lr_dir = make_pair_folders(tmp_path, sizes=[(96, 120), (132, 96), (108, 108)])
    files = sorted(str(p.relative_to(hr_dir)) for p in hr_dir.rglob("*.png"))
    keys = [f.rsplit(".", 1)[0] for f in files]
    hr, lr = tmp_path / "HR.lmdb", tmp_path / "LR.lmdb"
    make_basicsr_lmdb(hr, hr_dir, files, keys)
    make_basicsr_lmdb(lr, lr_dir, files, keys)
    args = ["--db", str(hr), "--lr-db", str(lr), "--out", str(tmp_path / "run"), "--model",
            "srcnn", "--patch", "48", "--batch-size", "2", "--loader", "torch", "--workers",
            "0", "--device", "cpu", "--val-split", "0.34", "--val-images", "1", "-q"]
    r = CliRunner().invoke(train_main, args + ["--epochs", "1"])
    assert r.exit_code == 0, r.output
    remake_from_other_images(lr, lr_dir, files, keys, tmp_path)
    r = CliRunner().invoke(train_main, args + ["--epochs", "2", "--resume"])
    assert r.exit_code == 1 and (f"--lr-db {lr} is not the database the checkpoint was "
                                 "trained on") in r.output, r.output
    shutil.rmtree(lr)  # the same images again: the same LMDB, byte for byte
    make_basicsr_lmdb(lr, lr_dir, files, keys)
    r = CliRunner().invoke(train_main, args + ["--epochs", "2", "--resume"])
    assert r.exit_code == 0, r.output
