"""srtrain --stage gan end to end (CPU, tiny): training from a stage-1 run, resume after
kill -9, export of both nets, the stage's defaults and its refusals."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import srdata
from conftest import one_error_line, run
from srtrain import checkpoint, gan
from srtrain.cli import main
from srtrain.discriminator import UNetDiscriminatorSN
from test_gan import basicsr_d_shapes, random_vgg19
from test_train import events, run_killed_and_resumed

NF = 8  # the discriminator's width here (Real-ESRGAN's is 64)
TERMS = {"l_g_pix", "l_g_percep", "l_g_gan", "l_d_real", "l_d_fake", "out_d_real",
         "out_d_fake"}
# test_train's tiny run, without its --lr: the GAN stage's own default is under test
TINY = ["--model", "rrdbnet", "--num-feat", "8", "--num-block", "1", "--num-grow-ch", "4",
        "--patch", "32", "--batch-size", "2", "--loader", "torch", "--workers", "0",
        "--device", "cpu", "--val-split", "0.2", "--val-images", "2", "--log-every", "1",
        "-q"]


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(random_vgg19(), path)
    return path


@pytest.fixture(scope="module")
def stage1(packed, tmp_path_factory):
    """An L1 run's best.pt: the GAN stage's --init-weights."""
    out = tmp_path_factory.mktemp("stage1") / "run"
    r = cli("--db", packed("png"), "--out", out, *TINY, "--epochs", 1, "--lr", 1e-3)
    assert r.exit_code == 0, r.output
    return out / "best.pt"


@pytest.fixture(scope="module")
def gan_run(packed, vgg, stage1, tmp_path_factory):
    """Two epochs of the GAN stage with its defaults; the run folder."""
    out = tmp_path_factory.mktemp("gan") / "run"
    r = cli(*gan_args(packed("png"), vgg, stage1), "--out", out, "--epochs", 2,
            "--tensorboard")
    assert r.exit_code == 0, r.output
    return out


def cli(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args])


def gan_args(db, vgg, init):
    return ["--db", db, *TINY, "--stage", "gan", "--init-weights", init, "--vgg-weights",
            vgg, "--d-num-feat", NF]


def test_gan_stage_trains_and_logs_every_term(gan_run, stage1):
    train = events(gan_run, "train")
    assert [e["step"] for e in train] == list(range(1, 9))
    for e in train:
        assert TERMS | {"loss"} <= set(e) and all(np.isfinite(e[k]) for k in TERMS)
        # the generator's loss is its three weighted terms
        assert e["loss"] == pytest.approx(e["l_g_pix"] + e["l_g_percep"] + e["l_g_gan"])
    assert {"psnr", "ssim"} <= set(events(gan_run, "val")[-1])
    assert (gan_run / "samples" / "epoch0001.png").is_file()
    # the stage's defaults, none of them given
    cfg = json.loads((gan_run / "config.json").read_text())
    assert (cfg["stage"], cfg["lr"], cfg["schedule"], cfg["degradation"], cfg["usm"]) == (
        "gan", 1e-4, "constant", "realesrgan", True)
    assert {e["lr"] for e in train} == {1e-4}
    state = checkpoint.load(gan_run / "last.pt")
    assert {k: tuple(v.shape) for k, v in state["net_d"].items()} == basicsr_d_shapes(NF)
    assert state["optimizer_d"]["state"] and state["scheduler_d"] is not None
    # from stage 1's weights: 8 Adam steps of 1e-4 move each weight by about 1e-3 at most
    s1 = checkpoint.load(stage1)["model"]
    moved = {k: float((v - s1[k]).abs().max()) for k, v in state["model"].items()}
    assert 0 < max(moved.values()) < 0.01, moved


def test_terms_reach_tensorboard(gan_run):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(gan_run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{t}" for t in TERMS} | {"train/l_g_total", "val/psnr_y"} <= tags
    assert "train/loss_l1" not in tags  # the GAN stage's loss is not an L1 loss


def test_export_writes_g_and_a_basicsr_d(gan_run, stage1, tmp_path):
    g, d = tmp_path / "net_g.pth", tmp_path / "net_d.pth"
    r = cli("export", "--ckpt", gan_run / "last.pt", g, "--discriminator", d)
    assert r.exit_code == 0, r.output
    assert "discriminator's params (28 tensors)" in r.output
    assert set(torch.load(g, weights_only=True)) == {"params", "params_ema"}
    saved = torch.load(d, weights_only=True)
    assert set(saved) == {"params"}
    assert {k: tuple(v.shape) for k, v in saved["params"].items()} == basicsr_d_shapes(NF)
    disc = UNetDiscriminatorSN(3, NF)
    disc.load_state_dict(saved["params"], strict=True)  # spectral norm's u and v included
    net_d = checkpoint.load(gan_run / "last.pt")["net_d"]
    assert all(torch.equal(disc.state_dict()[k], v) for k, v in net_d.items())

    # a checkpoint without D: one line, and neither file written
    g2, d2 = tmp_path / "g2.pth", tmp_path / "d2.pth"
    line = one_error_line(cli("export", "--ckpt", stage1, g2, "--discriminator", d2))
    assert "holds no discriminator" in line and "drop --discriminator" in line
    assert not g2.exists() and not d2.exists()
    # never over the checkpoint, nor both nets in one file
    for target in (gan_run / "best.pt", g2):
        r = cli("export", "--ckpt", gan_run / "last.pt", g2, "--discriminator", target,
                "--overwrite")
        assert r.exit_code == 1 and not g2.exists(), r.output
    assert checkpoint.is_checkpoint(gan_run / "best.pt")


def test_resume_after_kill_9_gives_the_same_losses_and_weights(packed, vgg, stage1, tmp_path):
    # without VGG19, which costs most of a step here and holds no state
    args = [*gan_args(packed("png"), vgg, stage1), "--epochs", 10, "--save-every", 3,
            "--perceptual-weight", 0]
    at, _, _, killed, full = run_killed_and_resumed(args, tmp_path, 7)
    assert 3 <= at < 40
    lines = events(killed)
    resumed_at = max(i for i, e in enumerate(lines) if e["event"] == "resume")
    after = [e for e in lines[resumed_at:] if e["event"] == "train"]
    reference = {e["step"]: e for e in events(full, "train")}
    assert after[0]["step"] == at + 1 and after[-1]["step"] == 40
    for e in after:
        assert all(e[k] == reference[e["step"]][k] for k in TERMS - {"l_g_percep"}
                   | {"loss"}), e["step"]
    a, b = (checkpoint.load(run / "last.pt") for run in (killed, full))
    for part in ("model", "ema", "net_d"):  # net_d: spectral norm's u and v too
        assert all(torch.equal(a[part][k], b[part][k]) for k in b[part]), part
    assert a["optimizer_d"]["state"][0]["step"] == b["optimizer_d"]["state"][0]["step"] == 40


def test_ddp_two_processes_with_a_patch_schedule(packed, vgg, stage1, tmp_path):
    out = tmp_path / "ddp"
    args = [*gan_args(packed("png"), vgg, stage1), "--out", out, "--epochs", 2,
            "--patch-schedule", "16:0,32:1", "--sample-ratio", 0.8]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", 2,
           "--master-port", 29500 + os.getpid() % 1000, "-m", "srtrain", *args]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    train = events(out, "train")
    assert train and all(TERMS <= set(e) for e in train)
    assert [e["patch"] for e in events(out, "stage")] == [16, 32]
    state = checkpoint.load(out / "last.pt")
    assert state["loader"]["world_size"] == 2 and state["net_d"] is not None


def test_a_nan_in_d_is_never_saved_or_resumed(packed, vgg, stage1, tmp_path, monkeypatch):
    real = gan.GANStepper.__call__

    def d_diverges_at_step_4(self, lr, hr):
        out = real(self, lr, hr)
        if self.sched.last_epoch == 4:  # only D: G's weights are still finite
            with torch.no_grad():
                self.disc.conv0.weight.fill_(float("nan"))
        return out
    monkeypatch.setattr(gan.GANStepper, "__call__", d_diverges_at_step_4)
    out = tmp_path / "run"
    r = cli(*gan_args(packed("png"), vgg, stage1), "--out", out, "--epochs", 2,
            "--save-every", 2, "--log-every", 100, "--perceptual-weight", 0)
    line = one_error_line(r)
    assert "non-finite" in line and "net_d.conv0.weight" in line
    assert f"{out / 'last.pt'} (step 2) holds the last good state" in line
    state = checkpoint.load(out / "last.pt")
    assert state["step"] == 2 and gan.nonfinite_weights(state) == []

    state["net_d"]["conv9.bias"] = torch.full_like(state["net_d"]["conv9.bias"], float("nan"))
    checkpoint.save(out / "last.pt", state)  # as an srtrain without the guard wrote it
    monkeypatch.setattr(gan.GANStepper, "__call__", real)
    r = cli(*gan_args(packed("png"), vgg, stage1), "--out", out, "--epochs", 2, "--resume",
            "--perceptual-weight", 0)
    line = one_error_line(r)
    assert "holds non-finite weights" in line and "cannot be resumed" in line


def test_missing_vgg_is_one_line_before_anything_is_written(packed, stage1, tmp_path,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)  # no experiments/pretrained_models here either
    (tmp_path / "torch").mkdir()
    out = tmp_path / "run"
    r = cli("--db", packed("png"), "--out", out, *TINY, "--stage", "gan", "--init-weights",
            stage1, env={"TORCH_HOME": str(tmp_path / "torch")})
    line = one_error_line(r)
    assert "vgg19-dcbb9e9d.pth" in line and "--vgg-weights PATH" in line
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in line
    assert not out.exists()


def test_explicit_flags_win_over_the_stage_defaults_and_resume_keeps_them(
        packed, vgg, stage1, tmp_path):
    out = tmp_path / "run"
    r = cli(*gan_args(packed("png"), vgg, stage1), "--out", out, "--epochs", 1,
            "--lr", 2e-4, "--schedule", "cosine", "--degradation", "bicubic", "--no-usm",
            "--gan-weight", 0.5, "--perceptual-weight", 0)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["lr"], cfg["schedule"], cfg["degradation"], cfg["usm"], cfg["gan_weight"],
            cfg["perceptual_weight"]) == (2e-4, "cosine", "bicubic", False, 0.5, 0.0)
    first = events(out, "train")[0]
    assert TERMS - {"l_g_percep"} <= set(first) and "l_g_percep" not in first
    assert first["loss"] == pytest.approx(first["l_g_pix"] + first["l_g_gan"])
    # --resume takes the run's own settings, not the stage's defaults
    r = cli("--out", out, "--resume", "--epochs", 2, "-q")
    assert r.exit_code == 0, r.output
    assert events(out, "train")[-1]["step"] == 8


def test_mistakes_are_refused_before_training(packed, tmp_path):
    r = cli("--db", packed("png"), "--out", tmp_path / "run", *TINY, "--gan-weight", 0.2,
            "--d-num-feat", 16)
    assert r.exit_code == 2 and "--gan-weight, --d-num-feat: only --stage gan reads them" \
        in r.output, r.output
    r = cli("--db", packed("png"), "--out", tmp_path / "run", *TINY, "--stage", "gan",
            "--accum", 2, "--perceptual-weight", 0)
    assert "--stage gan steps both nets every batch: give --accum 1" in one_error_line(r)
    r = cli("--db", packed("png"), "--out", tmp_path / "run", *TINY, "--stage", "gan",
            "--patch-schedule", "20:0,32:1", "--perceptual-weight", 0)
    assert "divisible by 8, got 20 px" in one_error_line(r)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_usm_lr_makes_lr_from_the_sharpened_hr_and_keeps_hr_plain(packed, loader):
    """The GAN stage's loaders: Real-ESRGAN degrades the sharpened HR, and its
    discriminator sees the plain one."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    kw = dict(batch_size=4, patch_size=64, scale=4, seed=3, dtype=torch.uint8, workers=1,
              device="cpu", degradation="bicubic")
    (lr_both, hr_sharp), = run(srdata.make_loader(packed("png"), loader, **kw, usm=True), 1)
    (lr_plain, hr_plain), = run(srdata.make_loader(packed("png"), loader, **kw), 1)
    (lr, hr), = run(srdata.make_loader(packed("png"), loader, **kw, usm="lr"), 1)
    assert np.array_equal(lr, lr_both) and np.array_equal(hr, hr_plain)
    assert not np.array_equal(hr_sharp, hr_plain) and not np.array_equal(lr, lr_plain)
    with pytest.raises(ValueError, match="got usm='gt', expected False, True or 'lr'"):
        srdata.make_loader(packed("png"), loader, **kw, usm="gt")


def test_a_gan_stage_from_random_weights_is_warned_about(packed, vgg, stage1, tmp_path):
    args = gan_args(packed("png"), vgg, stage1)
    at = args.index("--init-weights")
    with pytest.warns(UserWarning) as said:
        r = cli(*args[:at], *args[at + 2:], "--out", tmp_path / "random", "--epochs", 1)
    assert r.exit_code == 0, r.output
    mine = [str(w.message) for w in said if "random generator weights" in str(w.message)]
    assert len(mine) == 1 and "give --init-weights" in mine[0], mine
    saved = torch.load(tmp_path / "random" / "last.pt", weights_only=False)
    assert saved["ema_warmup"] is True  # from random weights: the decay is warmed up
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        r = cli(*args, "--out", tmp_path / "init", "--epochs", 1)
    assert r.exit_code == 0, r.output
    assert not [w for w in said if "random generator weights" in str(w.message)]
    saved = torch.load(tmp_path / "init" / "last.pt", weights_only=False)
    assert saved["ema_warmup"] is False  # from stage 1's: BasicSR's plain 0.999
