"""The whole benchmark suite in one command, for a GPU machine (~10 min with 16 cores, est.).

    python benchmarks/gpu_suite.py --budget 420     # the GPU parts, stopping before 420 s
    python benchmarks/gpu_suite.py --preset cpu     # every part sized for a few CPU cores
    python benchmarks/gpu_suite.py --quick          # tiny sizes: checks the suite end to end

Writes ``benchmarks/results/<gpu>-<date>/`` (``cpu<N>-<date>`` without a GPU). The parts,
most valuable first, so that a budget that runs out loses the least:

1. ``headline``: esrgan's train img/s fed by each loader and on synthetic data, and the
   seconds per epoch of the users' 10K images that follow (srtrain's defaults: on a GPU
   ``--compile auto``, the blocks compiled and replayed as CUDA graphs);
2. ``epoch``: one real epoch of the users' 10K images (``real_epoch.py``): ``srtrain
   --epochs 1`` with its defaults, timed from its start to its last step (not on ``cpu``);
3. ``fetch``: the host's own time in one fetch of a batch, each loader ahead of the step
   (``fetch_host.py``; nearest-neighbour and Real-ESRGAN LR), what a CUDA-graph step
   leaves the GPU idle for, and cProfile's view of those fetches (``fetch_profile.txt``);
4. ``loaders``: loader throughput (dali, dali ROI decode, torch; 4 workers and all cores);
5. ``tuning``: ``dali-roi`` (the default) at all cores with DALI's knobs (hw_decoder_load,
   preallocation hints);
6. ``compile``: esrgan's step alone under torch.compile per block, without and with CUDA
   graphs; the faster fed by DALI (the epoch it gives); then the whole model compiled (the
   levers toward its goal);
7. ``kernels``: the same step with cudnn.benchmark and TF32 (at fp32) on and off, and where
   its time goes (``op_table.txt``);
8. ``train``: the other presets fed by each loader (DALI's batches handed over synchronised
   with the host; ``train_throughput.py --dali-outputs host,stream`` measures both ways);
9. ``gan``: the GAN stage's step alone (esrgan on a GPU): srtrain's with its defaults and
   with each switch off alone, against Real-ESRGAN's step written the way BasicSR runs it
   (fp32, eager, NCHW), timed side by side; then both over smaller batches, for the peak
   memory each needs;
10. ``batch``: one model's img/s and peak memory over a range of batch sizes;
11. ``ttq``: time to quality, validation PSNR against wall time for a fixed patch, a
    progressive patch schedule and ``--sample-ratio 0.3`` (esrgan on a GPU);
12. ``degradations``: esrgan fed by each loader making nearest-neighbour and Real-ESRGAN LR,
    then the loaders' img/s alone (all cores) with nearest neighbour, MATLAB bicubic and
    Real-ESRGAN's degradation;
13. ``codecs``: jpeg q90/q95/q100, png, raw (``--codecs`` picks): bytes and PSNR, and DALI
    and torch img/s;
14. ``quality``: each model preset's validation PSNR over bicubic after the demo's training.

The GPU default (``--preset full``) leaves out codecs (CPU-side) and quality (presets
already ranked); ``--parts codecs,quality`` runs them. Every part uses one database, packed
once by ``tools/pack_lmdb.py`` (into ``--work``, kept for reruns when given). Each step runs
as its own process under a timeout and writes JSON lines; one that fails is recorded in
``suite.jsonl`` with its error and the rest still run; with ``--budget`` a step whose
estimate no longer fits is recorded as skipped. ``results.md`` and the PNG plots
(``render_results.py``) are rewritten after every part, so a run cut short keeps what it
measured. Output goes to files, never through a pipe (``tee`` with worker processes can hang).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

import _common
import render_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
USERS_EPOCH, USERS_SECONDS = 10_000, 7200  # the starting point: 2 h per epoch of ~10K images
# each part, in the order the parts run, and the result files it writes (besides its .md,
# .png and logs/PART.log)
PARTS = {"headline": ["train_esrgan.jsonl", "headline.jsonl"],
         "epoch": ["real_epoch.jsonl"],
         "fetch": ["fetch_host.jsonl", "fetch_profile.txt"],
         "loaders": ["loader_throughput.jsonl"],
         "tuning": ["loader_tuning.jsonl"],
         "compile": ["compile.jsonl"],
         "kernels": ["kernels.jsonl", "op_table.txt"],
         "train": ["train_throughput.jsonl"],
         "gan": ["gan_step.jsonl"],
         "batch": ["batch_sizes.jsonl"],
         "ttq": ["time_to_quality.jsonl"],
         "degradations": ["train_degradation.jsonl", "loader_degradation.jsonl"],
         "codecs": ["codec_compare.jsonl", "codec_loaders.jsonl"],
         "quality": ["model_quality.jsonl"]}
# codecs: CPU-side; quality: presets ranked already
GPU_PARTS = ("headline,epoch,fetch,loaders,tuning,compile,kernels,train,gan,batch,ttq,"
             "degradations")
STEP_TIMEOUT = 240  # s: a hung step costs at most this much of a GPU session
CODECS = [("jpeg", 90), ("jpeg", 95), ("jpeg", 100), ("png", 95), ("raw", 95)]
PRESETS = {
    # the users' setting: 512² JPEGs, 256² patches, esrgan at batch 32; 4000 images, as
    # loader rates do not depend on the database's size beyond a few thousand (the headline
    # is still the users' 10K-image epoch). ``est``: seconds each step is expected to take
    # with a GPU and 16 cores, what --budget plans with: as measured on the H100 runs
    # (benchmarks/results/h100-2026-11-27*: a 60 s estimate for `train` cut that step off at
    # 100 s; compile took 140 s at batch 32 and did not finish in 125 s at 64 on a fresh
    # machine), leaving each step some margin. ``codec_count``, in every preset: at least
    # (batches + 1) x batch images, so that each timed epoch holds --batches full batches
    # (the third session's 1,000-image raw database gave 14 batches for 15 workers, which
    # timed a batch's latency: loader_throughput.short_epoch).
    "full": {"count": 4000, "size": 512, "patch": 256, "batch": 64, "train_batch": 32,
             "steps": 30, "warmup": 10, "batches": 50, "codec_count": 3300, "photos": 48,
             "models": "fast,srcnn", "workers": "4,0", "cold": False,
             "timeout": STEP_TIMEOUT, "parts": GPU_PARTS,
             "batch_model": "esrgan", "batch_sizes": "8,16,32,64", "codecs": CODECS,
             "step_model": "esrgan",
             "quality_models": "srcnn,fast,light,esrgan", "quality_epochs": 30,
             "degradation_loaders": "dali,torch",
             # the H200 run (2026-11-28) found the stream hand-over no faster: host only
             "dali_outputs": "host",
             # DALI's default batches per pipeline run, and one a run as before it
             "dali_per_run": "0,1",
             "fetches": 20, "pause": 0.2,
             # one real epoch of the users' 10K images with srtrain's defaults
             "epoch_count": 10_000, "epoch_args": [],
             # the GAN stage's step: esrgan at the users' batch (train_batch), then smaller
             # batches for peak memory; Real-ESRGAN's discriminator width
             "gan_model": "esrgan", "gan_sizes": "8,16", "gan_args": [],
             # gan: the BasicSR-style step, srtrain's defaults and four switches each off
             # alone, three of them compiling the generator's blocks again (~15 s each)
             "est": {"db": 40, "headline": 130, "epoch": 200, "fetch": 75, "loaders": 70, "tuning": 50,
                     "kernels": 80, "tf32": 90, "compile": 100, "compile_fed": 120,
                     "compile_model": 160, "train": 110, "gan": 300, "gan_batch": 150,
                     "batch": 150, "ttq": 150,
                     "degradations": 200, "train_degradation": 130, "codecs": 60,
                     "quality": 200}},
    # the same images and patches on a few CPU cores, where esrgan trains at ~0.5 img/s:
    # few steps and small batches: ~11 minutes on 2 cores, ~6 more for the GAN step (est.)
    # and ~25 more for quality
    "cpu": {"count": 2000, "size": 512, "patch": 256, "batch": 32, "train_batch": 4,
            "steps": 6, "warmup": 1, "batches": 20, "codec_count": 700, "photos": 24,
            "models": "fast,srcnn", "workers": "1", "cold": True, "timeout": 2400,
            # the kernel switches act on CUDA only; DALI's knobs are GPU decoder ones
            "parts": "headline,fetch,loaders,train,gan,batch,ttq,degradations,codecs,quality",
            "batch_model": "fast", "batch_sizes": "1,2,4,8", "codecs": CODECS,
            "step_model": "esrgan",
            "quality_models": "srcnn,fast,light,esrgan", "quality_epochs": 30,
            "degradation_loaders": "dali,torch", "dali_outputs": "host",  # no CUDA stream
            "dali_per_run": "0,1",
            "fetches": 10, "pause": 1.0,  # DALI's CPU threads make the LR meanwhile
            # VGG19 and the discriminator at 256² dominate the GAN step on a CPU: the small
            # generator, the users' batch only
            "gan_model": "fast", "gan_sizes": None, "gan_args": [],
            "est": {"db": 120, "headline": 200, "fetch": 120, "loaders": 200, "kernels": 0,
                    "compile": 0, "train": 150, "gan": 400, "batch": 100, "ttq": 900,
                    "degradations": 300, "codecs": 150, "quality": 1500}},
    # tiny sizes: the suite end to end in a test, not a measurement
    "quick": {"count": 48, "size": 96, "patch": 48, "batch": 4, "train_batch": 2, "steps": 2,
              "warmup": 1, "batches": 3, "codec_count": 16, "photos": 4,
              "models": "srcnn", "workers": "1", "cold": True, "timeout": STEP_TIMEOUT,
              "parts": "headline,epoch,fetch,loaders,kernels,train,gan,batch,ttq,"
                       "degradations",
              "batch_model": "srcnn", "batch_sizes": "1,2", "codecs": [("jpeg", 95), ("raw", 95)],
              # the kernel switches' plumbing: esrgan's op table took a minute of CPU
              "step_model": "srcnn",
              "quality_models": "srcnn", "quality_epochs": 1,
              "degradation_loaders": "dali",  # three pipeline builds: the plumbing only
              "dali_outputs": "host", "dali_per_run": "0,1",
              "fetches": 2, "pause": 0.05,
              "epoch_count": 24, "epoch_args": ["--model", "srcnn", "--batch-size", 2],
              "gan_model": "srcnn", "gan_sizes": None, "gan_args": ["--d-num-feat", 8],
              "est": {"db": 5, "headline": 15, "epoch": 20, "fetch": 10, "loaders": 15, "kernels": 10,
                      "compile": 0, "train": 10, "gan": 15, "batch": 10, "ttq": 20,
                      "degradations": 15,
                      "train_degradation": 10,
                      "codecs": 10, "quality": 15}},
}
RESERVE = 10  # s of a budget kept for the last results.md
# time_to_quality.py's arguments per preset: the demo's 160 px crops; on a GPU esrgan with
# 128² final patches (sized to finish within one step's timeout), on a CPU the demo's model
# (~8 minutes on 2 cores), quick: a test
TIME_TO_QUALITY = {
    "full": ["--model", "esrgan", "--images", 480, "--epochs", 12, "--patch", 128,
             "--schedule", "64:0,96:4,128:8", "--batch-size", 16],
    "cpu": ["--model", "demo", "--images", 160, "--epochs", 24, "--patch", 64,
            "--schedule", "32:0,48:8,64:16", "--batch-size", 8],
    "quick": ["--model", "demo", "--images", 16, "--epochs", 2, "--patch", 32,
              "--schedule", "16:0,32:1", "--batch-size", 4],
}


def results_dir(root: Path, env: dict) -> Path:
    name = env.get("gpu") or f"cpu{env['cpus']}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return root / f"{slug}-{datetime.date.today().isoformat()}"


class Suite:
    def __init__(self, out: Path, work: Path, p: dict, budget: float | None = None):
        self.out, self.work, self.p, self.budget = out, work, p, budget
        self.log = out / "suite.jsonl"
        self.t0 = time.perf_counter()

    def left(self) -> float:
        """Seconds of the budget still to spend on steps (inf without a budget)."""
        if self.budget is None:
            return float("inf")
        return self.budget - RESERVE - (time.perf_counter() - self.t0)

    def fits(self, part: str, est: str, command: str) -> bool:
        """Whether the step's estimate fits in what is left; if not, record it as skipped."""
        need = self.p["est"].get(est, 0)
        if need <= self.left():
            return True
        _common.emit({"part": part, "ok": True, "skipped": f"budget: needs ~{need} s, "
                      f"{max(0, self.left()):.0f} s left", "command": command}, self.log)
        return False

    def run(self, part: str, *cmd, est: str | None = None, timeout: float | None = None) -> bool:
        """Run one step of a part as a process; record how it went, never raise.

        ``est``: the key of its time estimate (default: the part's); a step that would not
        fit in what is left of the budget is skipped, and no timeout outlasts the budget.
        ``timeout``: this step's own limit in seconds (default: the preset's).
        """
        command = " ".join(str(c) for c in cmd[1:])
        if not self.fits(part, est or part, command):
            return False
        t0 = time.perf_counter()
        logfile = self.out / "logs" / f"{part}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "a") as log:
            # its own process group: a timeout (or the suite's end) takes the step's loader
            # workers with it, so none goes on loading beside the next step
            proc = subprocess.Popen([str(c) for c in cmd], cwd=HERE, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1, min(timeout or self.p["timeout"], self.left())))
            except subprocess.TimeoutExpired:
                rc = "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # the step and all its workers are gone
                    pass
                proc.wait()
        ok = rc == 0
        _common.emit({"part": part, "ok": ok, "returncode": rc,
                      "seconds": round(time.perf_counter() - t0, 1), "command": command,
                      "log_tail": None if ok else logfile.read_text()[-1500:]}, self.log)
        return ok

    def db(self, count: int, codec: str = "jpeg", quality: int = 95) -> Path | None:
        """A database of ``count`` photos packed by the real packer (tools/pack_lmdb.py),
        made once per work folder and reused; None if it could not be made."""
        size = self.p["size"]
        photos = self.work / f"photos-{count}-{size}"
        db = self.work / f"db-{count}-{size}-{codec}-{quality}"
        if (db / "manifest.json").is_file():
            return db
        if not self.fits("db", "db", f"pack {db.name}"):
            return None
        done = photos.with_name(photos.name + ".done")  # beside the photos: the packer
        # would read a marker inside the folder as an image (and skip it as empty)
        if not done.is_file():
            _common.make_photos(photos, count, size, size)
            done.touch()
        ok = self.run("db", sys.executable, ROOT / "tools" / "pack_lmdb.py", photos, db,
                      "--size", size, "--min-size", self.p["patch"], "--codec", codec,
                      "--quality", quality, "--overwrite", "--quiet")
        return db if ok else None


def run_suite(s: Suite, parts: list[str], workers: int | None) -> None:
    p, out, py = s.p, s.out, sys.executable
    train_workers = ["--workers", workers] if workers else []
    loader_workers = p["workers"] if not workers else ",".join(
        str(w if w != "0" else workers) for w in p["workers"].split(","))
    train = ["--patch", p["patch"], "--steps", p["steps"], "--warmup", p["warmup"]]
    # esrgan's step alone on one pre-made batch: the rows that set srtrain's defaults
    alone = [py, "train_throughput.py", "--loaders", "synthetic", "--models",
             p["step_model"], "--batch-sizes", p["train_batch"], *train]
    needs_db = {"headline", "fetch", "loaders", "tuning", "compile", "train", "batch",
                "degradations"}
    db = s.db(p["count"]) if needs_db & set(parts) else None
    # the step fed from the database by a loader (used where db is not None)
    fed = [py, "train_throughput.py", "--db", db, *train, *train_workers]
    for part in parts:
        if db is None and part in needs_db:
            _common.emit({"part": part, "ok": True, "skipped": "no database (see the db step)",
                          "command": ""}, s.log)
        if part == "headline" and db:
            s.run("headline", *fed, "--models", "esrgan", "--loaders", "dali,torch",
                  "--batch-sizes", p["train_batch"], "--out", out / "train_esrgan.jsonl")
            headline(out)
        if part == "epoch":  # packs its own database: the users' count of images
            s.run("epoch", py, "real_epoch.py", "--work", s.work / "epoch", "--count",
                  p["epoch_count"], "--size", p["size"], "--patch", p["patch"],
                  "--out", out / "real_epoch.jsonl", "--md", out / "real_epoch.md", "--",
                  *train_workers, *p["epoch_args"], timeout=2 * p["timeout"])
        if part == "fetch" and db:
            s.run("fetch", py, "fetch_host.py", "--db", db, "--loaders", "dali,torch",
                  "--degradation", "nn,realesrgan", "--batch-sizes", p["train_batch"],
                  "--patch", p["patch"], "--workers", workers or 0, "--fetches", p["fetches"],
                  "--pause", p["pause"], "--per-run", p["dali_per_run"],
                  "--out", out / "fetch_host.jsonl",
                  "--md", out / "fetch_host.md", "--profile", out / "fetch_profile.txt")
        if part == "loaders" and db:
            s.run("loaders", py, "loader_throughput.py", "--db", db, "--loaders",
                  "dali,dali-roi,torch", "--batch-sizes", p["batch"], "--workers",
                  loader_workers, "--patch", p["patch"], "--batches", p["batches"],
                  "--cold" if p["cold"] else "--no-cold",
                  "--out", out / "loader_throughput.jsonl", "--md", out / "loader_throughput.md",
                  "--plot", out / "loader_throughput.png")
        if part == "tuning" and db:  # DALI's knobs for make_loader's default (ROI decode)
            cores = workers + 1 if workers else len(os.sched_getaffinity(0))
            s.run("tuning", py, "loader_throughput.py", "--db", db, "--loaders", "dali-roi",
                  "--batch-sizes", p["batch"], "--workers", workers or 0,
                  # six pipelines: twelve (two thread counts) outran the step's timeout
                  "--dali-threads", max(1, cores - 1),
                  "--hw-decoder-load", "0.65,0.9,1", "--prealloc", "off,on",
                  "--patch", p["patch"], "--batches", p["batches"], "--no-cold",
                  "--out", out / "loader_tuning.jsonl", "--md", out / "loader_tuning.md")
        if part == "compile":
            # blocks first: seconds to compile, where the whole model took 2 minutes
            s.run("compile", *alone, "--compile", "blocks", "--cuda-graphs", "off,on",
                  "--out", out / "compile.jsonl")
            if db:  # the compiled step fed: the epoch it gives
                s.run("compile", *fed, "--models", "esrgan", "--loaders", "dali",
                      "--batch-sizes", p["train_batch"], "--compile", "blocks",
                      "--cuda-graphs", faster_graphs(out / "compile.jsonl"),
                      "--out", out / "compile.jsonl", est="compile_fed")
            s.run("compile", *alone, "--compile", "model", "--out", out / "compile.jsonl",
                  est="compile_model")
        if part == "kernels":  # cudnn.benchmark and TF32 act on CUDA only; uncompiled, as
            # the profiler sees a CUDA graph as one op
            s.run("kernels", *alone, "--compile", "off", "--out", out / "kernels.jsonl",
                  "--cudnn-benchmark", "on,off", "--op-table", out / "op_table.txt")
            s.run("kernels", *alone, "--compile", "off", "--out", out / "kernels.jsonl",
                  "--amp", "off", "--tf32", "on,off", est="tf32")
        if part == "train" and db:
            s.run("train", *fed, "--models", p["models"], "--loaders", "dali,torch",
                  "--batch-sizes", p["train_batch"], "--dali-outputs", p["dali_outputs"],
                  "--dali-per-run", p["dali_per_run"], "--out", out / "train_throughput.jsonl")
        if part == "gan":  # the step alone: no database
            gan = [py, "train_throughput.py", "--stages", "gan", "--reference", "--models",
                   p["gan_model"], *train, *p["gan_args"], "--out", out / "gan_step.jsonl"]
            # the users' batch: the goal's rows (srtrain's defaults and the reference) first,
            # then each switch off alone; compiling four times needs more than one timeout
            s.run("gan", *gan, "--batch-sizes", p["train_batch"], "--ablate",
                  timeout=2 * p["timeout"])
            if p["gan_sizes"]:  # srtrain's defaults and the reference: peak memory by batch
                s.run("gan", *gan, "--batch-sizes", p["gan_sizes"], est="gan_batch")
        if part == "batch" and db:
            s.run("batch", *fed, "--models", p["batch_model"], "--loaders", "dali",
                  "--batch-sizes", p["batch_sizes"], "--out", out / "batch_sizes.jsonl",
                  "--md", out / "batch_sizes.md")
        if part == "ttq":
            s.run("ttq", py, "time_to_quality.py", *p["time_to_quality"],
                  "--out", out / "time_to_quality.jsonl", "--md", out / "time_to_quality.md",
                  "--plot", out / "time_to_quality.png")
        if part == "degradations" and db:
            # esrgan fed with each LR: what making it in the loader costs the step
            s.run("degradations", *fed, "--models", "esrgan", "--loaders",
                  p["degradation_loaders"], "--batch-sizes", p["train_batch"],
                  "--degradations", "nn,realesrgan",
                  "--out", out / "train_degradation.jsonl", est="train_degradation")
            # a fifth of the loaders part's batches: Real-ESRGAN's torch path is per sample
            s.run("degradations", py, "loader_throughput.py", "--db", db, "--loaders",
                  p["degradation_loaders"], "--batch-sizes", p["batch"], "--workers", workers or 0,
                  "--patch", p["patch"], "--batches", max(2, p["batches"] // 5), "--repeats", 2,
                  "--degradation", "nn,bicubic,realesrgan", "--no-cold",
                  "--out", out / "loader_degradation.jsonl",
                  "--md", out / "loader_degradation.md")
        if part == "codecs":
            s.run("codecs", py, "codec_compare.py", "--count", p["photos"], "--size", p["size"],
                  "--repeats", 3, "--out", out / "codec_compare.jsonl")
            for codec, q in p["codecs"]:
                cdb = s.db(p["codec_count"], codec, q)
                if cdb:
                    s.run("codecs", py, "loader_throughput.py", "--db", cdb, "--loaders",
                          "dali,torch", "--batch-sizes", p["batch"], "--workers", workers or 0,
                          "--patch", p["patch"], "--batches", p["batches"], "--no-cold",
                          "--out", out / "codec_loaders.jsonl")
        if part == "quality":
            s.run("quality", py, "model_quality.py", "--models", p["quality_models"],
                  "--epochs", p["quality_epochs"], "--out", out / "model_quality.jsonl",
                  "--md", out / "model_quality.md")
        render(out)  # each part's results on the page as soon as it is done


def faster_graphs(rows: Path) -> str:
    """``on`` where the compiled blocks ran faster with CUDA graphs than without, in the
    step-alone rows of ``rows``; ``off`` where they did not, or either row is missing."""
    rate = {}
    for line in rows.read_text().splitlines() if rows.is_file() else []:
        r = json.loads(line)
        if r.get("loader") == "synthetic" and r.get("compile") == "blocks":
            rate[bool(r.get("cuda_graphs"))] = r["synthetic_img_per_s"]
    return "on" if rate.get(True, 0) > rate.get(False, float("inf")) else "off"


def render(out: Path) -> None:
    """results.md and the plots from what is there now; a failure is printed, not raised."""
    try:
        render_results.render(out)
    except Exception:  # the measurements are on disk: a rendering bug must not lose the run
        traceback.print_exc()


def headline(out: Path) -> None:
    """Seconds per epoch of the users' 10K images for esrgan fed by each loader, and on
    synthetic data (the step alone: what a loader at no cost would give).

    The epoch is the users' whatever the size of the database measured: img/s does not
    depend on it, and the comparison is with their 2 h per epoch of ~10K images."""
    rows = [r for r in _common.read_lines(out / "train_esrgan.jsonl") if r["model"] == "esrgan"]
    if not rows:
        return
    fastest = max(rows, key=lambda r: r["synthetic_img_per_s"])
    rates = [(r, r["loader"], r["loader_img_per_s"]) for r in rows]
    for r, loader, rate in rates + [(fastest, "synthetic", fastest["synthetic_img_per_s"])]:
        seconds = USERS_EPOCH / rate
        _common.emit({"part": "headline", "model": "esrgan", "loader": loader,
                      "batch_size": r["batch_size"], "patch": r["patch"],
                      "img_per_s": rate, "images": USERS_EPOCH,
                      "seconds_per_epoch": round(seconds, 1),
                      "baseline_seconds_per_epoch": USERS_SECONDS,
                      "speedup": round(USERS_SECONDS / seconds, 2),
                      "baseline": "the users' original setup: 2 h per epoch of ~10K "
                                  "512² images, RRDBNet 64x23"}, out / "headline.jsonl")


def forget(out: Path, parts: list[str]) -> None:
    """Remove the earlier results of the parts about to run (their lines are appended)."""
    for part in parts:
        for name in PARTS[part]:
            (out / name).unlink(missing_ok=True)
    builds = {"db"} if set(parts) - {"quality", "ttq"} else set()  # the parts that pack
    kept = [r for r in _common.read_lines(out / "suite.jsonl")
            if r["part"] not in builds | set(parts)]
    (out / "suite.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def _parts(ctx, param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    parts = value.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise click.BadParameter(f"got {','.join(unknown)}, expected some of {','.join(PARTS)}")
    return [p for p in PARTS if p in parts]  # most valuable first, whatever the order given


def _codecs(ctx, param, value: str | None) -> list[tuple[str, int]] | None:
    if value is None:
        return None
    try:
        pairs = [(c, int(q)) for c, q in (item.split(":") for item in value.split(","))]
    except ValueError:
        raise click.BadParameter(f"got {value!r}, expected CODEC:QUALITY pairs such as "
                                 "raw:95,jpeg:90") from None
    known = sorted({c for c, _ in CODECS})
    bad = [c for c, _ in pairs if c not in known]
    if bad:
        raise click.BadParameter(f"got {','.join(bad)}, expected some of {','.join(known)}")
    return pairs


@click.command()
@click.option("--preset", type=click.Choice(list(PRESETS)), default="full", show_default=True,
              help="Sizes: full (a GPU and 16 cores), cpu (a few cores), quick (a test).")
@click.option("--quick", is_flag=True, help="Short for --preset quick.")
@click.option("--results", default=HERE / "results", type=click.Path(path_type=Path),
              help="Parent folder of the results folder.")
@click.option("--out", type=click.Path(path_type=Path),
              help="The results folder itself  [default: RESULTS/<gpu>-<date>]")
@click.option("--count", type=int, help="Images in the main database  [default: 4000]")
@click.option("--parts", callback=_parts,
              help=f"Run only these (of {','.join(PARTS)}); the results of the others stay "
                   f"as they are  [default: {GPU_PARTS}; every part with --preset cpu]")
@click.option("--codecs", callback=_codecs, metavar="CODEC:Q,...",
              help="The codecs part's databases  [default: jpeg:90,jpeg:95,jpeg:100,png:95,"
                   "raw:95]; raw:95 alone packs one database instead of five.")
@click.option("--budget", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Start no step whose estimate no longer fits in this wall time.")
@click.option("--workers", type=click.IntRange(min=1),
              help="The most CPU workers a loader gets  [default: all cores but one]; set it "
                   "to the CPU quota less one where a container sees more cores than it has.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the generated photos and databases here for the next run  "
                   "[default: a temporary folder]")
def main(preset, quick, results, out, count, parts, codecs, budget, workers, work):
    preset = "quick" if quick else preset
    p = dict(PRESETS[preset])
    if count:
        p["count"] = count
    if codecs:
        p["codecs"] = codecs
    p["time_to_quality"] = TIME_TO_QUALITY[preset]
    parts = parts or p["parts"].split(",")
    env = _common.environment() | _common.accelerator_environment()
    out = (out or results_dir(results, env)).resolve()  # the parts run in benchmarks/
    out.mkdir(parents=True, exist_ok=True)
    forget(out, parts)
    (out / "environment.json").write_text(json.dumps(
        env | {k: v for k, v in p.items() if k not in ("est", "parts")}
        | {"preset": preset, "parts": parts, "budget": budget, "max_workers": workers},
        indent=2))
    t0 = time.perf_counter()
    # a `timeout` around the suite: end like Ctrl-C, so the running step's group is killed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="srpipe-suite-") as tmp:
        work = (work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        run_suite(Suite(out, work, p, budget), parts, workers)
    steps = _common.read_lines(out / "suite.jsonl")
    failed = [r for r in steps if not r["ok"]]
    skipped = [r for r in steps if r.get("skipped")]
    print(f"suite finished in {time.perf_counter() - t0:.0f} s: {out} "
          f"({len(failed)} failed, {len(skipped)} skipped step(s))")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":  # spawned workers import this module as __mp_main__
    main()
