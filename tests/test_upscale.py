import errno
import os
import shutil
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from conftest import one_error_line, zip_writer_full_disk
from srdata.samples import synthetic_image, write_image
from srtrain.cli import main
from srtrain.upscale import read_rgb, upscale_image, upscale_path

H, W = 37, 53


class Tiny(nn.Module):
    """Nearest upsample, then a small residual of two 3x3 convs: 2 HR px = 1 LR px of context."""

    def __init__(self, scale=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.scale = scale
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        up = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return up + 0.5 * self.c2(F.relu(self.c1(up)))


class Wide(Tiny):
    """Two 5x5 convs in LR space before upsampling: 4 LR px of context."""

    def __init__(self, scale=2, seed=0):
        super().__init__(scale, seed)
        self.c1 = nn.Conv2d(3, 8, 5, padding=2)
        self.c2 = nn.Conv2d(8, 3, 5, padding=2)

    def forward(self, x):
        x = x + 0.5 * self.c2(F.relu(self.c1(x)))
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


class Unshuffle(nn.Module):
    """Like an x2 RRDBNet: pixel-unshuffle by 2 (so it needs even sizes), a 3x3 conv, then
    pixel-shuffle by 4."""

    scale = 2

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(12, 48, 3, padding=1)

    def forward(self, x):
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        return up + 0.5 * F.pixel_shuffle(self.conv(F.pixel_unshuffle(x, 2)), 4)


@pytest.fixture(scope="module")
def rgb():
    return synthetic_image(H, W, seed=3)


def diff(a, b):
    return np.abs(a.astype(int) - b.astype(int))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_tiled_equals_untiled(rgb, scale):
    model = Tiny(scale)
    full = upscale_image(model, rgb, tile=0)
    assert full.shape == (H * scale, W * scale, 3) and full.dtype == np.uint8
    assert 0 < full.std()  # not saturated: a seam would show
    # 7: 3 px cores; 16 and 20 do not divide 37 or 53; 64 is bigger than the image
    for tile in (7, 16, 20, 64):
        tiled = upscale_image(model, rgb, tile=tile, overlap=2)
        assert tiled.shape == full.shape
        assert diff(tiled, full).max() <= 1, tile


def test_odd_sizes_for_pixel_unshuffle(rgb):
    model = Unshuffle()
    full = upscale_image(model, rgb, tile=0)  # 37x53: padded to even, cropped back
    assert full.shape == (2 * H, 2 * W, 3)
    for tile in (9, 16, 21, 64):  # odd tiles and odd cores: cuts stay on the 2 px grid
        assert diff(upscale_image(model, rgb, tile=tile, overlap=3), full).max() <= 1, tile


def test_real_models_any_size(rgb):
    from srtrain.models import SRCNN, RRDBNet
    for model in (RRDBNet(scale=2, num_feat=8, num_block=1, num_grow_ch=4),
                  RRDBNet(scale=3, num_feat=8, num_block=1, num_grow_ch=4), SRCNN(4, n1=8, n2=4)):
        s = model.scale
        assert upscale_image(model, rgb[:13, :9], tile=0).shape == (13 * s, 9 * s, 3)
        assert upscale_image(model, rgb, tile=20, overlap=4).shape == (H * s, W * s, 3)


def test_overlap_removes_seams(rgb):
    model = Wide()
    full = upscale_image(model, rgb, tile=0)
    seamed = upscale_image(model, rgb, tile=16, overlap=0)
    assert diff(seamed, full).max() > 2  # a seam, not rounding noise
    # the seams sit within the receptive field (4 LR px) of the tile edges, nowhere else
    near_y = np.array([min(abs(y - e + 0.5) for e in (16, 32)) < 4 for y in range(H)])
    near_x = np.array([min(abs(x - e + 0.5) for e in (16, 32, 48)) < 4 for x in range(W)])
    far = np.repeat(np.repeat(~near_y[:, None] & ~near_x[None], 2, 0), 2, 1)
    assert diff(seamed, full)[far].max() <= 1
    assert diff(upscale_image(model, rgb, tile=16, overlap=4), full).max() <= 1


class Recorder(Tiny):
    def forward(self, x):
        self.seen = (x.is_contiguous(memory_format=torch.channels_last),
                     torch.is_inference_mode_enabled(), self.training, x.dtype)
        return super().forward(x)


def test_model_conditions(rgb):
    model = Recorder().train()
    upscale_image(model, rgb, tile=0)
    assert model.seen == (True, True, False, torch.float32)
    assert model.training  # restored


def test_half_on_cpu_is_close(rgb):
    model = Tiny()
    fp32 = upscale_image(model, rgb, tile=0)
    assert np.array_equal(upscale_image(model, rgb, tile=0, half=None), fp32)
    assert diff(upscale_image(model, rgb, tile=0, half=True), fp32).max() <= 3


def test_bad_image_args(rgb):
    with pytest.raises(ValueError, match="tile=4"):
        upscale_image(Tiny(), rgb, tile=4, overlap=2)
    with pytest.raises(ValueError, match="overlap=-1"):
        upscale_image(Tiny(), rgb, tile=8, overlap=-1)
    with pytest.raises(ValueError, match="uint8"):
        upscale_image(Tiny(), rgb.astype(np.float32))
    model = Tiny(3)
    model.forward = lambda x: Tiny.forward(model, x)[..., :-1]  # one column short
    with pytest.raises(ValueError, match="scale=3"):
        upscale_image(model, rgb, tile=0)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_path_single_file(rgb, tmp_path, ext):
    src = tmp_path / "in.png"
    write_image(src, rgb)
    dst = tmp_path / "sub" / f"out{ext}"
    res = upscale_path(Tiny(), src, dst, tile=16, overlap=2, progress=False)
    assert res["written"] == [str(dst)] and res["skipped"] == [] and res["seconds"] >= 0
    out = read_rgb(dst)
    expected = upscale_image(Tiny(), rgb, tile=16, overlap=2)
    assert out.shape == expected.shape
    if ext == ".png":
        assert np.array_equal(out, expected)
    else:
        assert diff(out, expected).mean() < 4
    assert sorted(p.name for p in dst.parent.iterdir()) == [dst.name]  # no temporary left


def test_path_folder(rgb, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "a" / "b").mkdir(parents=True)
    write_image(src / "top.jpg", rgb)
    write_image(src / "a" / "odd name é.png", rgb[:20, :30])
    write_image(src / "a" / "b" / "deep.bmp", rgb[:11, :9])
    cv2.imwrite(str(src / "a" / "gray16.tif"), np.full((9, 12), 40000, np.uint16))
    (src / "a" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 20)
    (src / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="broken.png"):
        res = upscale_path(Tiny(), src, dst, tile=16, overlap=2, progress=False)
    assert res["skipped"] == [{"path": str(src / "a" / "b" / "broken.png"),
                               "reason": "cannot be read or decoded"}]
    rel = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert rel == ["a/b/deep.png", "a/gray16.png", "a/odd name é.png", "top.png"]
    assert sorted(res["written"]) == sorted(str(dst / r) for r in rel)
    assert read_rgb(dst / "a" / "b" / "deep.png").shape == (22, 18, 3)
    assert read_rgb(dst / "a" / "gray16.png").shape == (18, 24, 3)
    assert np.array_equal(read_rgb(dst / "a" / "odd name é.png"),
                          upscale_image(Tiny(), rgb[:20, :30], tile=16, overlap=2))


def test_path_folder_stem_clash_and_dst_inside(rgb, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_image(src / "x.jpg", rgb)
    write_image(src / "x.png", rgb)
    dst = src / "out"
    with pytest.warns(UserWarning, match="x.png"):
        res = upscale_path(Tiny(), src, dst, tile=0, progress=False)
    assert res["written"] == [str(dst / "x.png")] and len(res["skipped"]) == 1
    # a second run does not pick up the first run's outputs, and replaces them when asked
    with pytest.raises(ValueError, match="1 of the 1 outputs already exist"):
        upscale_path(Tiny(), src, dst, tile=0, progress=False)
    with pytest.warns(UserWarning):
        res = upscale_path(Tiny(), src, dst, tile=0, progress=False, overwrite=True)
    assert res["written"] == [str(dst / "x.png")]


def test_bad_path_args(rgb, tmp_path):
    src = tmp_path / "in.png"
    write_image(src, rgb)
    with pytest.raises(ValueError, match="tile=10"):
        upscale_path(Tiny(), src, tmp_path / "o.png", tile=10, overlap=5)
    with pytest.raises(ValueError, match=r"\.xyz"):
        upscale_path(Tiny(), src, tmp_path / "o.xyz", progress=False)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        upscale_path(Tiny(), bad, tmp_path / "o.png", progress=False)
    with pytest.raises(ValueError, match="missing.png"):
        upscale_path(Tiny(), tmp_path / "missing.png", tmp_path / "o.png", progress=False)
    with pytest.raises(ValueError, match="input folder"):
        upscale_path(Tiny(), tmp_path, tmp_path, progress=False)
    with pytest.raises(ValueError, match="input file"):
        upscale_path(Tiny(), src, src, progress=False)
    assert not (tmp_path / "o.png").exists()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint of an untrained x2 SRCNN: upscale runs it in milliseconds."""
    from srtrain.models import build_model
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    torch.save({"model": build_model("srcnn", 2).state_dict(), "ema": None,
                "config": {"db": "x", "model": "srcnn", "scale": 2}}, path)
    return path


def upscale_cli(ckpt, *args):
    return CliRunner().invoke(main, ["upscale", "--ckpt", str(ckpt), *map(str, args), "-q"])


def test_cli_into_a_parent_of_the_input_folder(rgb, tmp_path, monkeypatch, ckpt):
    """INPUT inside OUTPUT: every input is upscaled (they were all skipped as earlier outputs)."""
    (tmp_path / "p2" / "in" / "sub").mkdir(parents=True)
    write_image(tmp_path / "p2" / "in" / "a.png", rgb)
    write_image(tmp_path / "p2" / "in" / "sub" / "b.jpg", rgb[:10, :12])
    monkeypatch.chdir(tmp_path / "p2")
    r = upscale_cli(ckpt, "in", ".")
    assert r.exit_code == 0 and "wrote 2 image(s) to ." in r.output, r.output
    assert read_rgb(tmp_path / "p2" / "a.png").shape == (2 * H, 2 * W, 3)
    assert read_rgb(tmp_path / "p2" / "sub" / "b.png").shape == (20, 24, 3)


def test_cli_says_why_nothing_is_upscaled(rgb, tmp_path, ckpt):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    line = one_error_line(upscale_cli(ckpt, tmp_path / "empty", tmp_path / "out"))
    assert f"no images under {tmp_path / 'empty'} (looked for .png" in line
    # OUTPUT inside INPUT holding nothing but earlier outputs
    (tmp_path / "src" / "out").mkdir(parents=True)
    write_image(tmp_path / "src" / "out" / "old.png", rgb)
    line = one_error_line(upscale_cli(ckpt, tmp_path / "src", tmp_path / "src" / "out"))
    assert "the only images under" in line and "are the 1 in the output folder" in line
    assert not (tmp_path / "out").exists()


def test_cli_never_replaces_a_file_unless_asked(rgb, tmp_path, ckpt):
    ow = tmp_path / "ow"
    ow.mkdir()
    write_image(ow / "photo.bmp", rgb)
    (ow / "photo.png").write_bytes(b"the user's original")
    line = one_error_line(upscale_cli(ckpt, ow / "photo.bmp", ow / "photo.png"))
    assert f"{ow / 'photo.png'} already exists; pass --overwrite" in line
    assert (ow / "photo.png").read_bytes() == b"the user's original"
    r = upscale_cli(ckpt, ow / "photo.bmp", ow / "photo.png", "--overwrite")
    assert r.exit_code == 0 and read_rgb(ow / "photo.png").shape == (2 * H, 2 * W, 3)
    # a folder: all outputs are checked before any is written
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    write_image(src / "a.png", rgb)
    write_image(src / "b.jpg", rgb)
    (dst / "b.png").write_bytes(b"mine")
    line = one_error_line(upscale_cli(ckpt, src, dst))
    assert f"1 of the 2 outputs already exist in {dst}" in line and "--overwrite" in line
    assert sorted(p.name for p in dst.iterdir()) == ["b.png"]
    assert (dst / "b.png").read_bytes() == b"mine"
    r = upscale_cli(ckpt, src, dst, "--overwrite")
    assert r.exit_code == 0 and "wrote 2 image(s)" in r.output, r.output
    assert read_rgb(dst / "b.png").shape == (2 * H, 2 * W, 3)
    r = upscale_cli(ckpt, src, dst, "--overwrite")  # the same again, into the same folder
    assert r.exit_code == 0 and "wrote 2 image(s)" in r.output, r.output
    assert sorted(p.name for p in dst.iterdir()) == ["a.png", "b.png"]  # no temporary left
    line = one_error_line(upscale_cli(ckpt, ow / "photo.png", ow / "photo.png", "--overwrite"))
    assert "is the input file" in line


def test_an_input_is_never_replaced(rgb, tmp_path):
    """INPUT inside OUTPUT: in/in/a.png would become in/a.png, itself an input."""
    (tmp_path / "in" / "in").mkdir(parents=True)
    write_image(tmp_path / "in" / "a.png", rgb)
    write_image(tmp_path / "in" / "in" / "a.png", rgb[:10, :10])
    before = (tmp_path / "in" / "a.png").read_bytes()
    with pytest.raises(ValueError, match="would replace the input"):
        upscale_path(Tiny(), tmp_path / "in", tmp_path, progress=False, overwrite=True)
    assert (tmp_path / "in" / "a.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def export_cli(ckpt, *args):
    return CliRunner().invoke(main, ["export", "--ckpt", str(ckpt), *map(str, args)])


def test_no_output_replaces_a_checkpoint_or_an_input(rgb, tmp_path, ckpt):
    """A run resumes from its checkpoints: export and upscale never write over one, however
    OUTPUT names it (the same path, through .., a symlink, a hard link), --overwrite or not."""
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    last, best = run / "last.pt", run / "best.pt"
    shutil.copy(ckpt, last)
    shutil.copy(ckpt, best)
    (run / "link.pt").symlink_to(last)
    os.link(last, run / "hard.pt")
    kept = last.read_bytes()
    for out in (last, run / "sub" / ".." / "last.pt", run / "link.pt", run / "hard.pt"):
        line = one_error_line(export_cli(last, out, "--overwrite"))
        assert f"the output {out} is the checkpoint {last} itself" in line
    line = one_error_line(export_cli(last, best, "--overwrite"))
    assert f"{best} is an srtrain checkpoint, which export never replaces" in line
    assert last.read_bytes() == kept == best.read_bytes()
    # an earlier export (BasicSR's params file, no srtrain checkpoint) is replaced when asked
    assert export_cli(last, tmp_path / "net_g.pth").exit_code == 0
    assert export_cli(last, tmp_path / "net_g.pth", "--overwrite").exit_code == 0

    # upscale: its checkpoint and other checkpoints under image names, and its input
    model, other = tmp_path / "model.png", tmp_path / "other.png"
    shutil.copy(ckpt, model)
    shutil.copy(ckpt, other)
    src = tmp_path / "in.png"
    write_image(src, rgb)
    line = one_error_line(upscale_cli(model, src, model, "--overwrite"))
    assert f"the output {model} is the checkpoint {model}" in line
    line = one_error_line(upscale_cli(model, src, other, "--overwrite"))
    assert f"the output {other} is an srtrain checkpoint" in line
    (tmp_path / "folder").mkdir()
    write_image(tmp_path / "folder" / "other.bmp", rgb)
    line = one_error_line(upscale_cli(model, tmp_path / "folder", tmp_path, "--overwrite"))
    assert f"the output {other} is an srtrain checkpoint" in line
    assert model.read_bytes() == other.read_bytes() == ckpt.read_bytes()
    os.link(src, tmp_path / "hard.png")
    before = src.read_bytes()
    line = one_error_line(upscale_cli(ckpt, src, tmp_path / "hard.png", "--overwrite"))
    assert "is the input file" in line
    assert src.read_bytes() == before and os.path.samefile(src, tmp_path / "hard.png")


@pytest.mark.parametrize("bad", ["model", "ema"])
def test_export_refuses_non_finite_weights(tmp_path, ckpt, bad):
    state = torch.load(ckpt, weights_only=True)
    good = state["model"]
    state["ema"] = {**{f"module.{k}": v.clone() for k, v in good.items()},
                    "n_averaged": torch.tensor(3)}
    key = "conv2.weight" if bad == "model" else "module.conv2.weight"
    target = state["model"] if bad == "model" else state["ema"]
    target[key] = torch.full_like(target[key], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    dst = tmp_path / "net_g.pth"
    line = one_error_line(export_cli(tmp_path / "nan.pt", dst))
    said = "non-finite EMA weights" if bad == "ema" else "non-finite weights"
    assert said in line and "conv2.weight" in line and "use an earlier checkpoint" in line
    assert not dst.exists()


def test_a_full_disk_under_an_export_or_upscale_is_one_line(rgb, tmp_path, ckpt, monkeypatch):
    """torch.save's zip writer hides the ENOSPC of a full disk under "unexpected pos"."""
    dst = tmp_path / "net_g.pth"
    dst.write_bytes(b"an earlier export")
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: zip_writer_full_disk(f))
    line = one_error_line(export_cli(ckpt, dst, "--overwrite"))
    assert line == f"Error: no space left on the device to write {dst}; free some space"
    assert dst.read_bytes() == b"an earlier export"
    monkeypatch.setattr(torch, "save", real)
    # a bug raised while writing keeps its traceback
    monkeypatch.setattr(torch, "save", lambda *a, **k: 1 / 0)
    r = export_cli(ckpt, dst, "--overwrite")
    assert isinstance(r.exception, ZeroDivisionError)
    monkeypatch.setattr(torch, "save", real)
    # upscale: the disk found full when the image is flushed to it
    src, out = tmp_path / "in.png", tmp_path / "big.png"
    write_image(src, rgb)

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)
    line = one_error_line(upscale_cli(ckpt, src, out))
    monkeypatch.undo()
    assert line == f"Error: no space left on the device to write {out}; free some space"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "net_g.pth"]


def png_declaring(path, h, w):
    """A black h x w PNG: a few KB that decode to h * w * 3 bytes."""
    z = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * w)  # filter byte, RGB
    data = b"".join(z.compress(row) for _ in range(h)) + z.flush()

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2,
                                                                       0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(rgb, tmp_path, ckpt,
                                                                       monkeypatch):
    from srtrain import upscale
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    write_image(src / "a.png", rgb)  # 37 x 53 = 1,961 pixels
    png_declaring(src / "bomb.png", 4097, 4097)  # one row and column more than 4096 x 4096
    assert (src / "bomb.png").stat().st_size < 100_000
    decoded, real = [], upscale.read_image
    monkeypatch.setattr(upscale, "read_image", lambda p: decoded.append(p.name) or real(p))
    r = upscale_cli(ckpt, src, dst)
    assert r.exit_code == 0 and "wrote 1 image(s)" in r.output, r.output
    assert (f"skipped {src / 'bomb.png'}: 16,785,409 pixels, more than --max-pixels "
            "16,777,216") in r.output and "pass --max-pixels 16785409" in r.output
    assert decoded == ["a.png"] and sorted(p.name for p in dst.iterdir()) == ["a.png"]
    line = one_error_line(upscale_cli(ckpt, src / "a.png", tmp_path / "a2.png",
                                      "--max-pixels", 1960))
    assert f"the image {src / 'a.png'} has 1,961 pixels, more than --max-pixels 1,960" in line
    assert not (tmp_path / "a2.png").exists()
    r = upscale_cli(ckpt, src / "a.png", tmp_path / "a2.png", "--max-pixels", 1961)
    assert r.exit_code == 0 and read_rgb(tmp_path / "a2.png").shape == (2 * H, 2 * W, 3)
