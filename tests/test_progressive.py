"""Progressive patch sizes: the schedule, both loaders switching at an epoch boundary, and
training across a switch (resume after kill -9, DDP, early stopping, the LR schedule)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import srdata
from srdata.schedule import PatchSchedule
from srtrain import checkpoint
from srtrain.cli import main
from srtrain.stepper import total_steps

from test_train import TINY as FIXED, events, run_killed_and_resumed, same_weights

KW = dict(batch_size=2, scale=4, seed=3, device="cpu", workers=0)
_at = FIXED.index("--patch")
TINY = FIXED[:_at] + FIXED[_at + 2:]  # the schedule sets the patch


def train(db, out, *args):
    return CliRunner().invoke(main, ["--db", str(db), "--out", str(out), *TINY,
                                     *map(str, args)])


def test_schedule_parses_scales_batches_and_names_mistakes():
    s = PatchSchedule.parse(" 32:0, 48:2,64:5", batch_size=2)
    assert s.text == "32:0,48:2,64:5" and s.final == 64
    assert [s.patch(e) for e in range(7)] == [32, 32, 48, 48, 48, 64, 64]
    assert [s(e) for e in (0, 2, 5)] == [(32, 2), (48, 2), (64, 2)]
    px = PatchSchedule.parse("16:0,32:1,48:2,64:3", batch_size=2, batch="pixels")
    assert [px.batch_size_at(e) for e in range(4)] == [8, 8, 4, 2]  # 16 px: 32, capped at 4x
    for text, message in [("32-0", "expected PATCH:EPOCH"), ("32:1,48:2", "at epoch 0"),
                          ("32:0,48:3,64:3", "strictly increasing"), ("0:0", ">= 1")]:
        with pytest.raises(ValueError, match=message):
            PatchSchedule.parse(text, 2)
    with pytest.raises(ValueError, match="batch schedule 'area'"):
        PatchSchedule.parse("32:0", 2, "area")
    with pytest.raises(ValueError, match="patch 30 .from epoch 1. is not divisible by scale 4; "
                                         "use 28 or 32"):
        PatchSchedule.parse("32:0,30:1", 2).check(4)
    with pytest.raises(ValueError, match="larger than the smallest image"):
        PatchSchedule.parse("32:0,128:1", 2).check(4, shortest=96)
    with pytest.raises(ValueError, match="starts after the last epoch"):
        PatchSchedule.parse("32:0,48:4", 2).check(4, 96, epochs=4)
    # the LR schedule spans the sum of every epoch's steps, whatever each stage's batch
    assert total_steps(3, 2, [4, 5, 2].__getitem__) == 2 + 2 + 1


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_loaders_switch_patch_at_the_epoch_boundary(packed, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    db = packed("png")
    sched = PatchSchedule.parse("32:0,48:1", batch_size=2, batch="pixels")  # batch 4, then 2
    lo = srdata.make_loader(db, loader, patch_schedule=sched, **KW)
    assert (lo.sampler.patch, lo.sampler.batch_size, len(lo)) == (32, 4, 2)
    assert [lo.batches_in(e) for e in range(3)] == [2, 5, 5]
    got = {e: [(lr.clone(), hr.clone()) for lr, hr in lo] for e in range(2)}
    assert [hr.shape for _, hr in got[0]] == [(4, 3, 32, 32)] * 2
    assert [(lr.shape, hr.shape) for lr, hr in got[1]] == [((2, 3, 12, 12), (2, 3, 48, 48))] * 5
    assert lo.epoch == 2 and lo.sampler.patch == 48
    # each epoch's samples: a pure function of (seed, epoch) and that epoch's stage; the same
    # as a fixed-patch loader's and as the torch loader's
    for e, patch, batch in [(0, 32, 4), (1, 48, 2)]:
        ref = srdata.make_loader(db, "torch", **(KW | dict(batch_size=batch)), patch_size=patch)
        ref.set_epoch(e)
        for (lr, hr), (rlr, rhr) in zip(got[e], ref, strict=True):
            assert torch.equal(hr, rhr) and torch.equal(lr, rlr)
    # resume mid-epoch 1 (and a fresh loader starts in stage 0, the state moves it on)
    cut = srdata.make_loader(db, loader, patch_schedule="32:0,48:1", **KW)
    assert len(list(cut)) == 5  # epoch 0: 5 batches of 2 at 32 px
    next(iter(cut))  # and one of epoch 1
    state = cut.state_dict()
    assert (state["epoch"], state["batch"], state["patch"]) == (1, 1, 48)
    again = srdata.make_loader(db, loader, patch_schedule="32:0,48:1", **KW)
    again.load_state_dict(state)
    lr, hr = next(iter(again))
    assert hr.shape == (2, 3, 48, 48)
    fixed = srdata.make_loader(db, "torch", **KW, patch_size=48)
    fixed.set_epoch(1)
    assert torch.equal(hr, list(fixed)[1][1])
    with pytest.raises(ValueError, match="follows its patch_schedule"):
        again.set_epoch(2, patch_size=32)


def test_set_epoch_switches_by_hand_and_ranks_stay_disjoint(packed):
    db = packed("png")
    lo = srdata.make_loader(db, "torch", **KW, patch_size=32)
    lo.set_epoch(1, patch_size=48)
    assert next(iter(lo))[1].shape == (2, 3, 48, 48)
    with pytest.raises(ValueError, match="epoch boundary"):
        lo.set_epoch(1, patch_size=32)
    with pytest.raises(ValueError, match="saved at patch 48"):
        srdata.make_loader(db, "torch", **KW, patch_size=32).load_state_dict(lo.state_dict())
    with pytest.raises(ValueError, match="not divisible by scale 4"):
        lo.set_epoch(2, patch_size=30)
    for e, patch, batch in [(0, 32, 4), (1, 48, 2)]:
        ranks = [srdata.make_loader(db, "torch", **(KW | dict(batch_size=batch)),
                                    patch_size=patch, rank=r, world_size=2)
                 for r in range(2)]
        ids = [set(r.sampler.plan(e)[:, 0].tolist()) for r in ranks]
        assert len(ids[0]) == len(ids[1]) == 4 and not ids[0] & ids[1]


def test_training_across_a_stage_switch(packed, tmp_path):
    out = tmp_path / "run"
    r = train(packed("png"), out, "--epochs", 3, "--patch-schedule", "32:0, 48:1",
              "--batch-schedule", "pixels", "--val-images", 1)
    assert r.exit_code == 0, r.output
    assert [(e["epoch"], e["patch"], e["batch_size"]) for e in events(out, "stage")] == \
        [(0, 32, 4), (1, 48, 2)]
    # 8 training images: 2 steps of 4 at 32 px, then 4 steps of 2 at 48 px per epoch
    assert [e["step"] for e in events(out, "train")] == list(range(1, 11))
    state = checkpoint.load(out / "last.pt")
    assert state["scheduler"]["total_steps"] == 10  # OneCycle over the whole run
    assert state["config"]["patch"] == 48 and state["config"]["patch_schedule"] == "32:0,48:1"
    assert state["loader"]["patch"] == 48
    assert all("psnr" in e for e in events(out, "val"))
    r = train(packed("png"), out, "--epochs", 3, "--patch-schedule", "32:0,48:2", "--resume")
    assert r.exit_code == 1 and "--patch-schedule: checkpoint '32:0,48:1'" in r.output


@pytest.mark.parametrize("args, message", [
    (["--patch-schedule", "30:0,48:1"], "patch 30 (from epoch 0) is not divisible by scale 4"),
    (["--patch-schedule", "32:0,128:1"], "larger than the smallest image"),
    (["--patch-schedule", "32:0,48:3"], "starts after the last epoch"),
    (["--patch-schedule", "32:2"], "the first stage at epoch 0"),
    (["--patch-schedule", "32,48"], "expected PATCH:EPOCH pairs"),
    (["--patch-schedule", "32:0,48:1", "--patch", "64"], "--patch 64 with a --patch-schedule"),
])
def test_schedule_mistakes_are_named(packed, tmp_path, args, message):
    r = train(packed("png"), tmp_path / "run", "--epochs", 2, *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert "Traceback" not in r.output


def test_early_stop_patience_counts_across_stages(packed, tmp_path, monkeypatch):
    from srtrain import train as train_mod
    scores = iter([30.0, 29.0, 28.0, 27.0])  # only the first validation is a best
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: {"psnr": next(scores)})
    out = tmp_path / "run"
    r = train(packed("png"), out, "--epochs", 4, "--patch-schedule", "32:0,48:2",
              "--early-stop", 2)
    assert r.exit_code == 0, r.output
    assert [e["epoch"] for e in events(out, "val")] == [0, 1, 2]  # stale 1, then 2 at the switch
    assert events(out, "early_stop")


def test_resume_after_kill_9_across_a_stage_switch(packed, tmp_path):
    # 24 steps at 32 px (6 epochs of 4), then 8 at 48 px; killed early in the first stage
    args = ["--db", packed("png"), *TINY, "--epochs", 8, "--patch-schedule", "32:0,48:6",
            "--save-every", 2, "--val-every", 4]
    at, resumed, reference, killed, full = run_killed_and_resumed(args, tmp_path, 3)
    assert 2 <= at < 24, f"killed at step {at}, expected it in the first stage"
    assert min(resumed) == at + 1 and max(resumed) == 32
    assert all(resumed[s] == reference[s] for s in resumed)
    assert [e["patch"] for e in events(killed, "stage")][-2:] == [32, 48]
    assert same_weights(killed, full)


def test_ddp_two_processes_across_a_stage_switch(packed, tmp_path):
    out = tmp_path / "ddp"
    args = ["--db", packed("png"), "--out", out, *TINY, "--epochs", 2, "--workers", 1,
            "--patch-schedule", "32:0,48:1", "--batch-schedule", "pixels"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", 2,
           "--master-port", 29500 + (os.getpid() + 500) % 1000, "-m", "srtrain", *args]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    # 8 images, 2 ranks: one batch of 4 per rank at 32 px, then two of 2 at 48 px
    assert [e["step"] for e in events(out, "train")] == [1, 2, 3]
    assert [(e["patch"], e["batch_size"]) for e in events(out, "stage")] == [(32, 4), (48, 2)]
    state = checkpoint.load(out / "last.pt")
    assert state["loader"]["world_size"] == 2 and state["scheduler"]["total_steps"] == 3
    assert np.isfinite(events(out, "val")[-1]["psnr"])
