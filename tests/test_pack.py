import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import corrupt_byte, make_images, psnr, to_format_v1
from srdata import DBError, PackedDB
from srdata import format as fmt
from srdata import images
from srdata.check import verify
from srdata.pack import PackError, pack

ROOT = Path(__file__).resolve().parents[1]


def reference(path, cfg):
    return images.resize(images.load_rgb(os.fsencode(path), cfg.max_pixels), cfg.size, cfg.fit)


@pytest.mark.parametrize("codec", ["png", "raw"])
def test_lossless_round_trip(image_dir, tmp_path, small_cfg, codec):
    cfg = small_cfg(codec=codec)
    pack(image_dir, tmp_path / "db", cfg, progress=False)
    db = PackedDB(tmp_path / "db")
    assert len(db) == 6 and db.codec == codec
    for rec in db.records:
        ref = reference(image_dir / rec.path, cfg)
        assert rec.shape == ref.shape and min(ref.shape[:2]) == min(96, *ref.shape[:2])
        assert np.array_equal(db.image(rec.id), ref)


def test_jpeg_round_trip_psnr(image_dir, tmp_path, small_cfg):
    cfg = small_cfg(codec="jpeg", quality=95)
    pack(image_dir, tmp_path / "db", cfg, progress=False)
    db = PackedDB(tmp_path / "db")
    for rec in db.records:
        assert psnr(db.image(rec.id), reference(image_dir / rec.path, cfg)) >= 40


def test_index_order_paths_and_checksums(image_dir, tmp_path, small_cfg):
    pack(image_dir, tmp_path / "db", small_cfg(codec="png"), progress=False)
    db = PackedDB(tmp_path / "db")
    paths = [r.path for r in db.records]
    assert paths == sorted(paths) and paths[0].startswith("a/")
    for rec in db.records:
        value = db.read(rec.id)
        assert rec.key == f"{rec.id:08d}" and rec.nbytes == len(value)
        assert rec.crc32 == fmt.crc32(value) and rec.channels == 3
    m = db.manifest
    assert m["format_version"] == fmt.FORMAT_VERSION and m["count"] == 6
    assert m["params"]["size"] == 96 and m["source_root"] == str(image_dir.resolve())


def test_deterministic_across_worker_counts(image_dir, tmp_path, small_cfg):
    pack(image_dir, tmp_path / "one", small_cfg(workers=1), progress=False)
    pack(image_dir, tmp_path / "two", small_cfg(workers=2), progress=False)
    a, b = PackedDB(tmp_path / "one"), PackedDB(tmp_path / "two")
    assert a.records == b.records
    assert all(a.read(i) == b.read(i) for i in range(len(a)))


def test_shards_split_by_count(image_dir, tmp_path, small_cfg):
    pack(image_dir, tmp_path / "db", small_cfg(shard_size=4), progress=False)
    db = PackedDB(tmp_path / "db")
    assert [s["count"] for s in db.manifest["shards"]] == [4, 2]
    assert [r.shard for r in db.records] == [0, 0, 0, 0, 1, 1]
    assert not (tmp_path / "db" / "shard-00000" / "lock.mdb").exists()
    assert verify(db, progress=False) == []


def test_version_1_database_still_opens_and_reads_identically(image_dir, tmp_path, small_cfg):
    import pickle
    import shutil
    pack(image_dir, tmp_path / "v2", small_cfg(shard_size=4), progress=False)
    shutil.copytree(tmp_path / "v2", tmp_path / "v1")
    to_format_v1(tmp_path / "v1")
    new, old = PackedDB(tmp_path / "v2"), PackedDB(tmp_path / "v1")
    assert (new.manifest["format_version"], old.manifest["format_version"]) == (2, 1)
    assert sorted(p.name for p in (tmp_path / "v1").glob("index.*")) == ["index.json"]
    assert old.records == new.records and list(old.records) == list(new.records)
    assert [r.shard for r in new.records] == [0, 0, 0, 0, 1, 1]  # from the shard counts
    assert all(old.read(i) == new.read(i) for i in range(len(new)))
    assert np.array_equal(pickle.loads(pickle.dumps(old)).image(5), new.image(5))
    assert verify(old, progress=False) == []
    corrupt_byte(tmp_path / "v1" / "index.json", 40)  # its index_sha256 is still checked
    with pytest.raises(DBError, match=r"index\.json was modified after packing"):
        PackedDB(tmp_path / "v1")


def test_default_shard_size_is_about_one_gib(small_cfg):
    assert 5000 < small_cfg(size=512, codec="jpeg").resolved_shard_size() < 15000
    assert 500 < small_cfg(size=512, codec="raw").resolved_shard_size() < 1500


def test_bad_files_are_listed_not_lost(image_dir, tmp_path, small_cfg):
    (image_dir / "empty.jpg").write_bytes(b"")
    (image_dir / "readme.txt").write_text("not an image")
    (image_dir / "cut.jpg").write_bytes((image_dir / "a" / "im001.jpg").read_bytes()[:300])
    (image_dir / "dead.png").symlink_to(image_dir / "nowhere.png")
    make_images(image_dir / "tiny", [(30, 40)])
    (image_dir / os.fsdecode(b"caf\xe9.png")).write_bytes(
        (image_dir / "b" / "im000.png").read_bytes())
    pack(image_dir, tmp_path / "db", small_cfg(), progress=False)
    db = PackedDB(tmp_path / "db")
    reasons = {s["path"]: s["reason"] for s in db.manifest["skipped"]}
    assert reasons.keys() == {"empty.jpg", "readme.txt", "cut.jpg", "dead.png",
                              "tiny/b/im000.png"}
    assert reasons["empty.jpg"].startswith("empty file")
    assert reasons["readme.txt"].startswith("not an image")
    assert reasons["cut.jpg"].startswith("corrupt or truncated")
    assert reasons["dead.png"] == "broken symlink"
    assert reasons["tiny/b/im000.png"].startswith("too small: 40x30")
    assert len(db) == 7 and "caf\\xe9.png" in [r.path for r in db.records]


def test_nothing_packable_is_an_error_and_publishes_nothing(tmp_path, small_cfg):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.txt").write_text("no")
    with pytest.raises(PackError, match="no image .* could be packed"):
        pack(tmp_path / "src", tmp_path / "db", small_cfg(), progress=False)
    assert not (tmp_path / "db").exists()
    assert not list(tmp_path.glob(".db.partial-*"))


def test_refuses_non_empty_destination_without_overwrite(image_dir, tmp_path, small_cfg):
    dst = tmp_path / "db"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(PackError, match="--overwrite"):
        pack(image_dir, dst, small_cfg(), progress=False)
    assert (dst / "precious.txt").read_text() == "keep me"
    # --overwrite replaces only a database srpipe wrote, never other files
    with pytest.raises(PackError, match="not an srpipe database"):
        pack(image_dir, dst, small_cfg(), overwrite=True, progress=False)
    assert (dst / "precious.txt").read_text() == "keep me"
    (dst / "precious.txt").unlink()
    pack(image_dir, dst, small_cfg(), progress=False)  # an empty folder is fine
    with pytest.raises(PackError, match="already holds a database; pass --overwrite"):
        pack(image_dir, dst, small_cfg(), progress=False)
    pack(image_dir, dst, small_cfg(shard_size=4), overwrite=True, progress=False)
    assert len(PackedDB(dst)) == 6 and len(PackedDB(dst).manifest["shards"]) == 2


def test_db_inside_source_is_not_packed_into_itself(image_dir, small_cfg):
    pack(image_dir, image_dir / "db", small_cfg(), progress=False)
    pack(image_dir, image_dir / "db", small_cfg(), overwrite=True, progress=False)
    db = PackedDB(image_dir / "db")
    assert len(db) == 6 and db.manifest["skipped"] == []


def test_killed_pack_leaves_no_database(tmp_path):
    src = tmp_path / "src"
    make_images(src, [(400, 400)] * 60)
    dst = tmp_path / "db"
    cmd = [sys.executable, str(ROOT / "tools" / "pack_lmdb.py"), str(src), str(dst),
           "--workers", "1", "--size", "384", "--codec", "png", "--shard-size", "5", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".db.partial-*/shard-00001")) and time.time() < deadline:
        time.sleep(0.05)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    workers = [int(p) for p in children.read_text().split()] if children.exists() else []
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".db.partial-*")), "the pack finished before it was killed"
    deadline = time.time() + 20  # its workers follow it instead of idling on forever
    while any(Path(f"/proc/{w}/cmdline").exists() and b"spawn_main" in
              Path(f"/proc/{w}/cmdline").read_bytes() for w in workers):
        assert time.time() < deadline, "a killed pack left its workers running"
        time.sleep(0.05)
    assert not dst.exists()
    with pytest.raises(DBError, match="does not exist"):
        PackedDB(dst)
    # the next pack cleans up the dead one's leftovers and succeeds
    subprocess.run(cmd[:-1] + ["--shard-size", "100", "-q"], check=True, timeout=300)
    assert not list(tmp_path.glob(".db.partial-*"))
    assert len(PackedDB(dst)) == 60


def test_interrupt_in_process_cleans_up(image_dir, tmp_path, small_cfg, monkeypatch):
    import srdata.pack as pack_mod

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pack_mod._ShardWriter, "close", boom)
    with pytest.raises(KeyboardInterrupt):
        pack(image_dir, tmp_path / "db", small_cfg(), progress=False)
    assert not (tmp_path / "db").exists() and not list(tmp_path.glob(".db.*"))


def test_reader_refuses_other_versions_and_damage(image_dir, tmp_path, small_cfg):
    dst = tmp_path / "db"
    pack(image_dir, dst, small_cfg(codec="raw"), progress=False)
    m = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps(m | {"format_version": 99}))
    with pytest.raises(DBError, match="format version 99.*reads versions 1, 2"):
        PackedDB(dst)
    (dst / "manifest.json").write_text(json.dumps(m | {"count": 5}))
    with pytest.raises(DBError, match="lists 6 images, the manifest says 5"):
        PackedDB(dst)
    (dst / "manifest.json").unlink()
    with pytest.raises(DBError, match="not an srpipe database"):
        PackedDB(dst)


def test_verify_names_the_bad_key(image_dir, tmp_path, small_cfg):
    dst = tmp_path / "db"
    pack(image_dir, dst, small_cfg(codec="raw"), progress=False)
    db = PackedDB(dst)
    value = db.read(3)
    data = (dst / "shard-00000" / "data.mdb").read_bytes()
    corrupt_byte(dst / "shard-00000" / "data.mdb", data.index(value) + 10)
    problems = verify(PackedDB(dst), progress=False)
    assert any("sha256" in p for p in problems)
    assert any(p.startswith("key 00000003 ") and "checksum mismatch" in p for p in problems)


def test_readers_pickle_and_share_one_environment(image_dir, tmp_path, small_cfg):
    import pickle
    pack(image_dir, tmp_path / "db", small_cfg(), progress=False)
    db = PackedDB(tmp_path / "db")
    first = db.read(0)
    assert pickle.loads(pickle.dumps(db)).read(0) == first
    assert PackedDB(tmp_path / "db").read(0) == first  # a second reader in one process


def test_forked_child_opens_its_own_environment(image_dir, tmp_path, small_cfg):
    import multiprocessing as mp
    import srdata.shards as shards
    pack(image_dir, tmp_path / "db", small_cfg(), progress=False)
    db = PackedDB(tmp_path / "db")
    db.read(0)
    assert shards._ENVS_PID == os.getpid()
    with mp.get_context("fork").Pool(1) as pool:
        value, reopened = pool.apply(_read_in_child, (db,))
    assert value == db.read(1) and reopened


def _read_in_child(db):
    import srdata.shards as shards
    return db.read(1), shards._ENVS_PID == os.getpid()
