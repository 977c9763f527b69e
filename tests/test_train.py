import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from srtrain import checkpoint
from srtrain.cli import main

ROOT = Path(__file__).resolve().parents[1]
# A tiny RRDBNet: the loop, not the model, is under test; CPU steps take milliseconds.
TINY = ["--model", "rrdbnet", "--num-feat", "8", "--num-block", "1", "--num-grow-ch", "4",
        "--patch", "32", "--batch-size", "2", "--loader", "torch", "--workers", "0",
        "--device", "cpu", "--val-split", "0.2", "--val-images", "2", "--log-every", "1",
        "--lr", "1e-3", "-q"]


def train(db, out, *args, env=None):
    r = CliRunner(env=env).invoke(main, ["--db", str(db), "--out", str(out), *TINY,
                                         *map(str, args)])
    return r


def events(out, kind=None):
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if kind is None or e["event"] == kind]


def losses_after_resume(out):
    """step -> loss for the steps run after the last resume (all steps if none)."""
    lines = events(out)
    starts = [i for i, e in enumerate(lines) if e["event"] == "resume"]
    tail = lines[starts[-1] + 1:] if starts else lines
    return {e["step"]: e["loss"] for e in tail if e["event"] == "train"}


def test_trains_validates_and_writes_a_run(packed, tmp_path):
    out = tmp_path / "run"
    r = train(packed("png"), out, "--epochs", 2)
    assert r.exit_code == 0, r.output
    result = events(out, "end")[-1]
    assert result["epoch"] == 2 and result["step"] == 8  # 8 training images, batch 2
    train_ev, val_ev = events(out, "train"), events(out, "val")
    assert [e["step"] for e in train_ev] == list(range(1, 9))
    e = train_ev[-1]
    assert all(np.isfinite(e[k]) for k in ("loss", "lr", "img_per_s", "data_wait_ms"))
    assert 0 <= e["data_wait_pct"] <= 100
    # wall-clock stamps, in order: what times a real epoch (benchmarks/real_epoch.py)
    stamps = [x["time"] for x in train_ev] + [val_ev[-1]["time"]]
    assert stamps == sorted(stamps) and abs(stamps[-1] - time.time()) < 600
    assert len(val_ev) == 2
    assert {"psnr", "ssim", "psnr_bicubic", "ssim_bicubic"} <= set(val_ev[0])
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    grid = cv2.imread(str(out / "samples" / "epoch0001.png"))
    assert grid is not None and grid.shape[0] >= 2 * 32
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["batch_size"] == 2 and cfg["model"] == "rrdbnet"
    state = checkpoint.load(out / "last.pt")
    assert state["loader"]["epoch"] == 2 and state["loader"]["batch"] == 0


def run_killed_and_resumed(args, tmp_path, trained: int):
    """Train ``args`` to the end in one process, and again in another that is killed -9
    once it has saved last.pt and logged ``trained`` train events, then resumed. Returns
    (step the kill left in last.pt, the resumed run's losses by step, the uninterrupted
    run's, the resumed run's folder, the uninterrupted run's)."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert subprocess.run([sys.executable, "-m", "srtrain", "--out", full, *map(str, args)],
                          capture_output=True, timeout=300).returncode == 0
    p = subprocess.Popen([sys.executable, "-m", "srtrain", "--out", killed, *map(str, args)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "last.pt").exists() and len(events(killed, "train")) >= trained:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    at = checkpoint.load(killed / "last.pt")["step"]
    r = subprocess.run([sys.executable, "-m", "srtrain", "--out", killed, "--resume",
                        *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return at, losses_after_resume(killed), losses_after_resume(full), killed, full


def same_weights(a_run, b_run) -> bool:
    a = checkpoint.load(a_run / "last.pt")["model"]
    b = checkpoint.load(b_run / "last.pt")["model"]
    return all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_kill_9_continues_with_the_same_batches(packed, tmp_path):
    args = ["--db", packed("png"), *TINY, "--epochs", 30, "--save-every", 3]
    at, resumed, reference, killed, full = run_killed_and_resumed(args, tmp_path, 7)
    assert 3 <= at < 120
    assert min(resumed) == at + 1 and max(resumed) == 120
    assert all(resumed[s] == reference[s] for s in resumed)
    assert same_weights(killed, full)


def test_ctrl_c_saves_and_resume_redoes_a_partial_accumulation(packed, tmp_path, monkeypatch):
    from srtrain import train as train_mod
    db = packed("png")
    opts = ["--epochs", 2, "--accum", 2, "--ema", 0.9, "--schedule", "cosine"]
    assert train(db, tmp_path / "full", *opts).exit_code == 0
    real = train_mod.Stepper.__call__
    calls = []

    def interrupt_on_sixth_batch(self, lr, hr):
        calls.append(1)
        if len(calls) == 6:  # epoch 1: step 2 done, batch 0 of step 3 in, batch 1 taken
            raise KeyboardInterrupt
        return real(self, lr, hr)
    monkeypatch.setattr(train_mod.Stepper, "__call__", interrupt_on_sixth_batch)
    r = train(db, tmp_path / "cut", *opts)
    assert r.exit_code == 130 and "--resume" in r.output
    state = checkpoint.load(tmp_path / "cut" / "last.pt")
    assert state["step"] == 2 and (state["loader"]["epoch"], state["loader"]["batch"]) == (1, 0)
    monkeypatch.setattr(train_mod.Stepper, "__call__", real)
    assert train(db, tmp_path / "cut", *opts, "--resume").exit_code == 0
    a = checkpoint.load(tmp_path / "cut" / "last.pt")
    b = checkpoint.load(tmp_path / "full" / "last.pt")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in b["ema"])


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_ddp_two_processes_on_cpu(packed, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "ddp"
    args = ["--db", packed("png"), "--out", out, *TINY, "--epochs", 1, "--loader", loader,
            "--workers", 1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", 2,
           "--master-port", 29500 + os.getpid() % 1000, "-m", "srtrain", *args]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [e["step"] for e in events(out, "train")]
    assert steps == [1, 2]  # 8 images / (2 ranks x batch 2); logged once, by rank 0
    assert checkpoint.load(out / "last.pt")["loader"]["world_size"] == 2


def test_upscale_with_the_trained_model(packed, tmp_path, image_dir):
    out = tmp_path / "run"
    assert train(packed("png"), out, "--epochs", 1, "--ema", 0.5).exit_code == 0
    src = image_dir / "b" / "im000.png"
    r = CliRunner().invoke(main, ["upscale", "--ckpt", str(out / "best.pt"), str(src),
                                  str(tmp_path / "big.png"), "--tile", "40", "--overlap", "8",
                                  "-q"])
    assert r.exit_code == 0, r.output
    h, w = cv2.imread(str(src)).shape[:2]
    assert cv2.imread(str(tmp_path / "big.png")).shape[:2] == (4 * h, 4 * w)


def test_init_weights_from_a_basicsr_file(packed, tmp_path):
    from srtrain.models import build_model
    sd = build_model("rrdbnet", 4, 8, 1, 4).state_dict()
    torch.save({"params_ema": sd}, tmp_path / "net_g.pth")
    r = train(packed("png"), tmp_path / "run", "--epochs", 1, "--init-weights",
              tmp_path / "net_g.pth")
    assert r.exit_code == 0, r.output
    bad = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
    torch.save(bad, tmp_path / "nan.pth")
    r = train(packed("png"), tmp_path / "nan", "--epochs", 1, "--init-weights",
              tmp_path / "nan.pth")
    # refused before any step: NaN weights would only train into a NaN loss
    assert r.exit_code == 1 and "nan.pth hold NaN or inf (in conv_first.weight" in r.output
    assert not (tmp_path / "nan" / "last.pt").exists()


def test_environment_aliases_and_profile(packed, tmp_path):
    out = tmp_path / "run"
    args = [a for i, a in enumerate(TINY) if TINY[i - 1 if i else 0] not in
            ("--batch-size", "--patch") and a not in ("--batch-size", "--patch")]
    env = {"BATCH_SIZE": "4", "NUM_EPOCHS": "1", "SAMPLE_RATIO": "0.5", "TARGET_SIZE": "48"}
    r = CliRunner(env=env).invoke(main, ["--db", str(packed("png")), "--out", str(out),
                                         *args, "--profile-loader"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["batch_size"], cfg["epochs"], cfg["sample_ratio"], cfg["patch"]) == \
        (4, 1, 0.5, 48)
    prof = events(out, "profile")[0]
    assert prof["synthetic_img_per_s"] > 0 and 0 < prof["loader_efficiency"]


@pytest.mark.parametrize("args, code, message", [
    (["--patch", "30"], 2, "30 is not divisible by --scale 4; use 28 or 32"),
    (["--patch", "128"], 2, "larger than the smallest image"),
    (["--model", "srcnn", "--num-feat", "8"], 2, "rrdbnet"),
    (["--accum", "50"], 1, "--accum 50 is more than"),
])
def test_user_mistakes_are_named(packed, tmp_path, args, code, message):
    r = train(packed("png"), tmp_path / "run", *args)
    assert r.exit_code == code and message in r.output, r.output
    assert "Traceback" not in r.output


def test_database_and_resume_mistakes(packed, tmp_path):
    r = train(tmp_path / "nope", tmp_path / "run")
    assert r.exit_code == 2 and str(tmp_path / "nope") in r.output
    assert CliRunner().invoke(main, []).exit_code == 2
    out = tmp_path / "run"
    assert train(packed("png"), out, "--epochs", 1).exit_code == 0
    r = train(packed("png"), out, "--epochs", 1)
    assert r.exit_code == 1 and "--resume" in r.output
    r = train(packed("png"), out, "--epochs", 1, "--resume", "--seed", "3")
    assert r.exit_code == 1 and "--seed: checkpoint 0, now 3" in r.output
    r = train(packed("png"), tmp_path / "empty", "--resume")
    assert r.exit_code == 1 and "no checkpoint" in r.output
    # not a checkpoint: one line, and not torch's advice to load it unsafely
    for name, data in (("config.json", b'{"a": 1}'), ("noise.pt", bytes(range(256)) * 8)):
        (tmp_path / name).write_bytes(data)
        r = CliRunner().invoke(main, ["export", "--ckpt", str(tmp_path / name),
                                      str(tmp_path / "net.pth")])
        assert r.output == (f"Error: {tmp_path / name} is not an srtrain checkpoint: torch "
                            "cannot read it as tensors and plain data (another kind of file, "
                            "a damaged one, or one holding code objects)\n"), r.output


def test_a_checkpoint_error_without_words_is_named_by_its_type(tmp_path, monkeypatch):
    """Its first line was taken from an empty message: an IndexError inside the handler."""
    from srtrain import checkpoint

    def fails(*args, **kwargs):
        raise RuntimeError()
    monkeypatch.setattr(torch, "load", fails)
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*x\.pt: RuntimeError$"):
        checkpoint.load(tmp_path / "x.pt")


def test_out_of_memory_suggests_a_smaller_batch(packed, tmp_path, monkeypatch):
    from srtrain import train as train_mod

    def oom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(train_mod, "train", oom)
    r = train(packed("png"), tmp_path / "run")
    assert r.exit_code == 1 and "--batch-size 1 --accum 2" in r.output


def test_resume_from_the_run_folder_alone_takes_the_runs_settings(packed, tmp_path):
    """`srtrain --out RUN --resume`: the database, the model and every non-default flag come
    from RUN/config.json; a flag given again that differs is still refused."""
    db, out = packed("png"), tmp_path / "run"
    assert train(db, out, "--epochs", 1, "--seed", 3, "--ema", 0.9).exit_code == 0
    r = CliRunner().invoke(main, ["--out", str(out), "--resume", "--epochs", "2", "-q",
                                  "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert [e["epoch"] for e in events(out, "val")] == [0, 1]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["seed"], saved["ema"], saved["num_feat"], saved["epochs"]) == (3, 0.9, 8, 2)
    r = CliRunner().invoke(main, ["--out", str(out), "--resume", "--epochs", "2", "-q",
                                  "--seed", "4"])
    assert r.exit_code == 1 and "--seed: checkpoint 3, now 4" in r.output, r.output
    (out / "config.json").write_text("[1, 2]")
    r = CliRunner().invoke(main, ["--out", str(out), "--resume"])
    assert r.exit_code == 1 and "is not a run's settings" in r.output


def test_the_terminal_shows_the_run_an_epoch_a_line_and_what_to_do_next(packed, tmp_path):
    db, out = packed("png"), tmp_path / "run"
    args = [a for a in TINY if a != "-q"]
    with pytest.warns(UserWarning, match=r"validation scores 2 image\(s\) only \(--val-split "
                                         r"0\.2 of 10 images\)"):
        r = CliRunner().invoke(main, ["--db", str(db), "--out", str(out), *args,
                                      "--epochs", "2"])
    assert r.exit_code == 0, r.output
    text = r.output
    assert "srtrain: rrdbnet (0.01 M parameters), x4, on cpu (off, compile off)" in text
    assert f"8 training images from {db}; validation on 2 images" in text
    assert "2 epochs of 4 steps, batch 2, 32 px patches" in text
    epochs = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"], text
    val = events(out, "val")[-1]
    assert f"val {val['psnr']:.2f} dB ({val['psnr'] - val['psnr_bicubic']:+.2f} vs bicubic)" \
        in epochs[-1] and " img/s  wait " in epochs[-1]
    assert "done: 2 epochs, 8 steps in" in text and f"best {val['psnr']:.2f} dB" in text
    assert f"srtrain upscale --ckpt {out / 'best.pt'}" in text and '"step"' not in text
    epoch = events(out, "epoch")[-1]  # the same numbers in metrics.jsonl
    assert epoch["epochs"] == 2 and epoch["loss"] > 0 and epoch["psnr"] == val["psnr"]
    r = CliRunner().invoke(main, ["--out", str(out), "--resume", "--epochs", "3"])
    assert r.exit_code == 0, r.output
    assert f"resumed   from {out / 'last.pt'}: epoch 3/3, step 8" in r.output
    assert [line.split()[1] for line in r.output.splitlines()
            if line.startswith("epoch ")] == ["3/3"]


@pytest.mark.dali
def test_ctrl_c_in_a_terminal_ends_in_one_line_not_the_workers_tracebacks(packed, tmp_path):
    """A terminal's Ctrl-C reaches every process of the group, DALI's workers too: they
    leave it to the trainer, which saves and says so in one line."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "srtrain", "--db", str(packed("jpeg")),
                          "--out", str(out), "--model", "srcnn", "--patch", "32",
                          "--batch-size", "2", "--epochs", "10000", "--loader", "dali",
                          "--workers", "2", "--device", "cpu", "--log-every", "1", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").exists() and events(out, "train")):
            assert p.poll() is None and time.time() < deadline, p.stderr and p.stderr.read()
            time.sleep(0.2)
        time.sleep(1)  # the workers busy with the next batches
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in err and "--resume" in err


def test_the_loader_is_dali_where_it_is_installed_else_torch(packed, tmp_path, monkeypatch):
    import srtrain.train
    seen = []
    monkeypatch.setattr(srtrain.train, "train", lambda cfg: seen.append(cfg) or {})
    args = ["--db", str(packed("png")), "--out", str(tmp_path / "run"), "--patch", "32", "-q"]
    assert CliRunner().invoke(main, args).exit_code == 0
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed
    assert CliRunner().invoke(main, args).exit_code == 0
    assert CliRunner().invoke(main, [*args, "--loader", "dali"]).exit_code == 0
    monkeypatch.undo()
    from importlib.util import find_spec
    installed = "dali" if find_spec("nvidia.dali") else "torch"
    assert [c.loader for c in seen] == [installed, "torch", "dali"]  # asked for: as asked
