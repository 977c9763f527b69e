"""The BasicSR / Real-ESRGAN habits: weights out, the reference recipe, longer and moved runs,
TensorBoard and legible grids, alpha kept by upscale."""
import errno
import json
import math
import os
import shutil
import warnings

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import SMALL, make_images, one_error_line
from srdata import format as fmt
from srdata.reader import open_db
from srdata.pack import PackConfig, pack
from srtrain import checkpoint, metrics, tboard
from srtrain.cli import main
from srtrain.models import RRDBNet, build_model, load_weights
from srtrain.stepper import cosine_restarts, ema_decay, make_scheduler
from srtrain.upscale import read_rgb, upscale_image, upscale_path
from test_models import basicsr_keys
from test_train import events, train


class FakeWriter:
    """Stands in for SummaryWriter where tensorboard is not installed: records the calls."""
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.images = log_dir, [], []
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, tag, img, step, dataformats):
        self.images.append((tag, img, step, dataformats))

    def flush(self):
        pass

    def close(self):
        pass


def test_run_exports_weights_basicsr_loads(packed, tmp_path, monkeypatch):
    """One tiny run with the defaults: EMA 0.999, fixed betas, Y and RGB scores, TensorBoard,
    legible grids; its export loads strictly wherever BasicSR's RRDBNet would."""
    monkeypatch.setattr(tboard, "summary_writer_class", lambda: FakeWriter)
    out = tmp_path / "run"
    r = train(packed("png"), out, "--epochs", 1, "--tensorboard")
    assert r.exit_code == 0, r.output
    state = checkpoint.load(out / "best.pt")
    assert state["config"]["ema"] == 0.999 and state["ema"] is not None
    # onecycle keeps Adam's betas (it cycled beta1 0.95 -> 0.85 before)
    assert all(g["betas"] == (0.9, 0.99) for g in state["optimizer"]["param_groups"])
    val = events(out, "val")[-1]
    assert {"psnr", "ssim", "psnr_rgb", "psnr_rgb_bicubic"} <= set(val)
    assert val["psnr_rgb"] != val["psnr"]
    grid = cv2.imread(str(out / "samples" / "epoch0000.png"))
    assert grid.shape[0] >= 2 * 192  # two 32-px rows enlarged to 192 px

    # TensorBoard: the logged numbers and the grid, at their steps
    w = FakeWriter.made[-1]
    assert w.log_dir == str(out / "tb")
    tags = {t for t, _, _ in w.scalars}
    assert {"train/loss_l1", "train/lr", "train/img_per_s", "train/data_wait_pct",
            "val/psnr_y", "val/ssim_y", "val/psnr_rgb"} <= tags
    assert ("val/psnr_y", val["psnr"], val["step"]) in w.scalars
    tag, img, step, fmt = w.images[-1]
    assert (tag, step, fmt) == ("val/grid_lr_bicubic_sr_hr", 4, "HWC")
    assert img.shape == grid.shape and np.array_equal(img, grid[:, :, ::-1])

    # export: plain params and params_ema, strict into BasicSR's architecture
    dst = tmp_path / "net_g.pth"
    r = CliRunner().invoke(main, ["export", "--ckpt", str(out / "best.pt"), str(dst)])
    assert r.exit_code == 0, r.output
    w = torch.load(dst, map_location="cpu", weights_only=True)
    assert set(w) == {"params", "params_ema"}
    for key in w:
        assert list(w[key]) == basicsr_keys(num_block=1)
        assert all(type(v) is torch.Tensor and v.is_contiguous() for v in w[key].values())
        RRDBNet(scale=4, num_feat=8, num_block=1, num_grow_ch=4).load_state_dict(w[key])
    net = build_model("rrdbnet", 4, 8, 1, 4)
    assert load_weights(net, dst) == "params_ema"  # as Real-ESRGAN's inference picks it
    ours = checkpoint.load_model(out / "best.pt")
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), ours(x))
    assert not torch.equal(w["params"]["conv_last.weight"], w["params_ema"]["conv_last.weight"])

    # never over a user's file unless asked
    dst.write_bytes(b"the user's own file")
    r = CliRunner().invoke(main, ["export", "--ckpt", str(out / "last.pt"), str(dst)])
    assert r.exit_code == 1 and "--overwrite" in r.output
    assert dst.read_bytes() == b"the user's own file"
    r = CliRunner().invoke(main, ["export", "--ckpt", str(out / "last.pt"), str(dst),
                                  "--overwrite"])
    assert r.exit_code == 0 and set(torch.load(dst, weights_only=True)) == set(w)
    assert not list(tmp_path.glob(".net_g.pth.tmp*"))


def test_export_without_ema_and_of_srcnn(tmp_path):
    sd = build_model("srcnn", 3).state_dict()
    state = {"model": sd, "ema": None, "config": {"db": "x", "model": "srcnn", "scale": 3}}
    torch.save(state, tmp_path / "last.pt")
    r = CliRunner().invoke(main, ["export", "--ckpt", str(tmp_path / "last.pt"),
                                  str(tmp_path / "srcnn.pth")])
    assert r.exit_code == 0 and "no network for this model" in r.output
    w = torch.load(tmp_path / "srcnn.pth", weights_only=True)
    assert set(w) == {"params"}
    assert load_weights(build_model("srcnn", 3), tmp_path / "srcnn.pth") == "params"


def test_export_write_failures_are_one_line(tmp_path, monkeypatch):
    """A path under a file, a full disk, a read-only place: one Error line naming OUTPUT,
    and OUTPUT holds what it held before (nothing, or the user's file)."""
    state = {"model": build_model("srcnn", 2).state_dict(), "ema": None,
             "config": {"db": "x", "model": "srcnn", "scale": 2}}
    ckpt = tmp_path / "last.pt"
    torch.save(state, ckpt)

    def export(dst, *args):
        return CliRunner().invoke(main, ["export", "--ckpt", str(ckpt), str(dst), *args])
    (tmp_path / "file").write_text("not a folder")
    line = one_error_line(export(tmp_path / "file" / "sub" / "net_g.pth"))
    assert f"cannot make the folder {tmp_path / 'file' / 'sub'}: a file is in the way" in line
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    out = tmp_path / "out"
    out.mkdir()
    for existing in (None, b"the user's own file"):
        dst = out / "net_g.pth"
        if existing:
            dst.write_bytes(existing)
        # ENOSPC: /dev/full handed out as the temporary file (a link there is refused)
        monkeypatch.setattr(fmt, "create_own",
                            lambda p: os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC))
        line = one_error_line(export(dst, "--overwrite"))
        monkeypatch.undo()
        assert line == f"Error: no space left on the device to write {dst}; free some space"
        assert sorted(p.name for p in out.iterdir()) == (["net_g.pth"] if existing else [])
        assert not existing or dst.read_bytes() == existing

    def read_only(state, f):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(torch, "save", read_only)
    line = one_error_line(export(out / "ro.pth"))
    assert line == (f"Error: cannot write {out / 'ro.pth'}: Read-only file system; choose "
                    "another OUTPUT")


def expected_lrs(schedule, lr, total, steps):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr, betas=(0.9, 0.99))
    sched, lrs = make_scheduler(opt, schedule, lr, total), {}
    for s in range(1, steps + 1):
        opt.step()
        sched.step()
        lrs[s] = sched.get_last_lr()[0]
    return lrs


@pytest.mark.parametrize("schedule", ["cosine_restarts", "onecycle"])
def test_train_longer_moved_run_and_another_path_to_the_db(packed, tmp_path, monkeypatch,
                                                           schedule):
    db = tmp_path / "data" / "db"
    shutil.copytree(packed("png"), db)
    first = tmp_path / "first"
    assert train(db, first, "--epochs", 1, "--schedule", schedule).exit_code == 0
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    monkeypatch.chdir(tmp_path / "data")  # the same database, by a relative path
    r = train("db", moved, "--epochs", 2, "--schedule", schedule, "--resume")
    assert r.exit_code == 0, r.output
    replan = events(moved, "replan")[0]
    assert (replan["step"], replan["epochs_before"], replan["epochs"]) == (4, 1, 2)
    # the LR after the resume is the one a run planned for 2 epochs has at each step
    lrs = {e["step"]: e["lr"] for e in events(moved, "train")}
    want = expected_lrs(schedule, 1e-3, 8, 8)
    assert all(math.isclose(lrs[s], want[s], rel_tol=1e-12) for s in range(5, 9))
    before = expected_lrs(schedule, 1e-3, 4, 4)  # the 1-epoch plan until the resume
    assert all(math.isclose(lrs[s], before[s], rel_tol=1e-12) for s in range(1, 5))
    assert any(not math.isclose(before[s], want[s]) for s in range(1, 5))
    r = train("db", moved, "--epochs", 1, "--schedule", schedule, "--resume")
    assert r.exit_code == 1 and "already trained 2 epoch(s)" in r.output

    # another database packed at the same path is refused, named
    shutil.rmtree(db)
    make_images(tmp_path / "other", [(100, 120)] * 10, seed=7)
    pack(tmp_path / "other", db, PackConfig(**SMALL), progress=False)
    r = train("db", moved, "--epochs", 3, "--schedule", schedule, "--resume")
    assert r.exit_code == 1 and "is not the database the checkpoint was trained on" in r.output


def test_database_identity(packed, basicsr_db, tmp_path):
    src = packed("png")
    ident = open_db(src).identity
    shutil.copytree(src, tmp_path / "copy")
    assert open_db(tmp_path / "copy").identity == ident
    manifest = json.loads((tmp_path / "copy" / "manifest.json").read_text())
    manifest["id"] = "0123abcd"
    (tmp_path / "copy" / "manifest.json").write_text(json.dumps(manifest))
    assert open_db(tmp_path / "copy").identity == "0123abcd"
    lmdb = basicsr_db[0]
    b = open_db(lmdb).identity
    meta = lmdb / "meta_info.txt"
    meta.write_text(meta.read_text().replace(" 1\n", " 2\n", 1))
    assert open_db(lmdb).identity not in (b, ident)


def test_schedules_and_ema_decay():
    # BasicSR's CosineAnnealingRestartLR, periods [250k] * 4, eta_min 1e-7, lr 2e-4
    f = lambda s: 2e-4 * cosine_restarts(s, 10**6, 2e-4)  # noqa: E731
    assert f(0) == 2e-4 and math.isclose(f(250_000), 1e-7) and math.isclose(f(1_000_000), 1e-7)
    assert math.isclose(f(125_000), 1e-7 + (2e-4 - 1e-7) / 2)
    assert math.isclose(f(250_001), 2e-4, rel_tol=1e-9) and math.isclose(f(750_001), 2e-4,
                                                                         rel_tol=1e-9)
    # the scheduler's state is its step count: a fresh one loaded from it goes on the same
    a = expected_lrs("cosine_restarts", 2e-4, 40, 40)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    s1 = make_scheduler(opt, "cosine_restarts", 2e-4, 40)
    for _ in range(17):
        opt.step()
        s1.step()
    s2 = make_scheduler(opt, "cosine_restarts", 2e-4, 40)
    s2.load_state_dict(s1.state_dict())
    opt.step()
    s2.step()
    assert s2.get_last_lr()[0] == a[18]
    assert ema_decay(0.999, 1) == 2 / 11 and ema_decay(0.999, 10**5) == 0.999



@pytest.mark.parametrize("warmup", [True, False])
def test_ema_from_loaded_weights_uses_the_plain_decay_as_basicsr(warmup):
    """From random weights the decay is warmed up; from --init-weights it is BasicSR's
    0.999 from the first update (its model_ema). A resume keeps what the run began with."""
    from srtrain.stepper import WeightEMA
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = WeightEMA()
    ema.init_ema(net, 0.999, warmup=warmup)
    ema.step_ema()  # AveragedModel's first update copies the weights
    with torch.no_grad():
        net.weight.fill_(2.0)
    ema.step_ema()
    decay = ema_decay(0.999, 1) if warmup else 0.999
    got = ema.ema.module.weight.item()
    assert math.isclose(got, decay * 1.0 + (1 - decay) * 2.0, rel_tol=1e-6)
    state = ema.ema_state()
    assert state["ema_warmup"] is warmup
    again = WeightEMA()
    again.init_ema(net, 0.999, warmup=not warmup)  # a resume without (or with) --init-weights
    again.load_ema(state)
    assert again.ema_warmup is warmup and again.ema_updates == 2
    again.load_ema({"ema": state["ema"]})  # a checkpoint from before the flag: warmed up
    assert again.ema_warmup is True

def test_psnr_rgb_is_basicsrs_calculate_psnr():
    torch.manual_seed(0)
    sr, hr = torch.rand(2, 3, 20, 20), torch.rand(2, 3, 20, 20)
    got = metrics.psnr_rgb(sr, hr, border=4)
    for i in range(2):  # calculate_psnr(img, img2, crop_border=4, test_y_channel=False)
        a, b = (np.round(np.clip(t[i].numpy(), 0, 1) * 255)[:, 4:-4, 4:-4].astype(np.float64)
                for t in (sr, hr))
        assert math.isclose(got[i], 10 * np.log10(255 ** 2 / np.mean((a - b) ** 2)),
                            rel_tol=1e-12)
    assert metrics.psnr_rgb(hr, hr, 4)[0] == math.inf


def test_real_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (srpipe[tensorboard])")
    tb = tboard.TensorBoard(tmp_path)
    tb.record({"event": "train", "step": 3, "loss": 0.1, "lr": 1e-4})
    tb.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_tensorboard_missing_is_one_clear_line(packed, tmp_path, monkeypatch):
    def missing():
        raise ImportError("--tensorboard needs the tensorboard package (No module named "
                          "'tensorboard'); install it with `pip install 'srpipe[tensorboard]'`")
    monkeypatch.setattr(tboard, "summary_writer_class", missing)
    r = train(packed("png"), tmp_path / "run", "--epochs", 1, "--tensorboard")
    assert r.exit_code == 1 and "srpipe[tensorboard]" in r.output and "Traceback" not in r.output


def test_upscale_keeps_alpha(tmp_path):
    from test_upscale import Tiny
    model = Tiny(scale=2).eval()
    rng = np.random.default_rng(0)
    bgra = rng.integers(0, 256, (20, 26, 4), np.uint8)
    bgra[:, :13, 3] = 0  # half transparent: colour under it must still go through the model
    src = tmp_path / "in" / "logo.png"
    src.parent.mkdir()
    cv2.imwrite(str(src), bgra)
    cv2.imwrite(str(tmp_path / "in" / "grey.png"), bgra[:, :, 0])
    Image.fromarray(np.dstack([bgra[:, :, 0], bgra[:, :, 3]]), "LA").save(
        tmp_path / "in" / "grey_alpha.png")
    r = upscale_path(model, tmp_path / "in", tmp_path / "out", tile=0, progress=False)
    assert len(r["written"]) == 3
    out = cv2.imread(str(tmp_path / "out" / "logo.png"), cv2.IMREAD_UNCHANGED)
    assert out.shape == (40, 52, 4)
    rgb = upscale_image(model, cv2.cvtColor(bgra[:, :, :3], cv2.COLOR_BGR2RGB), tile=0)
    assert np.array_equal(out[:, :, :3], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert np.array_equal(out[:, :, 3], cv2.resize(bgra[:, :, 3], (52, 40),
                                                   interpolation=cv2.INTER_CUBIC))
    assert cv2.imread(str(tmp_path / "out" / "grey.png"), cv2.IMREAD_UNCHANGED).shape == \
        (40, 52, 3)
    assert cv2.imread(str(tmp_path / "out" / "grey_alpha.png"),
                      cv2.IMREAD_UNCHANGED).shape == (40, 52, 4)
    # a format without alpha: the RGB is written and the loss is said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        upscale_path(model, src, tmp_path / "flat.jpg", tile=0, progress=False)
    assert any("alpha" in str(w.message) for w in caught)
    assert read_rgb(tmp_path / "flat.jpg").shape == (40, 52, 3)


@pytest.mark.parametrize("ext", [".png", ".webp"])
def test_upscale_turns_alpha_with_the_exif_orientation(tmp_path, ext):
    # The colour is read upright (EXIF orientation applied); the alpha must be turned the
    # same way. Here alpha equals red, so every orientation must keep them equal, and a
    # non-square image whose alpha was left unturned failed to stack at all.
    from test_upscale import Tiny
    from srtrain.upscale import read_image
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 20, 3), np.uint8)
    rgba = np.dstack([rgb, rgb[:, :, 0]])
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}{ext}"
        Image.fromarray(rgba, "RGBA").save(path, exif=exif, lossless=True)
        colour, alpha = read_image(path)
        upright = (12, 20) if orientation < 5 else (20, 12)
        assert colour.shape[:2] == upright and np.array_equal(alpha, colour[:, :, 0]), \
            orientation
        assert np.array_equal(colour, read_rgb(path))  # as OpenCV turns the colour
    model = Tiny(scale=2).eval()
    r = upscale_path(model, tmp_path / f"o6{ext}", tmp_path / f"out{ext}", tile=0,
                     progress=False)
    assert r["written"] == [str(tmp_path / f"out{ext}")]
    out = np.asarray(Image.open(tmp_path / f"out{ext}"))
    assert out.shape == (40, 24, 4)
