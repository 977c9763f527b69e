"""Damaged and replaced databases: every fault is an error naming the key or the file, never
a silent sample, a raw traceback or a crash (issue 10 sections 2, 3, 5)."""
import json
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

from conftest import SMALL, corrupt_byte, make_images, to_format_v1
from srdata import DBError, PackedDB
from srdata import format as fmt
from srdata.pack import PackConfig, pack

ROOT = Path(__file__).resolve().parents[1]
KW = dict(batch_size=4, patch_size=48, scale=4, seed=7, workers=1, device="cpu")


def copy_db(packed, codec, tmp_path) -> Path:
    db = tmp_path / codec
    shutil.copytree(packed(codec), db)
    return db


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def drain(loader):
    for _ in loader:
        pass


def test_flipped_byte_is_caught_on_read(packed, tmp_path):
    for codec in ("jpeg", "raw"):
        db = copy_db(packed, codec, tmp_path)
        value = PackedDB(db).read(4)
        data = (db / "shard-00000" / "data.mdb").read_bytes()
        # the middle of the entropy-coded data: libjpeg decodes it without an error
        corrupt_byte(db / "shard-00000" / "data.mdb", data.index(value) + len(value) // 2)
        d = PackedDB(db)
        for get in (d.read, d.image):
            with pytest.raises(DBError, match=r"key 00000004 \(image 4, from .*\) in "
                                              r"shard-00000: checksum mismatch"):
                get(4)
        assert d.image(3).shape[2] == 3  # the others still read


@pytest.mark.dali
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_flipped_byte_stops_both_loaders_naming_the_key(packed, tmp_path, loader):
    pytest.importorskip("nvidia.dali")
    import srdata
    db = copy_db(packed, "jpeg", tmp_path)
    d = PackedDB(db)
    data = (db / "shard-00000" / "data.mdb").read_bytes()
    for i in range(len(d)):  # every record: whichever the first batch draws is bad
        value = d.read(i)
        corrupt_byte(db / "shard-00000" / "data.mdb", data.index(value) + len(value) // 2)
    with pytest.raises(DBError, match=r"key 000000\d\d .*checksum mismatch.*srdata verify"):
        drain(srdata.make_loader(db, loader, **KW))


def _last_page_pgno(path: Path) -> int:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        return env.info()["last_pgno"], env.stat()["psize"]
    finally:
        env.close()


def test_truncated_shard_is_a_message_not_sigbus(packed, tmp_path):
    db = copy_db(packed, "png", tmp_path)
    data = db / "shard-00000" / "data.mdb"
    last, psize = _last_page_pgno(data.parent)
    need = (last + 1) * psize
    with open(data, "r+b") as f:
        f.truncate(need // 2)
    # a subprocess: without the check, reading past the end kills the process (SIGBUS)
    done = subprocess.run([sys.executable, "-m", "srdata.cli", "verify", str(db), "-q"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    msg = f"shard-00000/data.mdb is truncated: {need // 2} of {need} bytes; copy or pack it again"
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert msg in done.stderr and "missing" not in done.stderr, done.stderr
    assert "10 records unreadable" in done.stderr
    with pytest.raises(DBError, match=msg):
        PackedDB(db).image(0)


def _set_main_root(data: Path, pgno: int) -> None:
    """Point the main B-tree's root in both meta pages at ``pgno`` (LMDB 0.9, 64-bit: page
    header 16, magic 4, version 4, address 8, mapsize 8, free DB 48, main DB up to md_root 40)."""
    psize = _last_page_pgno(data.parent)[1]
    with open(data, "r+b") as f:
        for page in (0, 1):
            f.seek(page * psize + 16 + 4 + 4 + 8 + 8 + 48 + 40)
            f.write(struct.pack("<Q", pgno))


def test_lmdb_errors_name_shard_and_key(packed, tmp_path):
    from click.testing import CliRunner

    from srdata.cli import main
    db = copy_db(packed, "raw", tmp_path)
    data = db / "shard-00000" / "data.mdb"
    _set_main_root(data, _last_page_pgno(data.parent)[0] + 1000)  # past the last page
    with pytest.raises(DBError, match=r"key 00000002 .* in shard-00000: LMDB error: .*"
                                      r"PAGE_NOTFOUND"):
        PackedDB(db).read(2)
    r = CliRunner().invoke(main, ["verify", str(db), "-q"])
    assert r.exit_code == 1 and "PAGE_NOTFOUND" in r.output and "missing" not in r.output
    assert "Traceback" not in r.output
    # damaged meta pages (a fresh copy: this process keeps the shard above open)
    db = copy_db(packed, "png", tmp_path)
    data = db / "shard-00000" / "data.mdb"
    psize = _last_page_pgno(data.parent)[1]
    with open(data, "r+b") as f:
        for page in (0, 1):
            f.seek(page * psize + 16)
            f.write(b"\0" * 8)  # the magic and version
    r = CliRunner().invoke(main, ["verify", str(db), "-q"])
    assert r.exit_code == 1 and "missing" not in r.output, r.output
    assert r.output.count("BAD ") == 2 and "cannot open LMDB" in r.output  # + sha256 line
    with pytest.raises(DBError, match="cannot open LMDB .*shard-00000"):
        PackedDB(db).read(0)


def test_index_is_protected_and_garbled_values_are_named(packed, tmp_path):
    db = copy_db(packed, "png", tmp_path)
    to_format_v1(db)  # users' version-1 databases: index.json rows, checked value by value
    manifest = json.loads((db / "manifest.json").read_text())
    assert len(manifest["id"]) == 32 and len(manifest["index_sha256"]) == 64
    index = db / "index.json"
    original = index.read_text()
    edit_json(index, lambda ix: ix["rows"][3].__setitem__(2, ix["rows"][3][2] - 8))
    with pytest.raises(DBError, match=r"index\.json was modified after packing"):
        PackedDB(db)
    # a database packed before index_sha256 existed still opens, and bad values are named
    edit_json(db / "manifest.json", lambda m: m.pop("index_sha256"))
    assert len(PackedDB(db)) == 10
    for col, bad, expected in [(2, "abc", "an integer"), (3, 0, "1..2147483648"),
                               (0, 3, "0..0"), (6, 1.5, "an integer"), (1, 7, "a string")]:
        index.write_text(original)
        edit_json(index, lambda ix: ix["rows"][5].__setitem__(col, bad))
        with pytest.raises(DBError) as e:
            PackedDB(db)
        name = fmt.INDEX_COLUMNS[col]
        assert f"is malformed: row 5 has {name} {bad!r}, expected {expected}" in str(e.value)
    index.write_text(original)
    edit_json(index, lambda ix: ix["rows"][5].pop())
    with pytest.raises(DBError, match="row 5 is .*, expected \\[shard, key"):
        PackedDB(db)
    index.write_text(original)
    edit_json(db / "manifest.json", lambda m: m.update(format_version="1"))
    with pytest.raises(DBError) as e:
        PackedDB(db)
    assert "format_version is '1', expected an integer (1, 2)" in str(e.value)
    assert "this srpipe reads" not in str(e.value)
    edit_json(db / "manifest.json", lambda m: m.update(format_version=1, count="10"))
    with pytest.raises(DBError, match="count is '10', expected a positive integer"):
        PackedDB(db)


def test_repacked_database_is_refused_not_mixed(image_dir, tmp_path):
    db = tmp_path / "db"
    pack(image_dir, db, PackConfig(**SMALL), progress=False)
    old = PackedDB(db)
    first = old.image(0)
    clone = pickle.loads(pickle.dumps(old))  # what a worker gets, before it opens a shard
    make_images(tmp_path / "other", [(100, 120)] * 6, seed=50)
    pack(tmp_path / "other", db, PackConfig(**SMALL), progress=False, overwrite=True)
    assert np.array_equal(old.image(0), first)  # an open handle keeps reading its own pack
    new = PackedDB(db)
    assert new.identity != old.identity and not np.array_equal(new.image(0), first)
    for stale in (old, clone):  # a shard opened now belongs to the new pack: refused
        with pytest.raises(DBError, match=r"was packed again or replaced after it was opened"
                                          r".*restart training"):
            stale.read(1)


@pytest.mark.dali
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_repack_during_training_stops_both_loaders(image_dir, tmp_path, loader):
    pytest.importorskip("nvidia.dali")
    import srdata
    db = tmp_path / "db"
    pack(image_dir, db, PackConfig(**SMALL), progress=False)
    lo = srdata.make_loader(PackedDB(db), loader, **KW)
    make_images(tmp_path / "other", [(100, 120)] * 6, seed=50)
    pack(tmp_path / "other", db, PackConfig(**SMALL), progress=False, overwrite=True)
    with pytest.raises(DBError, match="packed again or replaced"):
        drain(lo)


@pytest.mark.dali
def test_dali_refuses_an_image_whose_size_differs_from_the_index(packed, tmp_path):
    pytest.importorskip("nvidia.dali")
    import srdata
    db = copy_db(packed, "jpeg", tmp_path)
    to_format_v1(db, index_sha256=False)  # an older database, its index editable

    def shrink(ix):
        for row in ix["rows"]:
            row[2] -= 4  # every image 4 px shorter than stored: crops stay inside
    edit_json(db / "index.json", shrink)
    # the source's check fails the batch; the loader then names the key (see _explain)
    with pytest.raises(DBError, match=r"key 000000\d\d .*(is|decodes to) \(?\d+.*"
                                      r"(the index says|expected)"):
        drain(srdata.make_loader(db, "dali", **KW))


def test_index_columns_pickle_small_and_read_as_records(packed):
    db = PackedDB(packed("png"))
    assert isinstance(db.records, fmt.Index) and len(db.records) == len(db) == 10
    rec = db.records[3]
    assert rec == fmt.Record(3, 0, "00000003", rec.height, rec.width, 3, rec.nbytes,
                             rec.crc32, rec.path)
    assert (rec.height, rec.width) == (db.heights[3], db.widths[3])
    assert db.records[-1].id == 9 and [r.id for r in db.records] == list(range(10))
    with pytest.raises(IndexError):
        db.records[10]
    clone = pickle.loads(pickle.dumps(db))
    assert clone.records == db.records and list(clone.records) == list(db.records)
    assert np.array_equal(clone.image(5), db.image(5))
    assert db.heights.dtype == np.int64 and db.records.height is db.heights


def test_binary_index_is_checksummed_and_checked(packed, tmp_path):
    db = copy_db(packed, "png", tmp_path)
    index, manifest = db / fmt.INDEX_BIN, json.loads((db / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["index"] == fmt.INDEX_BIN
    assert manifest["index_sha256"] == fmt.sha256_file(index)
    original = index.read_bytes()
    corrupt_byte(index, 16 + 8 * 10 + 3)  # a byte of a crc32
    with pytest.raises(DBError, match=r"index\.bin was modified after packing"):
        PackedDB(db)
    edit_json(db / "manifest.json", lambda m: m.pop("index_sha256"))  # required from v2 on
    with pytest.raises(DBError, match="index_sha256 is None, expected the index's sha256"):
        PackedDB(db)

    def damaged(data: bytes, shards=None) -> str:  # consistent checksum, wrong contents
        index.write_bytes(data)
        edit_json(db / "manifest.json", lambda m: m.update(
            index_sha256=fmt.sha256_file(index), shards=shards or manifest["shards"]))
        with pytest.raises(DBError, match=r"index\.bin is malformed") as e:
            PackedDB(db)
        return str(e.value)
    assert "ends inside the width column" in damaged(original[:16 + 8 * 10 + 4 * 25])
    assert "does not start with" in damaged(b"\0" * 8 + original[8:])
    assert "does not start with" in damaged(original[:12])
    height0 = original[:16 + 12 * 10 + 8] + bytes(4) + original[16 + 12 * 10 + 12:]
    assert "image 2 has height 0, expected 1..2147483648" in damaged(height0)
    assert "expected 10" in damaged(original + b"\0extra.png")
    assert "do not add up to the manifest's count 10" in damaged(
        original, [dict(manifest["shards"][0], count=9)])
    index.write_bytes(original)
    edit_json(db / "manifest.json", lambda m: m.update(index_sha256=manifest["index_sha256"],
                                                       shards=manifest["shards"]))
    assert PackedDB(db).records == PackedDB(packed("png")).records
