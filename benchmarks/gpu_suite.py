"""The whole benchmark suite in one command, for a GPU machine (≤ 6 minutes with 16 cores).

    python benchmarks/gpu_suite.py                 # full: 10K x 512² JPEG q95, as users train
    python benchmarks/gpu_suite.py --preset cpu    # the same parts sized for a few CPU cores
    python benchmarks/gpu_suite.py --quick         # tiny sizes: checks the suite end to end

Writes ``benchmarks/results/<gpu>-<date>/`` (``cpu<N>-<date>`` without a GPU):

1. ``db``: a COUNT-image 512² JPEG q95 database, packed by ``tools/pack_lmdb.py``;
2. ``loaders``: loader throughput (dali, dali ROI decode, torch; 4 workers and all cores);
3. ``train``: train throughput for esrgan, fast and srcnn, synthetic and with each loader;
   ``batch``: one model's img/s and peak memory over a range of batch sizes;
4. ``codecs``: jpeg q90/q95/q100, png, raw: bytes and PSNR, and DALI and torch img/s;
5. ``quality``: each model preset's validation PSNR over bicubic after the demo's training;
6. ``headline``: seconds per epoch of the users' 10K images with the full esrgan model;
7. ``ttq``: time to quality, validation PSNR against wall time for a fixed patch, a
   progressive patch schedule and ``--sample-ratio 0.3`` (esrgan on a GPU).

Each part runs as its own process and writes JSON lines; a part that fails is recorded in
``suite.jsonl`` with its error and the others still run. ``render_results.py`` then turns
the folder into ``results.md`` and PNG plots. Output goes to files, never through a pipe
(``tee`` with worker processes can hang).
"""
from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

import _common

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
USERS_EPOCH, USERS_SECONDS = 10_000, 7200  # the starting point: 2 h per epoch of ~10K images
# each part and the result files it writes (besides its .md, .png and logs/PART.log)
PARTS = {"loaders": ["loader_throughput.jsonl"], "train": ["train_throughput.jsonl"],
         "batch": ["batch_sizes.jsonl"], "codecs": ["codec_compare.jsonl", "codec_loaders.jsonl"],
         "quality": ["model_quality.jsonl"], "headline": ["headline.jsonl"],
         "ttq": ["time_to_quality.jsonl"]}
CODECS = [("jpeg", 90), ("jpeg", 95), ("jpeg", 100), ("png", 95), ("raw", 95)]
PRESETS = {
    # the users' setting: 10K 512² JPEGs, 256² patches, esrgan at batch 32
    "full": {"count": 10_000, "size": 512, "patch": 256, "batch": 64, "train_batch": 32,
             "steps": 30, "warmup": 10, "batches": 50, "codec_count": 1000, "photos": 48,
             "models": "esrgan,fast,srcnn", "workers": "4,0", "timeout": 900,
             "batch_model": "esrgan", "batch_sizes": "8,16,32,64", "codecs": CODECS,
             "quality_models": "srcnn,fast,light,esrgan", "quality_epochs": 30},
    # the same images and patches on a few CPU cores, where esrgan trains at ~0.5 img/s:
    # few steps and small batches: ~11 minutes on 2 cores, and ~25 more for quality
    "cpu": {"count": 2000, "size": 512, "patch": 256, "batch": 32, "train_batch": 4,
            "steps": 6, "warmup": 1, "batches": 20, "codec_count": 300, "photos": 24,
            "models": "esrgan,fast,srcnn", "workers": "1", "timeout": 2400,
            "batch_model": "fast", "batch_sizes": "1,2,4,8", "codecs": CODECS,
            "quality_models": "srcnn,fast,light,esrgan", "quality_epochs": 30},
    # tiny sizes: the suite end to end in a test, not a measurement
    "quick": {"count": 48, "size": 96, "patch": 48, "batch": 4, "train_batch": 2, "steps": 2,
              "warmup": 1, "batches": 3, "codec_count": 12, "photos": 4,
              "models": "esrgan,srcnn", "workers": "1", "timeout": 300,
              "batch_model": "srcnn", "batch_sizes": "1,2", "codecs": [("jpeg", 95), ("raw", 95)],
              "quality_models": "srcnn", "quality_epochs": 1},
}


# time_to_quality.py's arguments per preset: the demo's 160 px crops; on a GPU esrgan with
# 128² final patches, on a CPU the demo's model (~8 minutes on 2 cores), quick: a test
TIME_TO_QUALITY = {
    "full": ["--model", "esrgan", "--images", 800, "--epochs", 20, "--patch", 128,
             "--schedule", "64:0,96:7,128:14", "--batch-size", 16],
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
    def __init__(self, out: Path, work: Path, p: dict):
        self.out, self.work, self.p = out, work, p
        self.log = out / "suite.jsonl"

    def run(self, part: str, *cmd, timeout: int | None = None) -> bool:
        """Run one step of a part as a process; record how it went, never raise."""
        t0 = time.perf_counter()
        logfile = self.out / "logs" / f"{part}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "a") as log:
            try:
                rc = subprocess.run([str(c) for c in cmd], cwd=HERE, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=timeout or
                                    self.p["timeout"]).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        ok = rc == 0
        _common.emit({"part": part, "ok": ok, "returncode": rc,
                      "seconds": round(time.perf_counter() - t0, 1),
                      "command": " ".join(str(c) for c in cmd[1:]),
                      "log_tail": None if ok else logfile.read_text()[-1500:]}, self.log)
        return ok

    def db(self, name: str, count: int, codec: str = "jpeg", quality: int = 95) -> Path:
        """A database of ``count`` photos packed by the real packer (tools/pack_lmdb.py)."""
        photos = self.work / f"photos-{count}"
        if not photos.is_dir():
            _common.make_photos(photos, count, self.p["size"], self.p["size"])
        db = self.work / name
        if not (db / "manifest.json").is_file():
            self.run("db", sys.executable, ROOT / "tools" / "pack_lmdb.py", photos, db,
                     "--size", self.p["size"], "--min-size", self.p["patch"], "--codec",
                     codec, "--quality", quality, "--overwrite", "--quiet")
        return db


def run_suite(out: Path, work: Path, p: dict, parts: list[str]) -> None:
    s = Suite(out, work, p)
    py = sys.executable
    db = s.db("db", p["count"]) if {"loaders", "train", "batch"} & set(parts) else None
    if "loaders" in parts:
        s.run("loaders", py, "loader_throughput.py", "--db", db, "--loaders",
              "dali,dali-roi,torch", "--batch-sizes", p["batch"], "--workers", p["workers"],
              "--patch", p["patch"], "--batches", p["batches"],
              "--out", out / "loader_throughput.jsonl", "--md", out / "loader_throughput.md",
              "--plot", out / "loader_throughput.png")
    if "train" in parts:
        s.run("train", py, "train_throughput.py", "--db", db, "--models", p["models"],
              "--loaders", "dali,torch", "--batch-sizes", p["train_batch"], "--patch",
              p["patch"], "--steps", p["steps"], "--warmup", p["warmup"],
              "--out", out / "train_throughput.jsonl", "--md", out / "train_throughput.md")
    if "batch" in parts:
        s.run("batch", py, "train_throughput.py", "--db", db, "--models", p["batch_model"],
              "--loaders", "dali", "--batch-sizes", p["batch_sizes"], "--patch", p["patch"],
              "--steps", p["steps"], "--warmup", p["warmup"],
              "--out", out / "batch_sizes.jsonl", "--md", out / "batch_sizes.md")
    if "codecs" in parts:
        s.run("codecs", py, "codec_compare.py", "--count", p["photos"], "--size", p["size"],
              "--repeats", 3, "--out", out / "codec_compare.jsonl")
        for codec, q in p["codecs"]:
            cdb = s.db(f"db-{codec}-{q}", p["codec_count"], codec, q)
            s.run("codecs", py, "loader_throughput.py", "--db", cdb, "--loaders", "dali,torch",
                  "--batch-sizes", p["batch"], "--workers", "0", "--patch", p["patch"],
                  "--batches", p["batches"], "--no-cold",
                  "--out", out / "codec_loaders.jsonl")
    if "quality" in parts:
        s.run("quality", py, "model_quality.py", "--models", p["quality_models"], "--epochs",
              p["quality_epochs"], "--out", out / "model_quality.jsonl",
              "--md", out / "model_quality.md")
    if "headline" in parts:
        headline(out)
    if "ttq" in parts:
        s.run("ttq", py, "time_to_quality.py", *p["time_to_quality"],
              "--out", out / "time_to_quality.jsonl", "--md", out / "time_to_quality.md",
              "--plot", out / "time_to_quality.png")


def headline(out: Path) -> None:
    """Seconds per epoch of the users' 10K images for esrgan fed by each loader.

    The epoch is the users' whatever the size of the database measured: img/s does not
    depend on it, and the comparison is with their 2 h per epoch of ~10K images."""
    for r in _common.read_lines(out / "train_throughput.jsonl"):
        if r["model"] == "esrgan":
            seconds = USERS_EPOCH / r["loader_img_per_s"]
            _common.emit({"part": "headline", "model": "esrgan", "loader": r["loader"],
                          "batch_size": r["batch_size"], "patch": r["patch"],
                          "img_per_s": r["loader_img_per_s"], "images": USERS_EPOCH,
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
    builds = {"db"} if set(parts) - {"quality", "headline", "ttq"} else set()  # the parts that pack
    kept = [r for r in _common.read_lines(out / "suite.jsonl")
            if r["part"] not in builds | set(parts)]
    (out / "suite.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def _parts(ctx, param, value: str) -> list[str]:
    parts = value.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise click.BadParameter(f"got {','.join(unknown)}, expected some of {','.join(PARTS)}")
    return parts


@click.command()
@click.option("--preset", type=click.Choice(list(PRESETS)), default="full", show_default=True,
              help="Sizes: full (a GPU and 16 cores), cpu (a few cores), quick (a test).")
@click.option("--quick", is_flag=True, help="Short for --preset quick.")
@click.option("--results", default=HERE / "results", type=click.Path(path_type=Path),
              help="Parent folder of the results folder.")
@click.option("--out", type=click.Path(path_type=Path),
              help="The results folder itself  [default: RESULTS/<gpu>-<date>]")
@click.option("--count", type=int, help="Images in the main database  [default: 10000]")
@click.option("--parts", default=",".join(PARTS), show_default=True, callback=_parts,
              help="Run only these; the results of the others stay as they are.")
def main(preset, quick, results, out, count, parts):
    preset = "quick" if quick else preset
    p = dict(PRESETS[preset])
    if count:
        p["count"] = count
    p["time_to_quality"] = TIME_TO_QUALITY[preset]
    env = _common.environment() | _common.accelerator_environment()
    out = (out or results_dir(results, env)).resolve()  # the parts run in benchmarks/
    out.mkdir(parents=True, exist_ok=True)
    forget(out, parts)
    (out / "environment.json").write_text(json.dumps(env | {"preset": preset, **p}, indent=2))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="srpipe-suite-") as work:
        run_suite(out, Path(work), p, parts)
    subprocess.run([sys.executable, HERE / "render_results.py", out], check=False)
    failed = [r for r in _common.read_lines(out / "suite.jsonl") if not r["ok"]]
    print(f"suite finished in {time.perf_counter() - t0:.0f} s: {out} "
          f"({len(failed)} failed step(s))")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":  # spawned workers import this module as __mp_main__
    main()
