import errno
import json
import re
import subprocess

import cv2
import pytest
from click.testing import CliRunner

from conftest import one_error_line, read_only_folder
from srtrain import demo as demo_mod
from srtrain.cli import main
from srtrain.demo import MARK, DemoError, describe_device, prepare_out, resolve_loader

# One epoch over 24 crops: the whole pipeline in seconds; the default run is measured by hand.
TINY = ["--epochs", "1", "--images", "24", "-q"]


def demo(out, *args):
    return CliRunner().invoke(main, ["demo", "--out", str(out), *TINY, *map(str, args)])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    r = demo(out)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_report_names_loader_and_scores(demo_run):
    out, output = demo_run
    text = (out / "report.txt").read_text()
    assert text.strip() in output  # printed as well as written
    loader = resolve_loader("auto")
    assert f"loader        {loader} on {describe_device(loader)}" in text  # CPU or GPU
    assert "LR            nn: nearest neighbour" in text and "(LR (nn) | bicubic" in text
    m = re.search(r"PSNR (\d+\.\d\d) dB vs bicubic (\d+\.\d\d) dB \(([+-]\d+\.\d\d) dB", text)
    assert m, text
    psnr, bicubic, gain = map(float, m.groups())
    assert 10 < bicubic < 50 and 0 < psnr < 60 and gain == pytest.approx(psnr - bicubic, abs=0.011)
    assert re.search(r"SSIM 0\.\d{4} vs bicubic 0\.\d{4}", text)
    assert "24 training crops" in text and "28 validation crops" in text
    assert "1 epochs, 3 steps" in text  # 24 crops, batch 8
    assert re.search(r"\d+\.\d img/s, waiting for data \d+%", text)
    assert "srtrain --db" in text


def test_run_folder_holds_the_run(demo_run):
    out, _ = demo_run
    run = out / "run"
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [e for e in events if e["event"] == "val"]
    assert len(val) == 1 and val[0]["psnr_bicubic"] > 0
    assert any(e["event"] == "train" for e in events)
    grid = cv2.imread(str(run / "samples" / "epoch0000.png"))
    assert grid is not None and grid.shape[0] >= 4 * 64 and grid.shape[1] >= 4 * 64
    assert str(run / "samples" / "epoch0000.png") in (out / "report.txt").read_text()
    crops = sorted((out / "images").iterdir())
    assert len(crops) == 24 and {p.suffix for p in crops} == {".jpg", ".png"}
    manifest = json.loads((out / "db" / "manifest.json").read_text())
    assert manifest["count"] == 24 and manifest["skipped"] == []


def test_validation_crops_come_from_held_out_photos(demo_run):
    out, _ = demo_run
    val = sorted(p.name for p in (out / "val-images").iterdir())
    # the k-th crop of every photo sorts together, so the grid's rows show different photos
    assert len(val) == 28 and len({name.split("-", 1)[1] for name in val[:4]}) == 4


def test_refuses_a_non_empty_out_without_overwrite(demo_run):
    out, _ = demo_run
    before = (out / "report.txt").read_text()
    r = demo(out)
    assert "holds an earlier demo; pass --overwrite" in one_error_line(r)
    assert (out / "report.txt").read_text() == before and (out / "run" / "best.pt").is_file()
    assert (out / MARK).is_file()  # what lets --overwrite replace it


def test_overwrite_removes_only_what_the_demo_wrote(tmp_path):
    (tmp_path / MARK).write_text("made by srtrain demo")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"x")
    (tmp_path / "report.txt").write_text("old")
    prepare_out(tmp_path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [MARK]
    (tmp_path / "run").mkdir()
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(DemoError, match="did not write.*thesis.tex"):
        prepare_out(tmp_path, overwrite=True)
    assert (tmp_path / "thesis.tex").read_text() == "precious" and (tmp_path / "run").is_dir()
    r = demo(tmp_path / "thesis.tex")
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_never_deletes_a_users_folder_whose_names_match_the_demos(tmp_path):
    """myproj/images holds the user's photos: a folder the demo did not make (no MARK) is
    refused with or without --overwrite, and the refusal does not advise --overwrite."""
    photo = tmp_path / "myproj" / "images" / "photo.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(b"my photo")
    for args in ((), ("--overwrite",)):
        line = one_error_line(demo(tmp_path / "myproj", *args))
        assert f"{tmp_path / 'myproj'} is not empty and has no {MARK} file" in line
        assert "--overwrite" not in line and "choose another --out" in line
        assert photo.read_bytes() == b"my photo"
        assert sorted(p.name for p in (tmp_path / "myproj").iterdir()) == ["images"]
    # an unfinished demo from before the mark looks just the same: refused, left alone
    (tmp_path / "old" / "run").mkdir(parents=True)
    (tmp_path / "old" / "report.txt").write_text("my own report")
    with pytest.raises(DemoError, match=f"no {MARK} file"):
        prepare_out(tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["report.txt", "run"]
    # a finished one left its report, and `make demo` (--overwrite) replaces it as before
    (tmp_path / "old" / "report.txt").write_text(
        "srpipe demo: pack -> load -> train -> validate, on scikit-image's sample photos\n")
    prepare_out(tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [MARK]


def test_write_failures_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    line = one_error_line(demo(tmp_path / "file" / "d"))
    assert f"{tmp_path / 'file' / 'd'}: a file is in the way; choose another --out" in line
    ro = tmp_path / "ro"
    undo = read_only_folder(ro)
    try:
        r = demo(ro / "d")
    finally:
        subprocess.run(undo, check=True)
    line = one_error_line(r)
    assert line.startswith(f"Error: cannot write {ro / 'd'}: ") and "choose another --out" in line
    assert not (ro / "d").exists()

    def full(path, rgb):  # the disk fills up while the crops are written
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(demo_mod, "save", full)
    line = one_error_line(demo(tmp_path / "full"))
    assert line.startswith(f"Error: no space left on the device to write {tmp_path / 'full'}/")
    assert "free some space" in line

    def broken_pipe(path, rgb):  # a loader worker's pipe: not the folder's fault
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    monkeypatch.setattr(demo_mod, "save", broken_pipe)
    r = demo(tmp_path / "pipe")
    assert isinstance(r.exception, ConnectionResetError) and "cannot write" not in r.output


def test_user_mistakes_are_clear_errors(tmp_path):
    r = demo(tmp_path / "out", "--images", "3")
    assert r.exit_code == 1 and "less than one batch" in r.output
    r = demo(tmp_path / "out", "--loader", "opencv")
    assert r.exit_code == 2 and "'opencv' is not one of" in r.output


@pytest.mark.timeout(120)
def test_torch_loader(tmp_path):
    # The crops are cut in this process; with OpenCV's thread pool started here, the torch
    # loader's forked workers would deadlock. Pillow keeps them safe: this must not hang.
    r = demo(tmp_path / "out", "--loader", "torch", "--degradation", "bicubic")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "out" / "report.txt").read_text()
    assert f"loader        torch on {describe_device('torch')}" in text
    assert "LR            bicubic: bicubic downscale" in text
