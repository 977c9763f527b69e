"""The benchmarks run end to end on tiny inputs (their numbers are not checked here)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_images

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(script, *args, cwd):
    r = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=240)
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
                  "--models", "srcnn,fast", "--loaders", "dali,torch", "--batch-size", 2,
                  "--steps", 2, "--warmup", 1, "--workers", 1, "--md", tmp_path / "t.md",
                  cwd=tmp_path)
    assert [(r["model"], r["loader"]) for r in lines] == [
        ("srcnn", "dali"), ("srcnn", "torch"), ("fast", "dali"), ("fast", "torch")]
    assert all(r["synthetic_img_per_s"] > 0 and r["loader_efficiency"] > 0 for r in lines)
    assert "| fast | torch |" in (tmp_path / "t.md").read_text()
