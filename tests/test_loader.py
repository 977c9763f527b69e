import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import srdata
from conftest import (corrupt_byte, make_basicsr_lmdb, make_images, run, this_tree,
                      to_format_v1)
from srdata import DBError, PackedDB
from srdata.pack import PackConfig, pack
from srdata.sampler import ID, crop_and_flip, nn_downscale

pytest.importorskip("nvidia.dali", reason="the parity tests need DALI: pip install '.[dali]'")
pytestmark = pytest.mark.dali

KW = dict(batch_size=4, patch_size=48, scale=4, seed=7, dtype=torch.uint8, workers=1,
          device="cpu")


def reference(db, loader, epoch):
    """What any loader must yield: the sampler's rows applied to the decoded images."""
    out = []
    for rows in loader.sampler.batches(epoch):
        hr = np.stack([crop_and_flip(db.image(int(r[ID])), r, loader.sampler.patch)
                       for r in rows])
        out.append((nn_downscale(hr.transpose(1, 2, 0, 3), loader.scale).transpose(2, 0, 1, 3),
                    hr))
    return out


def assert_same(a, b, tol=0.0):
    assert len(a) == len(b)
    for (lr1, hr1), (lr2, hr2) in zip(a, b):
        assert lr1.shape == lr2.shape and hr1.shape == hr2.shape
        for x, y in ((lr1, lr2), (hr1, hr2)):
            diff = np.abs(x.astype(np.int16) - y.astype(np.int16)).mean()
            assert diff <= tol, f"mean abs difference {diff}"


@pytest.mark.parametrize("loader", ["torch", "dali"])
@pytest.mark.parametrize("codec, scale, roi", [("png", 4, True), ("raw", 3, True),
                                               ("png", 2, False)])
def test_loaders_yield_the_sampler_s_samples_bit_exact(packed, loader, codec, scale, roi):
    path = packed(codec)
    kw = KW | {"scale": scale, "drop_last": False}  # a short last batch
    dali = srdata.DaliTuning(roi_decode=roi) if loader == "dali" else None
    lo = srdata.make_loader(path, loader, dali=dali, **kw)
    assert len(lo) == 3
    db = PackedDB(path)
    for epoch in range(2):
        got = run(lo)
        assert got[-1][1].shape == (2, 48, 48, 3) and got[0][0].shape == (4, 48 // scale,
                                                                           48 // scale, 3)
        assert_same(got, reference(db, lo, epoch))
    assert lo.state_dict()["epoch"] == 2


@pytest.mark.parametrize("codec", ["png", "raw"])
def test_dali_runs_of_several_batches_hand_out_the_same_batches(packed, codec):
    """DaliTuning(batches_per_run=3): one pipeline run makes three training batches; the
    epoch's last run is shorter and its last batch short; a resume mid-run starts there."""
    path = packed(codec)
    kw = KW | {"batch_size": 3, "drop_last": False}
    tuning = srdata.DaliTuning(batches_per_run=3)
    lo = srdata.make_loader(path, "dali", dali=tuning, **kw)
    assert len(lo) == 4
    db = PackedDB(path)
    expect = reference(db, lo, 0) + reference(db, lo, 1)
    got = run(lo) + run(lo)
    assert [hr.shape[0] for _, hr in got] == [3, 3, 3, 1] * 2
    assert_same(got, expect)
    first = srdata.make_loader(path, "dali", dali=tuning, **kw)
    head = run(first, 1)
    resumed = srdata.make_loader(path, "dali", dali=tuning, **kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert_same(head + run(resumed) + run(resumed), expect)


@pytest.mark.parametrize("roi", [False, True])
def test_dali_jpeg_within_one_grey_level_of_torch(packed, roi):
    path = packed("jpeg")
    a = run(srdata.make_loader(path, "torch", **KW))
    b = run(srdata.make_loader(path, "dali", dali=srdata.DaliTuning(roi_decode=roi), **KW))
    assert_same(a, b, tol=1.0)


def test_basicsr_lmdb_feeds_both_loaders_alike(image_dir, tmp_path):
    files = sorted(str(p.relative_to(image_dir)) for p in image_dir.rglob("*.*"))
    db = tmp_path / "train_HR.lmdb"
    make_basicsr_lmdb(db, image_dir, files, [f.rsplit(".", 1)[0] for f in files])
    kw = KW | {"batch_size": 2, "patch_size": 64}
    a = run(srdata.make_loader(db, "torch", **kw))
    assert len(a) == 3
    assert_same(a, run(srdata.make_loader(db, "dali", **kw)))


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_output_dtype_and_memory_format(packed, loader):
    path = packed("png")
    kw = KW | {"batch_size": 2}
    u8 = next(iter(srdata.make_loader(path, loader, **kw)))
    for dtype in (torch.float32, torch.bfloat16):
        lr, hr = next(iter(srdata.make_loader(path, loader, **(kw | {"dtype": dtype}))))
        assert lr.dtype == hr.dtype == dtype and hr.shape == (2, 3, 48, 48)
        assert hr.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(hr.float(), u8[1].float() / 255, atol=1 / 255 * 0.01 +
                              (4e-3 if dtype == torch.bfloat16 else 0))
        assert 0 <= hr.min() and hr.max() <= 1
    lr, hr = next(iter(srdata.make_loader(path, loader, **(kw | {"channels_last": False}))))
    assert hr.is_contiguous() and lr.is_contiguous() and lr.shape == (2, 3, 12, 12)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_state_dict_resumes_at_the_exact_next_batch(packed, loader):
    path = packed("png")
    whole = srdata.make_loader(path, loader, **KW)
    expect = run(whole) + run(whole)  # epochs 0 and 1
    first = srdata.make_loader(path, loader, **KW)
    head = run(first, 2)
    state = json.loads(json.dumps(first.state_dict()))  # it goes into checkpoints
    assert state["epoch"] == 0 and state["batch"] == 2
    resumed = srdata.make_loader(path, loader, **KW)
    resumed.load_state_dict(state)
    tail = run(resumed) + run(resumed)
    assert_same(head + tail, expect)


def test_set_epoch_and_len(packed):
    lo = srdata.make_loader(packed("png"), "torch", **(KW | {"sample_ratio": 0.5}))
    assert len(lo) == 1  # 5 drawn, whole batches of 4
    lo.set_epoch(3)
    assert lo.state_dict()["epoch"] == 3
    assert_same(run(lo), reference(PackedDB(packed("png")), lo, 3))


def test_load_state_dict_refuses_other_settings(packed):
    state = srdata.make_loader(packed("png"), "torch", **KW).state_dict()
    other = srdata.make_loader(packed("png"), "torch", **(KW | {"batch_size": 2}))
    with pytest.raises(ValueError, match="same seed, batch size"):
        other.load_state_dict(state)


@pytest.mark.parametrize("kw, err, match", [
    ({"scale": 5}, ValueError, "got scale=5, expected 2, 3 or 4"),
    ({"patch_size": 50}, ValueError, "patch size 50 is not divisible by scale 4; use 48 or 52"),
    ({"patch_size": 128}, ValueError, "patch 128 is larger than image .*--min-size 128"),
    ({"dtype": torch.int32}, ValueError, "got dtype=torch.int32"),
    ({"batch_size": 11}, ValueError, "fewer than batch_size 11"),
])
def test_bad_options_are_named(packed, kw, err, match):
    with pytest.raises(err, match=match):
        srdata.make_loader(packed("png"), "torch", **(KW | kw))


def test_bad_loader_and_database_are_named(packed, tmp_path):
    with pytest.raises(ValueError, match="got loader='jax', expected one of dali, torch"):
        srdata.make_loader(packed("png"), "jax", **KW)
    with pytest.raises(DBError, match=str(tmp_path / "nope")):
        srdata.make_loader(tmp_path / "nope", "dali", **KW)
    db = tmp_path / "old"
    make_images(tmp_path / "im", [(100, 100)] * 4)
    pack(tmp_path / "im", db, PackConfig(size=96, min_size=48, workers=1), progress=False)
    manifest = json.loads((db / "manifest.json").read_text())
    (db / "manifest.json").write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(DBError, match="version 99"):
        srdata.make_loader(db, "torch", **KW)


def test_missing_dali_says_how_to_get_it(packed, monkeypatch):
    from srdata import dali_loader
    monkeypatch.setattr(dali_loader, "pipeline_def", None)
    with pytest.raises(ImportError, match=r"pip install '\.\[dali\]'.*--loader torch"):
        srdata.make_loader(packed("png"), "dali", **KW)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_undecodable_record_is_named_not_hung(image_dir, tmp_path, loader):
    db = tmp_path / "db"
    pack(image_dir, db, PackConfig(size=96, min_size=48, workers=1), progress=False)
    packed_db = PackedDB(db)
    value = packed_db.read(2)
    data = (db / "shard-00000" / "data.mdb").read_bytes()
    for at in range(200, len(value), 97):  # scramble the entropy-coded data, keep the header
        corrupt_byte(db / "shard-00000" / "data.mdb", data.index(value) + at)
    corrupt_byte(db / "shard-00000" / "data.mdb", data.index(value) + 2)  # and the SOI marker
    lo = srdata.make_loader(db, loader, **(KW | {"batch_size": 6}))
    key = packed_db.records[2].key
    with pytest.raises(DBError, match=f"key {key} .*srdata verify"):
        run(lo)


def test_missing_key_in_a_dali_worker_surfaces(image_dir, tmp_path):
    db = tmp_path / "db"
    pack(image_dir, db, PackConfig(size=96, min_size=48, workers=1, codec="raw"),
         progress=False)
    to_format_v1(db, index_sha256=False)  # else the edited index itself is refused at open
    index = json.loads((db / "index.json").read_text())
    index["rows"][3][1] = "99999999"  # a key the shard does not hold
    (db / "index.json").write_text(json.dumps(index))
    with pytest.raises(DBError, match="key 99999999"):
        run(srdata.make_loader(db, "dali", **(KW | {"batch_size": 6})))


FREE_SCRIPT = """
import gc, multiprocessing, sys, time, srdata
if __name__ == "__main__":
    lo = srdata.make_loader(sys.argv[1], loader="dali", batch_size=4, patch_size=48, scale=4,
                            workers=2, device="cpu")
    for epoch in range(2):  # a break, then a rebuild for the next epoch
        lo.set_epoch(epoch)
        next(iter(lo))
    time.sleep(1.5)  # the worker-death watch has looked at the loader
    print(len(multiprocessing.active_children()))
    del lo
    gc.collect()
    deadline = time.time() + 10
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.1)
    print(len(multiprocessing.active_children()), flush=True)
"""


def test_a_dropped_dali_loader_frees_its_workers(packed, tmp_path):
    """The worker-death watch held the last loader it checked: its pipeline, workers and
    device memory stayed until the process exited."""
    script = tmp_path / "free.py"
    script.write_text(FREE_SCRIPT)
    done = subprocess.run([sys.executable, script, packed("jpeg")], capture_output=True,
                          text=True, timeout=120, env=this_tree())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["2", "0"], done.stderr[-3000:]


@pytest.mark.parametrize("module", ["srdata.torch_loader", "srdata.dali_loader"])
def test_a_loader_does_not_import_the_factory(module):
    """The imports run one way (factory -> implementations -> base class); the factory in
    turn imports an implementation only when one is asked for, so a torch run never pays
    for DALI's import."""
    probe = (f"import sys, {module}\n"
             "print(sorted(m for m in ('srdata.loader', 'srdata.torch_loader', "
             "'srdata.dali_loader') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, env=this_tree())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [f"['{module}']"]


HANG_SCRIPT = """
import sys, cv2, numpy as np, srdata
if __name__ == "__main__":
    cv2.setNumThreads(4)  # start OpenCV's thread pool here, as any large resize would
    cv2.resize(np.zeros((3000, 3000, 3), np.uint8), (700, 700), interpolation=cv2.INTER_AREA)
    loader = srdata.make_loader(sys.argv[1], loader="torch", batch_size=4, patch_size=48,
                                scale=4, workers=2, device="cpu")
    print(sum(len(hr) for lr, hr in loader))
"""


def test_torch_workers_survive_opencv_threads_in_the_parent(packed, tmp_path):
    # Forked workers inherited the parent's OpenCV pool without its threads and hung in
    # cv2.setNumThreads; spawned workers start clean.
    script = tmp_path / "train.py"
    script.write_text(HANG_SCRIPT)
    try:
        done = subprocess.run([sys.executable, script, packed("jpeg")], capture_output=True,
                              text=True, timeout=60, env=this_tree())
    except subprocess.TimeoutExpired:
        pytest.fail("torch loader workers hung after OpenCV used threads in the parent")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["8"]  # 10 images, batch 4, drop_last


def test_a_batch_cut_off_by_a_dying_torch_worker_is_a_worker_death(packed, monkeypatch):
    """A worker killed while it sends a batch leaves half a message: the DataLoader then
    raises EOFError, which the CLI does not read as a dead worker ("Aborted!" instead)."""
    from srdata._proc import WorkerDied
    lo = srdata.make_loader(packed("jpeg"), loader="torch", batch_size=4, patch_size=32,
                            scale=4, workers=0, device="cpu")

    def broken():
        raise EOFError
        yield
    monkeypatch.setattr(lo, "_dl", broken())
    with pytest.raises(WorkerDied, match="DataLoader worker exited unexpectedly"):
        next(iter(lo))

    def raised_by_a_worker():  # how the DataLoader re-raises a worker's own exception
        raise EOFError("Caught EOFError in DataLoader worker process 0.")
        yield
    monkeypatch.setattr(lo, "_dl", raised_by_a_worker())
    with pytest.raises(EOFError, match="in DataLoader worker process"):
        next(iter(lo))


FORK_SCRIPT = """
import os, sys, cv2, numpy as np
from srdata.reader import open_db
from srdata.sampler import crop_and_flip
db = open_db(sys.argv[1])
for i in range(len(db)):  # decode and cut as the torch loader's workers do
    crop_and_flip(db.image(i), np.array([i, 0, 0, 1, 1, 1]), 32)
pid = os.fork()
if pid == 0:
    cv2.setNumThreads(1)  # hangs if the parent had started OpenCV's thread pool
    os._exit(0)
os.waitpid(pid, 0)
print("forked child done")
"""


@pytest.mark.parametrize("codec", ["jpeg", "png"])
def test_reading_images_leaves_the_process_safe_to_fork(tmp_path, codec):
    """The reader promises forked workers (a user's own DataLoader): decoding and cutting
    must not start OpenCV's thread pool, as cv2.cvtColor does on images this large."""
    make_images(tmp_path / "im", [(640, 640)] * 2)
    db = tmp_path / "db"
    pack(tmp_path / "im", db, PackConfig(size=512, min_size=256, workers=1, codec=codec),
         progress=False)
    script = tmp_path / "fork.py"
    script.write_text(FORK_SCRIPT)
    try:
        done = subprocess.run([sys.executable, script, db], capture_output=True, text=True,
                              timeout=60, env=this_tree())
    except subprocess.TimeoutExpired:
        pytest.fail("a process forked after reading images hung in cv2.setNumThreads")
    assert done.returncode == 0 and done.stdout.strip() == "forked child done", done.stderr


@pytest.mark.dali
def test_dali_tuning_knobs_are_validated_and_applied(packed):
    from srdata.dali_loader import decoder_args
    db = packed("jpeg")
    kw = dict(batch_size=2, patch_size=32, scale=4, workers=1, device="cpu", dtype=torch.uint8,
              sample_ratio=0.5)
    tuned = srdata.DaliTuning(threads=2, hw_decoder_load=0.9,
                              decoder_hints={"preallocate_width_hint": 512}, outputs="stream")
    lo = srdata.make_loader(db, "dali", dali=tuned, **kw)
    assert lo.threads == 2 and lo.dec == {}  # the CPU decoder takes no GPU tuning
    lr, hr = next(iter(lo))  # "stream" outputs: on the CPU there is no stream to take
    assert hr.shape[-2:] == (32, 32) and lr.shape[-2:] == (8, 8)
    assert decoder_args(True, 0.9, {"device_memory_padding": 1 << 20}) == {
        "hw_decoder_load": 0.9, "device_memory_padding": 1 << 20}
    assert decoder_args(True, None, None) == {"hw_decoder_load": 1.0}  # measured, not 0.65
    for bad, match in (({"threads": 0}, r"DaliTuning\(threads=0\), expected >= 1"),
                       ({"batches_per_run": 0}, r"batches_per_run=0\), expected >= 1"),
                       ({"hw_decoder_load": 1.5}, "hw_decoder_load=1.5"),
                       ({"decoder_hints": {"bogus": 1}}, r"decoder_hints\) bogus"),
                       ({"outputs": "device"}, "outputs='device'\\), expected host or")):
        with pytest.raises(ValueError, match=match):
            srdata.DaliTuning(**bad)
    with pytest.raises(ValueError, match=r"got dali=DaliTuning\(.*threads=2.*\) with "
                                         "loader='torch': it tunes DALI"):
        srdata.make_loader(db, "torch", dali=srdata.DaliTuning(threads=2), **kw)
