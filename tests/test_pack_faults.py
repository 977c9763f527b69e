"""srdata pack under faults: what --overwrite may delete, concurrent packs, the publish
window (Ctrl-C, kill -9), symlinked folders, disk full, read-only and impossible
destinations. Each case checks the user's files, the exit and the one-line message."""
import errno
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_images, one_error_line, this_tree
from test_cli import SMALL, run
from srdata import PackedDB
from srdata.cli import main
from srdata.pack import Interrupted, PackError, pack
from srdata.publish import recover_publish

ROOT = Path(__file__).resolve().parents[1]


def tree(root):
    """{relative path: bytes} of every file under root, to prove nothing was touched."""
    return {p.relative_to(root): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def cli(*args):
    return run("pack", *args, *SMALL)


def leftovers(parent):
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith("."))


def test_overwrite_never_replaces_images_or_foreign_folders(image_dir, tmp_path):
    images = tree(image_dir)
    for db in (image_dir, tmp_path):  # DB is IMAGES, DB holds IMAGES
        line = one_error_line(cli(image_dir, db, "--overwrite"))
        assert "the image folder" in line and "outside IMAGES" in line
    (tmp_path / "link").symlink_to(image_dir)
    assert "outside IMAGES" in one_error_line(cli(image_dir, tmp_path / "link", "--overwrite"))
    (tmp_path / "link").unlink()
    # neither a folder of other files, nor one with a manifest of ours plus other files
    other = tmp_path / "other"
    shutil.copytree(image_dir, other)
    assert "not an srpipe database (no manifest.json)" in one_error_line(
        cli(image_dir, other, "--overwrite"))
    (other / "manifest.json").write_text('{"format": "srpipe-lmdb", "format_version": 1}')
    assert "holds 'a', which srpipe did not write" in one_error_line(
        cli(image_dir, other, "--overwrite"))
    assert tree(image_dir) == images and tree(other).items() > images.items()
    assert leftovers(tmp_path) == [] and leftovers(image_dir) == []


@pytest.mark.parametrize("gone, folder", [("index.bin", "index.json"),
                                          ("shard-00000/data.mdb", "shard-00000/data.mdb")])
def test_overwrite_never_deletes_a_folder_named_like_a_database_file(image_dir, tmp_path,
                                                                     gone, folder):
    """A pack writes files by these names; a folder by one of them holds someone's files."""
    db = tmp_path / "db"
    assert cli(image_dir, db).exit_code == 0
    (db / gone).unlink()
    (db / folder).mkdir()
    (db / folder / "thesis.txt").write_text("mine")
    line = one_error_line(cli(image_dir, db, "--overwrite"))
    assert "not an srpipe database" in line and folder.split("/")[0] in line
    assert (db / folder / "thesis.txt").read_text() == "mine" and leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_mount_point_is_refused_before_packing(image_dir, tmp_path, monkeypatch, overwrite):
    """The pack ran to the end, building on the parent's disk, then failed to rename the
    mount point (EBUSY) with advice to free space."""
    dst = tmp_path / "disk"
    if overwrite:
        assert cli(image_dir, dst).exit_code == 0
    else:
        dst.mkdir()
    mounts = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == dst or mounts(p))
    walked = []
    monkeypatch.setattr("srdata.pack.walk", lambda *a: walked.append(a))
    line = one_error_line(cli(image_dir, dst, *(["--overwrite"] if overwrite else [])))
    assert line == (f"Error: {dst} is a mount point, and a pack builds the database beside "
                    f"DB, then renames it into place; pack into a folder inside it, such as "
                    f"{dst / 'db'}")
    assert not walked and leftovers(tmp_path) == []


def test_second_pack_fails_fast_naming_the_first(image_dir, tmp_path, caplog, small_cfg):
    dst = tmp_path / "db"
    # the first pack holds the lock and waits inside its packing step, as a slow one would
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, srdata.pack as p
        p._pack_into = lambda *a, **k: time.sleep(300)
        p.pack({str(image_dir)!r}, {str(dst)!r}, p.PackConfig(), progress=False)
        """)], env=this_tree())
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".db.partial-*")):
            assert first.poll() is None and time.time() < deadline, "the first pack never began"
            time.sleep(0.05)
        line = one_error_line(cli(image_dir, dst))
        assert f"another pack (pid {first.pid}) is writing {dst}" in line
        assert not dst.exists() and list(tmp_path.glob(".db.partial-*"))
    finally:
        first.kill()  # kill -9: the kernel releases its lock
        first.wait()
    with caplog.at_level(logging.WARNING):
        pack(image_dir, dst, small_cfg(), progress=False)
    assert len(PackedDB(dst)) == 6 and leftovers(tmp_path) == []
    assert any("left by an interrupted pack" in r.message for r in caplog.records)


# A pack killed with SIGKILL at one point of the swap; the DB it replaces is DB/, the new one
# is a copy of it named as the pack would name it.
KILLED_PUBLISH = """
import os, sys, shutil
from pathlib import Path
from srdata import publish
dst, new, point = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
os.rename(new, tmp)
real = os.replace
def replace(a, b):
    real(a, b)
    if (point == "between" and ".old-" in str(b)) or (point == "after" and b == dst):
        os.kill(os.getpid(), 9)
os.replace = replace
with publish.locked(dst):
    publish.publish(tmp, dst)
"""


def kill_during_publish(dst, point):
    new = dst.parent / "new"
    shutil.copytree(dst, new)
    (new / "manifest.json").write_text((new / "manifest.json").read_text().replace(
        '"count"', '"new": 1, "count"'))
    proc = subprocess.run([sys.executable, "-c", KILLED_PUBLISH, str(dst), str(new), point],
                          env=this_tree(), timeout=120)
    assert proc.returncode == -signal.SIGKILL


def test_publish_window_is_recoverable(image_dir, tmp_path, caplog, small_cfg):
    dst = tmp_path / "db"
    pack(image_dir, dst, small_cfg(), progress=False)
    first = (dst / "manifest.json").read_text()

    # kill -9 between the renames: no DB at DB, the old one aside; the next open restores it
    kill_during_publish(dst, "between")
    assert not dst.exists() and [n.split("-")[0] for n in leftovers(tmp_path)] == [
        ".db.lock", ".db.old", ".db.partial", ".db.publish"]
    with caplog.at_level(logging.WARNING):
        assert len(PackedDB(dst)) > 0
    assert any(r.message.startswith(f"restored {dst} from .db.old-") for r in caplog.records)
    assert (dst / "manifest.json").read_text() == first and leftovers(tmp_path) == []
    assert recover_publish(dst) == []

    # kill -9 after the new DB is in place: the next pack removes the old one and says so
    kill_during_publish(dst, "after")
    assert '"new": 1' in (dst / "manifest.json").read_text()
    assert [n.split("-")[0] for n in leftovers(tmp_path)] == [".db.lock", ".db.old",
                                                              ".db.publish"]
    with caplog.at_level(logging.WARNING):
        with pytest.raises(PackError, match="pass --overwrite"):
            pack(image_dir, dst, small_cfg(), progress=False)
    assert any("removed .db.old-" in r.message for r in caplog.records)
    assert leftovers(tmp_path) == [] and '"new": 1' in (dst / "manifest.json").read_text()


def test_ctrl_c_in_the_publish_window_tells_the_truth(image_dir, tmp_path, monkeypatch,
                                                     small_cfg):
    import srdata.publish as publish
    dst = tmp_path / "db"
    pack(image_dir, dst, small_cfg(), progress=False)
    first = (dst / "manifest.json").read_text()

    # Ctrl-C between the two renames: the old DB goes back, nothing was written
    real_replace = os.replace

    def replace(a, b):
        real_replace(a, b)
        if ".old-" in str(b):
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", replace)
    result = cli(image_dir, dst, "--overwrite")
    assert result.exit_code == 130 and "nothing was written" in result.output
    assert (dst / "manifest.json").read_text() == first and leftovers(tmp_path) == []
    monkeypatch.setattr(os, "replace", real_replace)

    # Ctrl-C while the old DB is removed: the new one is in place, and the message says so
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):
        if ".old-" in str(path):
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)
    monkeypatch.setattr(publish.shutil, "rmtree", rmtree)
    with pytest.raises(Interrupted, match="holds the new database, complete; the previous"):
        pack(image_dir, dst, small_cfg(shard_size=4), overwrite=True, progress=False)
    monkeypatch.setattr(publish.shutil, "rmtree", real_rmtree)
    assert [n.split("-")[0] for n in leftovers(tmp_path)] == [".db.old", ".db.publish"]
    assert any("removed .db.old-" in d for d in recover_publish(dst))
    assert leftovers(tmp_path) == [] and len(PackedDB(dst).manifest["shards"]) == 2


def test_symlinked_folders_are_followed_once(image_dir, tmp_path, small_cfg):
    outside = tmp_path / "outside"
    make_images(outside, [(100, 120), (110, 100)], seed=50)
    (image_dir / "linked").symlink_to(outside)
    (image_dir / "loop").symlink_to(image_dir)
    (image_dir / "a" / "again").symlink_to(image_dir / "b")
    (image_dir / "b" / "copy.png").symlink_to(image_dir / "b" / "im000.png")
    (outside / "back").symlink_to(outside)
    pack(image_dir, tmp_path / "db", small_cfg(), progress=False)
    db = PackedDB(tmp_path / "db")
    assert sorted(r.path for r in db.records if r.path.startswith("linked/")) == [
        "linked/a/im001.jpg", "linked/b/im000.png"]
    assert len(db) == 8
    reasons = {s["path"]: s["reason"] for s in db.manifest["skipped"]}
    assert reasons == {
        "loop": "symlink to a folder packed already, as '.'",
        "a/again": "symlink to a folder packed already, as 'b'",
        "linked/back": "symlink to a folder packed already, as 'linked'",
        "b/copy.png": "the same file as 'b/im000.png' (a symlink or hard link), packed once"}


def test_write_failures_are_one_line_and_leave_nothing(image_dir, tmp_path, monkeypatch,
                                                      small_cfg):
    import srdata.pack as pack_mod
    (tmp_path / "file").write_text("x")
    line = one_error_line(cli(image_dir, tmp_path / "file" / "sub" / "db"))
    assert line == (f"Error: cannot create {tmp_path}/file/sub/db: {tmp_path}/file is a "
                    "file, not a folder; choose another DB path")

    # ENOSPC on the JSON write while replacing a database: the old one is unchanged
    dst = tmp_path / "db"
    pack(image_dir, dst, small_cfg(), progress=False)
    before = tree(dst)

    def full(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(pack_mod.fmt, "write_json_atomic", full)
    line = one_error_line(cli(image_dir, dst, "--overwrite"))
    assert line.startswith(f"Error: the disk holding {tmp_path} is full (")
    assert "No space left on device" in line and "nothing was written" in line
    assert tree(dst) == before and leftovers(tmp_path) == []


def test_disk_full_in_lmdb_write(image_dir, tmp_path):
    """A file-size limit makes LMDB's writes fail as a full disk does (portable, no root)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, 32 << 10))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "pack_lmdb.py"),
                           str(image_dir), str(tmp_path / "db"), "--size", "96",
                           "--min-size", "48", "--codec", "raw", "--workers", "1", "-q"],
                          env=this_tree(), preexec_fn=limit, capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"Error: writing {tmp_path / 'db'} failed (")
    # LMDB reports the failed write as "mdb_txn_commit: Input/output error", as on a full disk
    assert "mdb_txn_commit: " in lines[0] and "nothing was written" in lines[0]
    assert not (tmp_path / "db").exists() and leftovers(tmp_path) == []


def mount_tmpfs(path, options):
    """A small tmpfs at path (root only, where mounting is allowed); unmounted by the caller."""
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and a permitting container)")


@pytest.fixture
def read_only_dir(tmp_path):
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mount_tmpfs(path, "ro,size=1m")  # root writes whatever the permissions say
    yield path
    subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_read_only_destination(image_dir, read_only_dir):
    line = one_error_line(cli(image_dir, read_only_dir / "db"))
    assert line.startswith(f"Error: cannot write in {read_only_dir}: ")
    assert line.endswith("; choose another DB path")
    assert list(read_only_dir.iterdir()) == []


@pytest.fixture
def full_disk(tmp_path):
    path = tmp_path / "small"
    path.mkdir()
    mount_tmpfs(path, "size=256k")
    yield path
    subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_really_full_disk(image_dir, full_disk):
    result = CliRunner().invoke(main, ["pack", str(image_dir), str(full_disk / "db"), "--fit",
                                       "none", "--min-size", "48", "--codec", "raw",
                                       "--workers", "1", "-q"])
    line = one_error_line(result)
    assert line.startswith(f"Error: the disk holding {full_disk} is full (")
    assert "nothing was written" in line and list(full_disk.iterdir()) == []


def link(kind, target, name):
    """``name`` made a symbolic or hard link to ``target``."""
    if kind == "symlink":
        name.symlink_to(target.name)
    else:
        os.link(target, name)
    return name


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_the_lock_file_is_never_written_through_a_link(image_dir, tmp_path, caplog, kind):
    """`ln -s notes.txt .db.lock; srdata pack IMAGES db` wrote the pack's pid into
    notes.txt; so did opening a database with a killed pack's leftovers next to it."""
    notes = tmp_path / "notes.txt"
    notes.write_text("notes\n")
    lock = link(kind, notes, tmp_path / ".db.lock")
    line = one_error_line(cli(image_dir, tmp_path / "db", "--overwrite"))
    why = "is a symbolic link" if kind == "symlink" else "has 1 other hard link(s)"
    assert line == (f"Error: cannot lock {tmp_path / 'db'}: {lock} {why}, so srpipe did not "
                    "make it; srpipe neither writes through nor deletes it: move it away, "
                    "then run this again")
    assert notes.read_text() == "notes\n" and os.path.lexists(lock)
    assert not (tmp_path / "db").exists()

    lock.unlink()
    assert cli(image_dir, tmp_path / "db").exit_code == 0
    link(kind, notes, lock)
    (tmp_path / ".db.partial-99999").mkdir()  # a killed pack's: the open repairs under the lock
    with caplog.at_level(logging.WARNING):
        assert run("inspect", tmp_path / "db").exit_code == 0
    assert notes.read_text() == "notes\n" and os.path.lexists(lock)
    assert any(f"not repairing what a killed pack left next to {tmp_path / 'db'}: {lock} "
               f"{why}" in r.message for r in caplog.records)


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_temporary_files_are_never_written_through_a_link(tmp_path, kind):
    """atomic_file (a pack's manifest and index, a run's checkpoints) and the publish
    journal make their files new, and never write through a link of that name."""
    from srdata.format import atomic_file
    from srdata.publish import publish
    notes = tmp_path / "notes.txt"
    notes.write_text("notes\n")
    tmp = link(kind, notes, tmp_path / f".config.json.tmp-{os.getpid()}")
    with pytest.raises(OSError, match=f"{tmp} (is a symbolic link|has 1 other hard link)"):
        with atomic_file(tmp_path / "config.json") as f:
            f.write("{}")
    assert notes.read_text() == "notes\n" and os.path.lexists(tmp)
    assert not (tmp_path / "config.json").exists()
    # a regular file by that name is this process's own leftover: replaced
    tmp.unlink()
    tmp.write_text("part of an earlier write")
    with atomic_file(tmp_path / "config.json") as f:
        f.write("{}")
    assert (tmp_path / "config.json").read_text() == "{}" and not tmp.exists()

    dst, new = tmp_path / "db", tmp_path / ".db.partial-1"
    for d in (dst, new):
        d.mkdir()
    (new / "manifest.json").write_text('{"format": "srpipe-lmdb", "id": "new"}')
    journal = link(kind, notes, tmp_path / f".db.publish-{os.getpid()}")
    with pytest.raises(OSError, match=f"{journal} (is a symbolic link|has 1 other hard link)"):
        publish(new, dst)
    assert notes.read_text() == "notes\n" and os.path.lexists(journal)
    assert dst.is_dir() and not any(dst.iterdir()) and new.is_dir()  # nothing moved


def fake_db(path, ident):
    """A complete database as recovery sees it: our manifest (with ``ident``) and an index."""
    path.mkdir()
    (path / "manifest.json").write_text(
        f'{{"format": "srpipe-lmdb", "format_version": 2, "id": "{ident}"}}')
    (path / "index.bin").write_bytes(ident.encode())
    return path


def test_recovery_never_chooses_between_two_databases(tmp_path, caplog):
    """Two databases set aside and no DB: restoring one by name order deleted the other.
    A database a killed pack finished beside them may be the one to put back: kept too."""
    a, b = fake_db(tmp_path / ".x.old-100", "a"), fake_db(tmp_path / ".x.old-99", "b")
    fake_db(tmp_path / ".x.partial-101", "new")
    before = tree(tmp_path)
    with caplog.at_level(logging.WARNING):
        line = one_error_line(run("inspect", tmp_path / "x"))
    assert tree(tmp_path) == before and a.is_dir() and b.is_dir()
    assert "database" in line and "does not exist" in line
    assert any(f"{tmp_path / 'x'} is missing and 2 earlier databases were set aside by killed "
               "packs (.x.old-99, .x.old-100); srpipe does not choose between them: rename "
               "the one you want to x" in r.message for r in caplog.records)


def test_recovery_keeps_the_old_database_when_db_is_not_a_database(tmp_path, caplog):
    """A complete .x.old-7 and an x/ with no manifest: the old one was deleted, then the
    open failed, leaving no database at all."""
    fake_db(tmp_path / ".x.old-7", "seven")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "thesis.txt").write_text("mine")
    before = tree(tmp_path)
    with caplog.at_level(logging.WARNING):
        line = one_error_line(run("inspect", tmp_path / "x"))
    assert "is not an srpipe database (no manifest.json)" in line
    assert tree(tmp_path) == before
    assert any(r.message.startswith(f"kept .x.old-7, the previous database of {tmp_path / 'x'}"
                                    ": x is not a complete srpipe database (no manifest.json)")
               for r in caplog.records)


def test_recovery_removes_only_what_a_journal_or_the_format_proves(image_dir, tmp_path,
                                                                   caplog, small_cfg):
    """The family: every deletion recovery makes. A database set aside with no journal,
    one that differs from its journal, and a partial folder holding someone's file all stay;
    a journal that proves the publish, and a pack's own partial folder, are cleared."""
    dst = tmp_path / "db"
    pack(image_dir, dst, small_cfg(), progress=False)
    ident = json.loads((dst / "manifest.json").read_text())["id"]
    no_journal = fake_db(tmp_path / ".db.old-5", "older")
    changed = fake_db(tmp_path / ".db.old-6", "six")
    (tmp_path / ".db.publish-6").write_text(json.dumps(
        {"format": "srpipe-publish", "old": ["db", "not six"], "new": ident}))
    proved = fake_db(tmp_path / ".db.old-7", "seven")
    (tmp_path / ".db.publish-7").write_text(json.dumps(
        {"format": "srpipe-publish", "old": ["db", "seven"], "new": ident}))
    theirs = tmp_path / ".db.partial-8"
    theirs.mkdir()
    (theirs / "thesis.txt").write_text("mine")
    ours = tmp_path / ".db.partial-9"
    (ours / "shard-00000").mkdir(parents=True)
    (ours / "shard-00000" / "data.mdb").write_bytes(b"x")
    keep = {p: tree(p) for p in (no_journal, changed, theirs)}
    with caplog.at_level(logging.WARNING):
        done = recover_publish(dst)
    assert {p: tree(p) for p in keep} == keep and (tmp_path / ".db.publish-6").exists()
    assert not proved.exists() and not (tmp_path / ".db.publish-7").exists()
    assert [r.message for r in caplog.records if r.levelno == logging.WARNING] == done
    assert [d.split(":")[0].split(",")[0] for d in done] == [
        "kept .db.old-5", "kept .db.old-6", "removed .db.old-7", "kept .db.partial-8",
        "removed .db.partial-9"]
    assert "it holds 'thesis.txt', which srpipe did not write" in done[3]
    assert not ours.exists() and len(PackedDB(dst)) == 6


def test_a_pack_never_deletes_files_added_to_db_while_it_ran(image_dir, tmp_path,
                                                            monkeypatch, small_cfg):
    """DB was checked before packing; what someone wrote into it since is not the pack's
    to delete with the old database."""
    import srdata.pack as pack_mod
    dst = tmp_path / "db"
    pack(image_dir, dst, small_cfg(), progress=False)
    real = pack_mod._pack_into

    def pack_into(*args, **kwargs):
        summary = real(*args, **kwargs)
        (dst / "thesis.txt").write_text("mine")
        return summary
    monkeypatch.setattr(pack_mod, "_pack_into", pack_into)
    before = tree(dst)
    with pytest.raises(PackError, match=f"{dst} changed while the pack ran and is no longer "
                                        r"an srpipe database \(it holds 'thesis.txt'"):
        pack(image_dir, dst, small_cfg(), overwrite=True, progress=False)
    assert tree(dst) == before | {Path("thesis.txt"): b"mine"} and leftovers(tmp_path) == []


def test_a_partial_folder_of_someone_elses_is_never_removed(image_dir, tmp_path, small_cfg):
    """The name a pack builds under, holding what a pack never writes: left as it is."""
    part = tmp_path / f".db.partial-{os.getpid()}"
    part.mkdir()
    (part / "thesis.txt").write_text("mine")
    with pytest.raises(PackError, match=f"{part} is in the way"):
        pack(image_dir, tmp_path / "db", small_cfg(), progress=False)
    assert (part / "thesis.txt").read_text() == "mine" and not (tmp_path / "db").exists()
