"""The benchmarks run end to end on tiny inputs (their numbers are not checked here)."""
import json
import os
import re
import subprocess
import sys
import tarfile
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
    md = (tmp_path / "r.md").read_text()
    assert "| dali-roi | 2 | 1 |" in md
    assert re.search(r"\| torch \| 2 \| 1 \|.* \| \d+\.\d s \|\n", md)  # its first batch
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    # DALI's knobs: one row per combination for dali, the untuned one for torch
    lines = bench("loader_throughput.py", "--count", 12, "--size", 96, "--patch", 48,
                  "--batch-sizes", 2, "--workers", 1, "--batches", 2, "--repeats", 1,
                  "--loaders", "dali,torch", "--dali-threads", "1,2", "--prealloc", "on",
                  "--no-cold", "--md", tmp_path / "t.md", cwd=tmp_path)
    assert [(r["loader"], r.get("tuning")) for r in lines] == [
        ("dali", {"dali_threads": 1, "decoder_hints": "on"}),
        ("dali", {"dali_threads": 2, "decoder_hints": "on"}), ("torch", None)]
    assert "| dali, dali_threads 2, decoder_hints on | 2 | 1 |" in (tmp_path / "t.md").read_text()


@pytest.mark.dali
def test_train_benchmark_reports_loader_efficiency(tmp_path):
    pytest.importorskip("nvidia.dali")
    lines = bench("train_throughput.py", "--count", 8, "--size", 64, "--patch", 32,
                  "--models", "srcnn", "--loaders", "dali,torch", "--batch-sizes", "1,2",
                  "--steps", 3, "--warmup", 1, "--workers", 1, "--dali-outputs", "host,stream",
                  "--dali-per-run", "2,0", "--md", tmp_path / "t.md", cwd=tmp_path)
    # DALI's switches make a row each for dali only; batches a run as the loader made them
    # (0: the default, one on the CPU)
    assert [(r["loader"], r["batch_size"], r.get("dali_outputs"), r.get("dali_per_run"))
            for r in lines] == [
        (lo, b, out, runs) for lo in ("dali", "torch") for b in (1, 2)
        for out in (("host", "stream") if lo == "dali" else (None,))
        for runs in ((2, 1) if lo == "dali" else (None,))]
    assert all(r["synthetic_img_per_s"] > 0 and r["loader_efficiency"] > 0 for r in lines)
    # two timed fetches a row (the first timed step's batch comes before the clock starts);
    # on the CPU the data wait is the wall time in the loader, so at least the median's half
    assert all(0 < r["fed_fetch_ms"] <= 2 * r["fed_data_wait_ms"] for r in lines)
    # srtrain's --compile auto, as the rows say it ran: nothing compiled on the CPU
    assert {(r["compile"], r["cuda_graphs"]) for r in lines} == {("off", False)}
    table = (tmp_path / "t.md").read_text()
    assert "| srcnn | torch | 2 |" in table
    assert "| srcnn | dali, stream outputs, 2 batches a run | 1 |" in table
    assert "| GPU wait ms / step | fetch ms / step |" in table


@pytest.mark.dali
def test_gpu_suite_runs_end_to_end_in_quick_mode(tmp_path):
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    bench("gpu_suite.py", "--quick", "--out", "results", cwd=tmp_path, timeout=600)
    steps = [json.loads(x) for x in (out / "suite.jsonl").read_text().splitlines()]
    assert steps and all(s["ok"] and not s.get("skipped") for s in steps), steps
    # the quick default (the GPU one less DALI tuning and compile), most valuable first
    assert list(dict.fromkeys(s["part"] for s in steps)) == ["db", "headline", "epoch", "fetch",
                                                             "loaders", "kernels", "train",
                                                             "gan", "batch", "ttq",
                                                             "degradations"]
    md = (out / "results.md").read_text()
    assert "| dali | jpeg | realesrgan | uint8 | 2 | 1 | 1 |" in md  # host time per fetch
    for section in ("## Headline", "## One real epoch", "## Host time per fetch",
                    "## Loader throughput", "## Training throughput", "## Kernel switches",
                    "## GAN stage step", "## Batch size",
                    "## esrgan fed with each LR degradation",
                    "## LR degradations", "quick mode", "--preset quick"):
        assert section in md
    epoch = json.loads((out / "real_epoch.jsonl").read_text())  # 24 images, 2% validation
    assert epoch["count"] == 24 and epoch["steps"] == 11 and "--epochs 1" in epoch["command"]
    assert 0 < epoch["first_window_s"] <= epoch["train_s"] <= epoch["total_s"]
    assert "| esrgan | dali, realesrgan LR | 2 |" in md  # esrgan fed with Real-ESRGAN's LR
    profile = (out / "fetch_profile.txt").read_text()  # cProfile of the timed fetches
    assert "## dali, realesrgan LR, batch 2, 1 workers, 1 batch(es) a run, cpu: 2 fetches" \
        in profile
    # the suite's --per-run 0,1: on the CPU the default is one batch a run too, so one row
    fetches = [json.loads(x) for x in (out / "fetch_host.jsonl").read_text().splitlines()]
    assert [(r["loader"], r["per_run"]) for r in fetches if r["degradation"] == "nn"] == [
        ("dali", 1), ("torch", None)]
    assert "Ordered by: cumulative time" in profile
    assert "| dali | 4 | 1 | on | realesrgan |" in md
    assert "| esrgan | dali | 2 |" in md and "the users' 10,000 images" in md
    assert "| esrgan | synthetic | 2 |" in md  # the headline's step alone
    assert "| srcnn | dali | 2 |" in md  # the batch-size sweep
    # the GAN stage's step: the reference first, then srtrain's defaults and a switch off
    gan = [json.loads(x) for x in (out / "gan_step.jsonl").read_text().splitlines()]
    assert [(r["step"], r["channels_last"]) for r in gan] == [
        ("reference", False), ("srtrain", True), ("srtrain", False)]
    assert "| srcnn | reference (BasicSR's way) | 2 | off | off | off |" in md
    kernels = [json.loads(x) for x in (out / "kernels.jsonl").read_text().splitlines()]
    assert [(k["amp"], k["cudnn_benchmark"], k["tf32"]) for k in kernels] == [
        ("off", True, True), ("off", False, True), ("off", True, True), ("off", True, False)]
    ops = (out / "op_table.txt").read_text()  # where the step's time goes, per switch
    assert ops.count("## srcnn, batch 2") == 2 and "aten::" in ops and "op_table.txt" in md
    assert "| progressive | 16:0,32:1 |" in (out / "time_to_quality.md").read_text()
    for png in ("loader_throughput.png", "train_throughput.png", "batch_sizes.png",
                "time_to_quality.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # the parts left out of the GPU default run on request and keep the others' results
    bench("gpu_suite.py", "--quick", "--parts", "quality,codecs", "--codecs", "raw:95",
          "--out", out, cwd=tmp_path, timeout=600)
    md = (out / "results.md").read_text()
    for section in ("## Headline", "## Training throughput", "## Codecs",
                    "## Model presets: quality"):
        assert section in md
    assert (out / "codecs.png").read_bytes()[:4] == b"\x89PNG"
    parts = [json.loads(x)["part"] for x in (out / "suite.jsonl").read_text().splitlines()]
    assert parts[:parts.index("codecs")] == [s["part"] for s in steps[1:]]  # kept, db redone
    assert set(parts[parts.index("codecs"):]) == {"db", "codecs", "quality"}
    assert json.loads((out / "environment.json").read_text())["parts"] == ["codecs", "quality"]
    assert len((out / "headline.jsonl").read_text().splitlines()) == 3  # dali, torch, synthetic


def test_gpu_suite_names_an_unknown_part_or_codec(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--parts", "train,nope",
                        "--out", tmp_path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "got nope, expected some of headline,epoch,fetch," in r.stderr
    for bad, said in (("raw", "got 'raw', expected CODEC:QUALITY pairs"),
                      ("webp:90", "got webp, expected some of jpeg,png,raw")):
        r = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--codecs", bad,
                            "--out", tmp_path], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and said in r.stderr, r.stderr


def test_gpu_session_script_end_to_end(tmp_path):
    """The GPU session's plumbing on the CPU: facts, the suite under a budget that skips
    every step, one archive and a summary under $OUT (a real quick suite: the test above)."""
    script = str(BENCH / "gpu_session.sh")
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    r = subprocess.run(["bash", script, "--quick", "--skip-tests", "--budget", "0"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu-session.tar.gz",
                                                                    "summary.txt"]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert summary in r.stdout and "== nproc:" in summary and "suite: exit 0" in summary
    assert "## Skipped steps" in summary and "budget: needs ~" in summary
    with tarfile.open(tmp_path / "out" / "gpu-session.tar.gz") as tar:
        names = set(tar.getnames())
        env_txt = tar.extractfile("session/env.txt").read().decode()
        steps = [json.loads(x) for x in tar.extractfile("session/suite/suite.jsonl")]
    assert {"session/env.txt", "session/suite.log", "session/suite/results.md"} <= names
    for fact in ("cgroup CPU quota", "df -h /dev/shm /tmp", "== nvidia-smi", "torch.ones",
                 "nvidia.dali", "lmdb", "pip install --no-deps"):
        assert fact in env_txt or fact == "torch.ones" and "cuda available: False" in env_txt
    # torch imported at once by as many processes as the loader starts workers
    starts = re.search(r"then (\d+) at once \(the loader's workers\)", env_txt)
    workers = re.search(r"loader workers: (\d+|all cores but one)", env_txt).group(1)
    cores = len(os.sched_getaffinity(0))
    assert starts and int(starts.group(1)) == (max(cores - 1, 1) if workers.startswith("all")
                                              else int(workers))
    assert f"\n{starts.group(1)} at once: " in env_txt
    assert steps and all(s["ok"] and s["skipped"] for s in steps)
    for args, message in [(["--budget", "soon"], "--budget expects a whole number"),
                          (["--workers", "0"], "--workers must be at least 1"),
                          (["--fast"], "unknown argument '--fast'")]:
        r = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 2 and message in r.stderr
    r = subprocess.run(["bash", script], env={k: v for k, v in env.items() if k != "OUT"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "set OUT" in r.stderr


def test_loader_efficiency_reads_one_pass_of_the_loader():
    """The synthetic run's batch comes from the same iterator the fed run goes on with: a
    second iter() built a second DALI pipeline (or started the torch workers again)."""
    import torch

    from srtrain.config import TrainConfig
    from srtrain.models import build_model
    from srtrain.timing import loader_efficiency

    class Loader:
        starts = 0

        def __iter__(self):
            Loader.starts += 1
            for _ in range(8):
                yield torch.rand(1, 3, 4, 4), torch.rand(1, 3, 16, 16)

    cfg = TrainConfig(db="db", model="srcnn", amp="off", schedule="constant", batch_size=1,
                      patch=16)
    r = loader_efficiency(cfg, build_model("srcnn", 4), torch.device("cpu"), "off", steps=2,
                          warmup=1, loader=Loader())
    assert Loader.starts == 1 and r["loader_img_per_s"] > 0 and r["synthetic_img_per_s"] > 0



def test_train_benchmark_skips_a_batch_that_runs_out_of_memory(monkeypatch):
    import torch

    import srtrain.timing
    from srtrain.config import TrainConfig
    monkeypatch.syspath_prepend(str(BENCH))
    import train_throughput

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(srtrain.timing, "loader_efficiency", oom)
    cfg = TrainConfig(db="db", model="srcnn", amp="off", schedule="constant")
    assert train_throughput.measure(cfg, torch.device("cpu"), steps=1, warmup=0) is None


def test_train_benchmark_comma_lists_name_what_they_take(monkeypatch):
    from click.testing import CliRunner
    monkeypatch.syspath_prepend(str(BENCH))
    import train_throughput
    for option, bad, said in (("--tf32", "on,maybe", "got on,maybe, expected some of on,off"),
                              ("--cudnn-benchmark", "", "got , expected some of on,off"),
                              ("--cuda-graphs", "auto,x", "expected some of on,off,auto"),
                              ("--compile", "fast", "expected some of auto,off,model,blocks"),
                              ("--dali-outputs", "gpu", "expected some of host,stream"),
                              ("--stages", "l1,gann", "expected some of l1,gan"),
                              ("--amp", "bf61", "expected some of auto,bf16,fp16,off"),
                              ("--channels-last", "yes", "expected some of on,off")):
        r = CliRunner().invoke(train_throughput.main, [option, bad])
        assert r.exit_code == 2 and said in r.output, (option, r.output)
    assert train_throughput._graphs(None, None, "on,auto,off") == [True, None, False]
    assert train_throughput._switch(None, None, "off,on") == [False, True]


def test_loader_benchmark_switches_refuse_what_they_do_not_take(monkeypatch):
    # "--crc of" once ran its rows as crc off and skipped the crc cost without a word
    from click.testing import CliRunner
    monkeypatch.syspath_prepend(str(BENCH))
    import loader_throughput
    for option, bad in (("--crc", "on,of"), ("--crc", "ON"), ("--prealloc", "yes")):
        r = CliRunner().invoke(loader_throughput.main, [option, bad])
        assert r.exit_code == 2 and f"got {bad}, expected some of on,off" in r.output, \
            (option, r.output)


def test_every_benchmark_refuses_a_mistyped_list_before_it_builds_anything(monkeypatch):
    # these once built a database or trained first, then crashed with a traceback
    # (--models srcn: after 30 s), misnamed a row (--formats srpipe2 ran as srpipe) or
    # failed on a stray file (--formats basics: FileExistsError)
    from click.testing import CliRunner
    monkeypatch.syspath_prepend(str(BENCH))
    import _common
    import fetch_host
    import loader_throughput
    import model_quality
    import open_scale
    import pack_throughput
    import time_to_quality
    import train_throughput
    for main, option, bad, said in (
            (train_throughput, "--models", "esrgn", "expected some of esrgan,"),
            (train_throughput, "--loaders", "dali,torh", "expected some of dali,torch,synth"),
            (train_throughput, "--batch-sizes", "3x", "expected comma-separated integers of at "
                                                      "least 1"),
            (train_throughput, "--batch-sizes", "32,0", "integers of at least 1"),
            (loader_throughput, "--loaders", "dali,", "expected some of dali,dali-roi,torch"),
            (fetch_host, "--loaders", "dali-roi", "expected some of dali,torch"),
            (fetch_host, "--degradation", "nn,esrgan", "expected some of nn,bicubic,"),
            (loader_throughput, "--workers", "4,all", "integers of at least 0"),
            (loader_throughput, "--dali-threads", "-1", "integers of at least 1"),
            (loader_throughput, "--hw-decoder-load", "65", "numbers from 0 to 1"),
            (loader_throughput, "--hw-decoder-load", "nan", "numbers from 0 to 1"),
            (model_quality, "--models", "srcn", "expected some of esrgan,"),
            (model_quality, "--degradations", "nn,bicubc", "expected some of nn,bicubic,"),
            (time_to_quality, "--model", "esrgn", "expected one of demo,esrgan,"),
            (time_to_quality, "--runs", "fixed,progresive", "expected some of fixed,progres"),
            (time_to_quality, "--targets", "30.1,x", "comma-separated numbers of at least 0"),
            (open_scale, "--formats", "srpipe,basics", "expected some of srpipe,srpipe-v1,"),
            (pack_throughput, "--workers", "1,two", "integers of at least 0")):
        r = CliRunner().invoke(main.main, [option, bad])
        assert r.exit_code == 2 and f"got {bad}, " in r.output and said in r.output, \
            (main.__name__, option, r.output)
    assert _common.numbers("0.65,0.9,1", float, 0, 1) == [0.65, 0.9, 1.0]
    assert _common.numbers("4,0") == [4, 0]
    assert loader_throughput._threads(None, None, "") == []  # "": DALI's own count


def test_fetch_p90_is_never_under_the_median(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import statistics

    import fetch_host
    assert fetch_host.p90([1.0]) == 1.0
    assert fetch_host.p90([1.0, 3.0]) == 3.0  # was 1.0, under the median of 2.0
    for n in range(1, 40):
        times = [float(i) for i in range(n)]
        assert statistics.median(times) <= fetch_host.p90(times) <= times[-1], n
    assert fetch_host.p90([float(i) for i in range(1, 21)]) == 18.0


def test_quality_table_names_each_learning_rate_when_the_demo_is_among_presets(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import model_quality
    row = {"model": "srcnn", "parameters": 7e4, "psnr": 21.4, "psnr_bicubic": 32.5,
           "ssim": 0.7, "ssim_bicubic": 0.8, "img_per_s": 4.0, "seconds": 3, "epochs": 1,
           "images": 160, "patch": 64, "batch_size": 8, "lr": 2e-4, "loader": "dali",
           "env": {"cpus": 2, "torch": "2.13", "date": "2026-11-28"}}
    assert "batch 8, lr 0.0002, loader" in model_quality._table([row])
    both = model_quality._table([row, row | {"model": "demo", "lr": 2e-3}])
    assert "lr 0.0002 (srcnn), 0.002 (demo), loader" in both


def test_results_page_shows_short_epochs_in_seconds_and_the_runs_notes(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import render_results
    head = {"part": "headline", "model": "esrgan", "loader": "dali", "batch_size": 32,
            "patch": 256, "img_per_s": 202.4, "images": 10000, "seconds_per_epoch": 49.4,
            "baseline_seconds_per_epoch": 7200, "speedup": 145.75}
    (tmp_path / "headline.jsonl").write_text(json.dumps(head) + "\n")
    (tmp_path / "notes.md").write_text("Two calls on one machine.\n")
    md = render_results.render(tmp_path).read_text()
    assert "| esrgan | dali | 32 | 202.4 | 49 s | 145.75× |" in md  # not "0.8 min"
    assert "starting point: 2 h 00 min per epoch" in md
    assert "Two calls on one machine." in md


def test_the_suite_feeds_the_faster_compiled_step_and_the_page_names_graphs(monkeypatch,
                                                                            tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_suite
    import render_results
    env = {"gpu": "H100", "cpus": 16, "torch": "2.11", "date": "2026-11-28"}
    row = {"model": "esrgan", "loader": "synthetic", "batch_size": 32, "amp": "bf16",
           "cudnn_benchmark": True, "tf32": True, "compile": "blocks", "peak_gpu_gib": 9.0,
           "loader_img_per_s": None, "env": env}
    rows = tmp_path / "compile.jsonl"
    assert gpu_suite.faster_graphs(rows) == "off"  # nothing measured
    write = lambda *rs: rows.write_text("".join(json.dumps(r) + "\n" for r in rs))  # noqa
    plain = row | {"cuda_graphs": False, "synthetic_img_per_s": 280.0}
    write(plain)
    assert gpu_suite.faster_graphs(rows) == "off"  # the graphs' row failed
    write(plain, row | {"cuda_graphs": True, "synthetic_img_per_s": 360.0, "cudagraph_skips": 0})
    assert gpu_suite.faster_graphs(rows) == "on"
    write(plain, row | {"cuda_graphs": True, "synthetic_img_per_s": 270.0, "cudagraph_skips": 3},
          row | {"loader": "dali", "cuda_graphs": True, "synthetic_img_per_s": 999.0})
    assert gpu_suite.faster_graphs(rows) == "off"  # step-alone rows only
    md = "\n".join(render_results.kernels_section(tmp_path))
    assert "| blocks | 280.0 |" in md and "| blocks + CUDA graphs (3 graphs skipped) |" in md


def test_a_short_timed_epoch_is_flagged_and_the_suite_times_full_ones(monkeypatch):
    """Fewer timed batches than twice the workers time one batch's latency, not a rate (the
    third H100 session's raw rows: 14 batches for 15 workers); the suite's codec databases
    hold --batches full batches."""
    import torch
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_suite
    import loader_throughput

    class Epoch:  # 15 batches of 64, the first one untimed
        device = torch.device("cpu")

        def __iter__(self):
            return iter([(None, torch.zeros(64, 1))] * 15)

    monkeypatch.setattr(loader_throughput, "build_loader", lambda *a, **kw: Epoch())
    args = {"repeats": 1, "batches": 50}
    with pytest.warns(UserWarning) as said:
        r = loader_throughput.measure(range(1000), "torch", 64, 15, args)
    assert r["timed_batches"] == 14 and [str(w.message) for w in said] == [
        "timed 14 batches with 15 workers: that measures a batch's latency more than the "
        "rate; give --batches 30 or more and a database of at least 3264 images (it holds "
        "1000)"]
    assert loader_throughput.short_epoch(10, 15, 4000, 64, 10).endswith("--batches 30 or more")
    for name, p in gpu_suite.PRESETS.items():
        assert p["codec_count"] >= (p["batches"] + 1) * p["batch"], name


def test_real_epoch_times_launch_to_last_step_and_sets_the_compile_window_apart(monkeypatch,
                                                                                tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import real_epoch
    metrics = tmp_path / "metrics.jsonl"
    events = [{"event": "train", "step": 50, "img_per_s": 100.0, "data_wait_pct": 9.0,
               "time": 1040.0},
              {"event": "train", "step": 100, "img_per_s": 400.0, "data_wait_pct": 1.0,
               "time": 1050.0},
              {"event": "train", "step": 120, "img_per_s": 200.0, "data_wait_pct": 3.0,
               "time": 1060.0},
              {"event": "val", "step": 120, "psnr": 25.0, "time": 1062.5}]
    metrics.write_text("".join(json.dumps(e) + "\n" for e in events))
    r = real_epoch.epoch_summary(metrics, t0=1000.0, t_end=1070.0)
    assert (r["steps"], r["train_s"], r["first_window_s"]) == (120, 60.0, 40.0)
    assert (r["validation_s"], r["total_s"], r["val_psnr"]) == (2.5, 70.0, 25.0)
    # the steady rate leaves the first window (the compile) out: (400 + 200) / 2
    assert (r["steady_img_per_s"], r["data_wait_pct"]) == (300.0, 2.0)
    assert r["computed_epoch_s"] == round(10_000 / 300, 1)
    metrics.write_text(json.dumps({"event": "val", "psnr": 1.0, "time": 1.0}) + "\n")
    with pytest.raises(Exception, match="no train records"):
        real_epoch.epoch_summary(metrics, 0.0, 1.0)


def test_train_benchmark_times_the_gan_step_beside_basicsrs(tmp_path):
    lines = bench("train_throughput.py", "--stages", "l1,gan", "--loaders", "synthetic",
                  "--reference", "--ablate", "--models", "srcnn", "--batch-sizes", "1,2",
                  "--patch", 32, "--steps", 2, "--warmup", 1, "--d-num-feat", 8,
                  "--out", tmp_path / "t.jsonl", "--md", tmp_path / "t.md", cwd=tmp_path)
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == len(lines) == 10
    l1 = [r for r in lines if r["stage"] == "l1"]
    gan = [r for r in lines if r["stage"] == "gan"]
    # --ablate on a CPU: srtrain's defaults, then channels_last off (compile, graphs and amp
    # are off here already: one row, not four of the same)
    assert [(r["batch_size"], r["channels_last"]) for r in l1] == [
        (1, True), (1, False), (2, True), (2, False)]
    assert [(r["batch_size"], r["step"], r["channels_last"], r["srtrain_defaults"])
            for r in gan] == [(b, s, cl, d) for b in (1, 2) for s, cl, d in (
                ("reference", False, False), ("srtrain", True, True),
                ("srtrain", False, False))]
    for r in gan:
        assert r["img_per_s"] > 0 and r["peak_gpu_gib"] is None and not r["out_of_memory"]
        assert r["vgg"] == "random weights (timing only)" and r["d_num_feat"] == 8
        assert (r["amp"], r["compile"], r["cuda_graphs"]) == ("off", "off", False)
        ref = next(x for x in gan if x["step"] == "reference"
                   and x["batch_size"] == r["batch_size"])
        want = None if r is ref else round(r["img_per_s"] / ref["img_per_s"], 3)
        assert r["speedup_vs_reference"] == want
    md = (tmp_path / "t.md").read_text()
    assert "| srcnn | synthetic | 1 |" in md and "| srcnn | synthetic, NCHW | 2 |" in md
    assert "| img/s | × reference | first step | peak GiB |" in md
    assert "| srcnn | reference (BasicSR's way) | 1 | off | off | off |" in md
    speedup = gan[4]["speedup_vs_reference"]
    assert "| srcnn | srtrain (defaults) | 2 | off | on | off | " in md
    assert f"| {speedup:.2f}× |" in md
    # both batch sizes: srtrain's defaults beside the reference, with their peak memory
    assert "| srcnn | 2 | " in md and "| reference peak GiB |" in md
    assert "VGG19 random weights (timing only)" in md


def test_the_reference_gan_step_computes_what_srtrains_does():
    """The yardstick does the same work: from the same weights, BasicSR's way of running
    the iteration gives srtrain's losses, step after step (Adam = AdamW at decay 0)."""
    import copy
    import sys

    import torch

    sys.path.insert(0, str(BENCH))
    from gan_reference import ReferenceStep, random_perceptual
    from srtrain.config import TrainConfig
    from srtrain.discriminator import UNetDiscriminatorSN
    from srtrain.gan import GANConfig, GANStepper
    from srtrain.models import build_model
    torch.manual_seed(0)
    gan = GANConfig(d_num_feat=8)
    model, disc, percep = build_model("rrdbnet", 4, 8, 1, 4), UNetDiscriminatorSN(3, 8), \
        random_perceptual()
    ref = ReferenceStep(copy.deepcopy(model), copy.deepcopy(disc), copy.deepcopy(percep.vgg),
                        gan, lr=1e-4, ema=0.999)
    cfg = TrainConfig(db="unused", lr=1e-4, schedule="constant", amp="off", compile="off",
                      cuda_graphs=False, channels_last=False)
    ours = GANStepper(cfg, gan, model, model, torch.device("cpu"), "off", 100, disc, percep)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        lr, hr = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 32, 32, generator=g)
        theirs, _ = ref(lr, hr)
        mine, _ = ours(lr, hr)
        assert set(theirs) == set(mine) - {"loss"}
        for name, v in theirs.items():
            assert mine[name].item() == pytest.approx(v, rel=1e-4, abs=1e-6), name
    ema = dict(ref.net_g_ema.named_parameters())  # BasicSR's EMA: a fixed 0.999
    assert not torch.equal(ema["conv_first.weight"], ref.net_g.conv_first.weight)


def test_gan_rows_ablate_each_switch_and_show_where_memory_ran_out(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import render_results
    import train_throughput
    sets = train_throughput.switch_sets(["auto", "off"], [None], ["bf16"], [True, False])
    assert len(sets) == 4  # every combination
    assert train_throughput.switch_sets(["auto", "off"], [None], ["bf16"], [True, False],
                                        ablate=True) == [
        ("auto", None, "bf16", True), ("auto", False, "bf16", True),
        ("off", False, "bf16", True), ("auto", None, "off", True),
        ("auto", None, "bf16", False)]
    env = {"gpu": "H100", "cpus": 16, "torch": "2.11", "date": "2026-12-04"}
    row = {"stage": "gan", "model": "esrgan", "patch": 256, "scale": 4, "d_num_feat": 64,
           "vgg": "random weights (timing only)", "steps": 30, "warmup": 10,
           "cudnn_benchmark": True, "tf32": True, "env": env}
    ref = row | {"step": "reference", "amp": "off", "channels_last": False, "compile": "off",
                 "cuda_graphs": False, "srtrain_defaults": False, "speedup_vs_reference": None}
    ours = row | {"step": "srtrain", "amp": "bf16", "channels_last": True, "compile": "blocks",
                  "cuda_graphs": True, "srtrain_defaults": True}
    rows = [ref | {"batch_size": 16, "img_per_s": 60.0, "first_step_s": 2.0,
                   "peak_gpu_gib": 40.2, "out_of_memory": False},
            ours | {"batch_size": 16, "img_per_s": 180.0, "first_step_s": 20.0,
                    "peak_gpu_gib": 12.5, "out_of_memory": False,
                    "speedup_vs_reference": 3.0},
            ref | {"batch_size": 32, "img_per_s": None, "first_step_s": None,
                   "peak_gpu_gib": None, "out_of_memory": True},
            ours | {"batch_size": 32, "img_per_s": 190.0, "first_step_s": 21.0,
                    "peak_gpu_gib": 24.0, "out_of_memory": False,
                    "speedup_vs_reference": None}]
    (tmp_path / "gan_step.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a GAN row among the L1 ones: its own section only
    (tmp_path / "train_throughput.jsonl").write_text(json.dumps(rows[1]) + "\n")
    md = render_results.render(tmp_path).read_text()
    assert "## GAN stage step" in md and "## Training throughput" not in md
    assert ("| esrgan | srtrain (defaults) | 16 | bf16 | on | blocks + CUDA graphs | 180.0 | "
            "3.00× | 20.0 s | 12.5 |") in md
    assert "| esrgan | reference (BasicSR's way) | 32 | off | off | off | out of memory | - |" \
        in md
    assert "| esrgan | 32 | 190.0 | 24.0 | out of memory | - |" in md  # the memory table
    assert "| esrgan | 16 | 180.0 | 12.5 | 60.0 | 40.2 |" in md


def test_loader_efficiency_in_the_table_shares_one_step_alone_rate(monkeypatch):
    """Each fed row times the step alone on its own model, and those rates differ by noise:
    the table divides every row of one step by the fastest of them."""
    monkeypatch.syspath_prepend(str(BENCH))
    import train_throughput
    env = {"gpu": "G", "cpus": 16, "torch": "t", "dali": "d", "date": "2026-12-04T00:00"}
    row = {"model": "srcnn", "batch_size": 32, "patch": 256, "scale": 4, "amp": "bf16",
           "channels_last": True, "compile": "blocks", "cuda_graphs": True,
           "cudnn_benchmark": True, "tf32": True, "peak_gpu_gib": 1.0, "env": env}
    rows = [row | {"loader": "dali", "synthetic_img_per_s": 3892.0,
                   "loader_img_per_s": 3066.0, "loader_efficiency": 3066 / 3892},
            row | {"loader": "torch", "synthetic_img_per_s": 3343.0,
                   "loader_img_per_s": 3334.0, "loader_efficiency": 3334 / 3343},
            row | {"loader": "dali", "batch_size": 64, "synthetic_img_per_s": 5000.0,
                   "loader_img_per_s": 4000.0, "loader_efficiency": 0.8}]
    md = train_throughput._table(rows)
    assert "| srcnn | dali | 32 | 3,892.0 | 3,066.0 | 79% |" in md
    assert "| srcnn | torch | 32 | 3,892.0 | 3,334.0 | 86% |" in md  # not its own 100%
    assert "| srcnn | dali | 64 | 5,000.0 | 4,000.0 | 80% |" in md  # another step: its own
