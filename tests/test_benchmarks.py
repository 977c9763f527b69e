"""The benchmarks run end to end on tiny inputs (their numbers are not checked here)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_images

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(script, *args, cwd, timeout=240):
    r = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def photos(tmp_path):
    make_images(tmp_path / "photos", [(160, 200)] * 6, exts=(".jpg",))
    return tmp_path / "photos"


def test_pack_and_codec_benchmarks(photos, tmp_path):
    lines = bench("pack_throughput.py", "--src", photos, "--size", 96, "--workers", "1,2",
                  "--repeats", 1, "--warmup", 0, cwd=tmp_path)
    assert [r["workers"] for r in lines] == [1, 2] and lines[0]["images_per_s"] > 0
    lines = bench("codec_compare.py", "--src", photos, "--size", 96, "--repeats", 1,
                  cwd=tmp_path)
    assert {r["codec"] for r in lines} == {"jpeg", "png", "raw"}
    assert all(r["bytes_per_image"] > 0 for r in lines)


@pytest.mark.dali
def test_loader_benchmark_writes_lines_table_and_plot(tmp_path):
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("matplotlib")
    lines = bench("loader_throughput.py", "--count", 12, "--size", 96, "--patch", 48,
                  "--batch-sizes", 2, "--workers", 1, "--batches", 2, "--repeats", 1,
                  "--out", tmp_path / "r.jsonl", "--md", tmp_path / "r.md",
                  "--plot", tmp_path / "r.png", cwd=tmp_path)
    assert [r["loader"] for r in lines] == ["dali", "dali-roi", "torch", "dali"]
    assert lines[-1]["kind"] == "cold_warm" and lines[0]["images_per_s"] > 0
    assert lines[0]["env"]["dali"] and "torch" in lines[0]["env"]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 4
    assert "| dali-roi | 2 | 1 |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.dali
def test_train_benchmark_reports_loader_efficiency(tmp_path):
    pytest.importorskip("nvidia.dali")
    lines = bench("train_throughput.py", "--count", 8, "--size", 64, "--patch", 32,
                  "--models", "srcnn,fast", "--loaders", "dali,torch", "--batch-sizes", "1,2",
                  "--steps", 2, "--warmup", 1, "--workers", 1, "--md", tmp_path / "t.md",
                  cwd=tmp_path)
    assert [(r["model"], r["loader"], r["batch_size"]) for r in lines] == [
        (m, lo, b) for m in ("srcnn", "fast") for lo in ("dali", "torch") for b in (1, 2)]
    assert all(r["synthetic_img_per_s"] > 0 and r["loader_efficiency"] > 0 for r in lines)
    assert "| fast | torch | 2 |" in (tmp_path / "t.md").read_text()


@pytest.mark.dali
def test_gpu_suite_runs_end_to_end_in_quick_mode(tmp_path):
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    bench("gpu_suite.py", "--quick", "--out", "results", cwd=tmp_path, timeout=600)
    steps = [json.loads(x) for x in (out / "suite.jsonl").read_text().splitlines()]
    assert steps and all(s["ok"] for s in steps), steps
    assert {s["part"] for s in steps} == {"db", "loaders", "train", "batch", "codecs",
                                          "quality", "ttq"}
    md = (out / "results.md").read_text()
    for section in ("## Headline", "## Loader throughput", "## Training throughput",
                    "## Batch size", "## Codecs", "## Model presets: quality", "quick mode",
                    "--preset quick"):
        assert section in md
    assert "| esrgan | dali | 2 |" in md and "the users' 10,000 images" in md
    assert "| srcnn | dali | 2 |" in md  # the batch-size sweep
    assert "| progressive | 16:0,32:1 |" in (out / "time_to_quality.md").read_text()
    for png in ("loader_throughput.png", "train_throughput.png", "batch_sizes.png", "codecs.png",
                "time_to_quality.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # a part run again replaces its own results only
    bench("gpu_suite.py", "--quick", "--parts", "headline", "--out", out, cwd=tmp_path)
    assert "## Training throughput" in (out / "results.md").read_text()
    assert {s["part"] for s in map(json.loads, (out / "suite.jsonl").read_text().splitlines())
            } == {"db", "loaders", "train", "batch", "codecs", "quality", "ttq"}
    assert len((out / "headline.jsonl").read_text().splitlines()) == 2


def test_gpu_suite_names_an_unknown_part(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--parts", "train,nope",
                        "--out", tmp_path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "got nope, expected some of loaders," in r.stderr



def test_train_benchmark_skips_a_batch_that_runs_out_of_memory(monkeypatch):
    import torch

    import srtrain.train
    from srtrain.config import TrainConfig
    monkeypatch.syspath_prepend(str(BENCH))
    import train_throughput

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(srtrain.train, "loader_efficiency", oom)
    cfg = TrainConfig(db="db", model="srcnn", amp="off", schedule="constant")
    assert train_throughput.measure(cfg, torch.device("cpu"), steps=1, warmup=0) is None
