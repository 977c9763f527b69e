"""The GPU paths: DALI ``mixed`` decode against the torch loader, and a throughput smoke.

Skipped without CUDA (see conftest). On a GPU machine: ``pytest -m gpu -s``; the smoke
prints one JSON line per loader (not a benchmark: see benchmarks/loader_throughput.py).
"""
import json
import time

import numpy as np
import pytest
import torch

import srdata
from conftest import make_images
from srdata.pack import PackConfig, pack

pytest.importorskip("nvidia.dali", reason="needs DALI: pip install '.[dali]'")
pytestmark = [pytest.mark.gpu, pytest.mark.dali]

KW = dict(batch_size=4, patch_size=48, scale=4, seed=7, dtype=torch.uint8, workers=2,
          device="cuda")


def epoch(loader):
    return [(lr.cpu(), hr.cpu()) for lr, hr in loader]


@pytest.mark.parametrize("codec, roi, tol", [("png", False, 0), ("png", True, 0),
                                             ("raw", True, 0), ("jpeg", False, 1),
                                             ("jpeg", True, 1)])
def test_mixed_decode_matches_the_torch_loader(packed, codec, roi, tol):
    path = packed(codec)
    dali = srdata.make_loader(path, "dali", dali=srdata.DaliTuning(roi_decode=roi), **KW)
    ref = srdata.make_loader(path, "torch", **KW)
    for _ in range(2):  # two epochs: the pipeline running on into the next on the GPU too
        a, b = epoch(ref), epoch(dali)
        assert len(a) == len(b) > 0
        for (lr1, hr1), (lr2, hr2) in zip(a, b):
            assert hr2.shape == hr1.shape and lr2.shape == lr1.shape
            assert (hr1.float() - hr2.float()).abs().mean() <= tol
            assert (lr1.float() - lr2.float()).abs().mean() <= tol
    assert dali.per_run == len(dali) == 2  # a GPU's default: several batches a run


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_stream_outputs_match_host_outputs_behind_a_busy_stream(packed, codec):
    """DaliTuning(outputs="stream"): the batch is ordered on the current stream, not waited for.
    Each fetch comes while that stream is still busy with queued work, and DALI goes on
    into the next batches meanwhile, so a copy that did not wait for DALI, or read memory
    DALI had already handed back, would give other pixels than the host-synchronised run."""
    path = packed(codec)
    busy = torch.rand(2048, 2048, device="cuda")
    runs = {}
    for how in ("host", "stream"):
        got = []
        for lr, hr in srdata.make_loader(path, "dali", dali=srdata.DaliTuning(outputs=how),
                                          **KW):
            for _ in range(20):  # tens of ms queued ahead of the next batch's copy
                busy = (busy @ busy).clamp_(-1, 1)
            got.append((lr.clone(), hr.clone()))
        torch.cuda.synchronize()
        runs[how] = [(lr.cpu(), hr.cpu()) for lr, hr in got]
    assert len(runs["host"]) == len(runs["stream"]) > 1
    for (lr1, hr1), (lr2, hr2) in zip(runs["host"], runs["stream"]):
        assert torch.equal(lr1, lr2) and torch.equal(hr1, hr2)


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_loader_copies_from_its_pinned_ring_behind_a_busy_stream(packed, workers):
    """The torch loader copies each batch to the GPU straight from a pinned ring slot, and
    asynchronously: with the stream busy, a slot a worker wrote again before its copy ran
    would give other pixels than the CPU loader's."""
    path = packed("raw")
    kw = KW | {"workers": workers}
    lo = srdata.make_loader(path, "torch", **kw)
    assert lo._ring.pinned and lo._ring.memory.is_pinned()
    busy = torch.rand(2048, 2048, device="cuda")
    for epoch_ in range(2):
        got = []
        for lr, hr in lo:
            for _ in range(20):  # tens of ms queued ahead of the next batch's copy
                busy = (busy @ busy).clamp_(-1, 1)
            got.append((lr, hr))  # held on the device, not cloned
        torch.cuda.synchronize()
        ref = srdata.make_loader(path, "torch", **(kw | {"device": "cpu"}))
        ref.set_epoch(epoch_)
        want = list(ref)
        assert len(got) == len(want) > 1
        for (lr1, hr1), (lr2, hr2) in zip(got, want):
            assert torch.equal(lr1.cpu(), lr2) and torch.equal(hr1.cpu(), hr2)


def test_outputs_live_on_the_gpu_in_channels_last(packed):
    lr, hr = next(iter(srdata.make_loader(packed("jpeg"), "dali",
                                          **(KW | {"dtype": torch.float16}))))
    for t in (lr, hr):
        assert t.device.type == "cuda" and t.dtype == torch.float16
        assert t.is_contiguous(memory_format=torch.channels_last)


def test_throughput_smoke(tmp_path):
    src = tmp_path / "images"
    make_images(src, [(512, 512)] * 64, exts=(".jpg",))
    db = tmp_path / "db"
    pack(src, db, PackConfig(size=512, min_size=256), progress=False)
    for name in ("dali", "torch"):
        lo = srdata.make_loader(db, name, batch_size=16, patch_size=256, scale=4,
                                dtype=torch.bfloat16, device="cuda")
        for _ in lo:  # warm up: workers, decoder, allocator
            pass
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for _ in range(3):
            for lr, hr in lo:
                n += hr.shape[0]
        torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t0)
        print(json.dumps({"loader": name, "images_per_s": round(rate, 1),
                          "gpu": torch.cuda.get_device_name(), "images": n}))
        assert rate > 0 and np.isfinite(rate)


def test_trainer_on_the_gpu_with_amp_compile_and_data_wait(packed, tmp_path):
    from click.testing import CliRunner

    from srtrain.cli import main
    out = tmp_path / "run"
    r = CliRunner().invoke(main, [
        "--db", str(packed("jpeg")), "--out", str(out), "--model", "fast", "--patch", "48",
        "--batch-size", "2", "--epochs", "2", "--loader", "dali", "--log-every", "1",
        "--val-split", "0.2", "--val-images", "2", "--profile-loader", "-q"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in lines if e["event"] == "train"]
    assert train and all(e["gpu_mem_gb"] > 0 and e["data_wait_ms"] >= 0 for e in train)
    saved = json.loads((out / "config.json").read_text())
    assert saved["amp"] == "auto"
    # --compile auto: the blocks compiled and replayed as CUDA graphs where Triton can build
    from srtrain.kernels import compiler_missing
    want = ("off", False) if compiler_missing(torch.device("cuda")) else ("blocks", True)
    assert (saved["compile"], saved["cuda_graphs"]) == want
    assert any(e["event"] == "profile" for e in lines)
    r = CliRunner().invoke(main, ["--db", str(packed("jpeg")), "--out", str(out), "--model",
                                  "fast", "--patch", "48", "--batch-size", "2", "--epochs", "3",
                                  "--loader", "dali", "--val-split", "0.2", "--val-images", "2",
                                  "--resume", "-q"])
    assert r.exit_code == 0, r.output  # a compiled run resumed: a third epoch
    end = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["epoch"] == 3
    from srdata.samples import synthetic_image, write_image
    write_image(tmp_path / "small.png", synthetic_image(40, 56, 0))
    r = CliRunner().invoke(main, ["upscale", "--ckpt", str(out / "last.pt"),
                                  str(tmp_path / "small.png"), str(tmp_path / "big.png"), "-q"])
    assert r.exit_code == 0, r.output  # fp16 on the GPU
    import cv2
    assert cv2.imread(str(tmp_path / "big.png")).shape == (160, 224, 3)


def test_degradations_on_the_gpu_match_the_torch_loader(packed):
    """bicubic and Real-ESRGAN LR made in the GPU graph (per-sample parameters from the CPU
    source) against the torch loader's, as tests/test_degradation_loaders.py on the CPU;
    nvJPEG's encoder is not OpenCV's, hence only the statistical bound for realesrgan."""
    path = packed("png")
    for degradation, patch in (("bicubic", 48), ("realesrgan", 64)):
        kw = KW | {"patch_size": patch, "degradation": degradation}
        lr1, hr1 = epoch(srdata.make_loader(path, "torch", **kw))[0]
        lr2, hr2 = epoch(srdata.make_loader(path, "dali", **kw))[0]
        assert torch.equal(hr1, hr2) and lr1.shape == lr2.shape
        diff = lr2.float() - lr1.float()
        if degradation == "bicubic":
            assert diff.abs().max() <= 1
        else:
            assert diff.mean().abs() < 2 and diff.std() < 20
