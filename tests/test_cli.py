import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import corrupt_byte
from srdata.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--size", "96", "--min-size", "48", "--workers", "1", "-q"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_pack_inspect_verify(image_dir, tmp_path):
    db = tmp_path / "db"
    r = run("pack", image_dir, db, *SMALL, "--codec", "png")
    assert r.exit_code == 0, r.output
    assert "packed 6 images (0 skipped)" in r.output
    r = run("inspect", db, "--json")
    d = json.loads(r.output)
    assert r.exit_code == 0 and d["count"] == 6 and d["codec"] == "png"
    assert d["format_version"] == 2 and d["skipped"] == [] and len(d["shards"]) == 1
    r = run("inspect", db)
    assert "6 images, codec png" in r.output
    r = run("verify", db, "-q")
    assert r.exit_code == 0 and "all 6 records OK" in r.output


@pytest.mark.parametrize("edit, said", [
    (lambda m: m.pop("skipped"), "skipped is not a list of"),
    (lambda m: m.update(skipped=None), "skipped is not a list of"),
    (lambda m: m.pop("source_root"), "source_root is None, expected a path"),
    (lambda m: m["shards"][0].update(bytes="x"), "shard-00000's bytes is 'x', expected a whole"),
    (lambda m: m.update(bytes=-1), "bytes is -1, expected a whole number")])
def test_inspect_names_a_damaged_manifest_in_one_line(image_dir, tmp_path, edit, said):
    from conftest import one_error_line
    db = tmp_path / "db"
    assert run("pack", image_dir, db, *SMALL).exit_code == 0
    m = json.loads((db / "manifest.json").read_text())
    edit(m)
    (db / "manifest.json").write_text(json.dumps(m))
    for args in ([], ["--json"]):
        line = one_error_line(run("inspect", db, *args))
        assert line.startswith(f"Error: {db / 'manifest.json'}: {said}"), line
        assert line.endswith("the manifest was edited or damaged, pack the database again")


def test_skips_are_reported_and_exit_is_zero(image_dir, tmp_path):
    (image_dir / "broken.jpg").write_bytes((image_dir / "a" / "im001.jpg").read_bytes()[:400])
    r = run("pack", image_dir, tmp_path / "db", *SMALL)
    assert r.exit_code == 0
    assert "skipped broken.jpg: corrupt or truncated" in r.output
    assert "packed 6 images (1 skipped)" in r.output
    d = json.loads(run("inspect", tmp_path / "db", "--json").output)
    assert d["skipped"] == [{"path": "broken.jpg", "reason": d["skipped"][0]["reason"]}]


def test_nothing_packed_exits_non_zero(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(b"")
    r = run("pack", tmp_path / "src", tmp_path / "db", *SMALL)
    assert r.exit_code == 1
    assert "no image" in r.output and "a.jpg: empty file" in r.output
    assert "Traceback" not in r.output


def test_user_mistakes_are_clear_errors(image_dir, tmp_path):
    r = run("pack", tmp_path / "nope", tmp_path / "db", *SMALL)
    assert r.exit_code == 1 and "does not exist" in r.output and r.exception.__class__ is SystemExit
    r = run("pack", image_dir, tmp_path / "db", "--quality", "0")
    assert r.exit_code == 2 and "--quality" in r.output
    r = run("pack", image_dir, tmp_path / "db", "--codec", "webp")
    assert r.exit_code == 2 and "'webp' is not one of" in r.output
    assert run("pack", image_dir, tmp_path / "db", *SMALL).exit_code == 0
    r = run("pack", image_dir, tmp_path / "db", *SMALL)
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = run("inspect", tmp_path / "missing")
    assert r.exit_code == 1 and "srdata pack IMAGES" in r.output
    r = run("verify", image_dir)
    assert r.exit_code == 1 and "not an srpipe database" in r.output
    # advice that works: pack --overwrite refuses a folder that is not a database
    assert "--overwrite" not in r.output and "pack one into a new DB path" in r.output
    r = run("inspect", tmp_path / "db" / "manifest.json")
    assert r.output == (f"Error: {tmp_path / 'db' / 'manifest.json'} is a database's "
                        f"manifest; name the database folder, {tmp_path / 'db'}\n")


def test_verify_fails_naming_key(image_dir, tmp_path):
    db = tmp_path / "db"
    run("pack", image_dir, db, *SMALL, "--codec", "raw")
    corrupt_byte(db / "shard-00000" / "data.mdb", 40_000)
    r = run("verify", db, "-q")
    assert r.exit_code == 1 and "BAD key 0000" in r.output and "problem(s)" in r.output


def test_tools_script_runs_from_a_checkout(image_dir, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "pack_lmdb.py"), str(image_dir),
                          str(tmp_path / "db"), *SMALL], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "packed 6 images" in out.stdout
    # its --help shows the defaults, as `srdata pack --help` does
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "pack_lmdb.py"), "--help"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and "Usage: pack_lmdb.py" in out.stdout
    assert out.stdout.count("[default: ") >= 5, out.stdout


def test_make_samples(tmp_path):
    r = run("make-samples", tmp_path / "s", "--count", "3")
    assert r.exit_code == 0 and len(list((tmp_path / "s").rglob("*.*"))) == 3


def test_make_samples_never_writes_over_a_file(tmp_path):
    """A folder of the user's own whose names match the samples' keeps every byte."""
    mine = tmp_path / "mine" / "set1" / "img0001.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my photo")
    r = run("make-samples", tmp_path / "mine", "--count", "3")
    assert r.exit_code == 1 and r.output.startswith(f"Error: {mine} exists (1 of the 3 names")
    assert mine.read_bytes() == b"my photo"
    assert sorted(p.name for p in (tmp_path / "mine").rglob("*.*")) == ["img0001.jpg"]
    (tmp_path / "file").write_text("x")
    r = run("make-samples", tmp_path / "file" / "s", "--count", "1")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert r.output.startswith(f"Error: cannot write the images under {tmp_path / 'file' / 's'}")


def test_warm_and_evict(image_dir, tmp_path):
    db = tmp_path / "db"
    assert run("pack", image_dir, db, *SMALL).exit_code == 0
    r = run("warm", db, "-q")
    assert r.exit_code == 0 and "GiB/s" in r.output, r.output
    r = run("warm", db, "--evict")
    assert r.exit_code == 0 and "page cache" in r.output, r.output
    r = run("warm", tmp_path / "nope")
    assert r.exit_code == 1 and str(tmp_path / "nope") in r.output
    assert "Traceback" not in r.output


def test_warm_and_evict_name_a_missing_shard(image_dir, tmp_path):
    from conftest import one_error_line
    db = tmp_path / "db"
    assert run("pack", image_dir, db, *SMALL).exit_code == 0
    (db / "shard-00000" / "data.mdb").unlink()
    for args in (["-q"], ["--evict"]):
        line = one_error_line(run("warm", db, *args))
        assert line == (f"Error: cannot read {db / 'shard-00000' / 'data.mdb'}: No such file "
                        f"or directory; `srdata verify {db}` lists what is damaged")
