"""One real epoch: pack ``--count`` photos, train one epoch with ``srtrain``'s defaults, and
time it from the command's start to its last step.

    python benchmarks/real_epoch.py --work DIR [--count 10000] [--size 512] \
        [--out F.jsonl] [--md F.md] [-- SRTRAIN OPTIONS]

The headline's "one epoch of 10K" is 10,000 ÷ the img/s of 20-30 timed steps; this runs the
epoch itself: ``srtrain --db DB --epochs 1`` as a user starts it (a fresh process: imports,
the loader's workers, the compile and the first CUDA graphs all count). Reported:
- ``train_s``: launch to the last step of the epoch (the last ``train`` record of
  metrics.jsonl, written after a device synchronisation);
- ``validation_s``: from there to the validation record; ``total_s``: to the process's end
  (the checkpoints written);
- the epoch's mean img/s and data wait from metrics.jsonl, its first window (the compile)
  apart, and 10,000 ÷ that steady img/s: the computed figure to set beside the timed one.
The photos and the database are made once in ``--work`` and reused.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

import _common

ROOT = Path(__file__).resolve().parent.parent
USERS_EPOCH = 10_000


def packed(work: Path, count: int, size: int, patch: int) -> tuple[Path, float]:
    """A database of ``count`` size² JPEG photos packed by tools/pack_lmdb.py; with the
    seconds the pack took (0 when an earlier run left it in ``work``)."""
    photos, db = work / f"photos-{count}-{size}", work / f"db-{count}-{size}-jpeg-95"
    if (db / "manifest.json").is_file():
        return db, 0.0
    done = photos.with_name(photos.name + ".done")  # beside the photos: the packer
    # would read a marker inside the folder as an image (and skip it as empty)
    if not done.is_file():
        _common.make_photos(photos, count, size, size)
        done.touch()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "tools" / "pack_lmdb.py"), str(photos), str(db),
                    "--size", str(size), "--min-size", str(patch), "--codec", "jpeg",
                    "--quality", "95", "--overwrite", "--quiet"], check=True)
    return db, time.perf_counter() - t0


def epoch_summary(metrics: Path, t0: float, t_end: float) -> dict:
    """The timings and rates of a one-epoch run, from its metrics.jsonl (times are epoch
    seconds; ``t0`` the launch, ``t_end`` the process's end)."""
    events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [e for e in events if e.get("event") == "train"]
    val = [e for e in events if e.get("event") == "val"]
    if not train:
        raise click.ClickException(f"{metrics} has no train records: the run made no step")
    steady = train[1:] or train  # the first window holds the compile and the workers' start
    rate = sum(e["img_per_s"] for e in steady) / len(steady)
    return {"steps": train[-1]["step"], "train_s": round(train[-1]["time"] - t0, 1),
            "validation_s": round(val[-1]["time"] - train[-1]["time"], 1) if val else None,
            "total_s": round(t_end - t0, 1),
            "first_window_s": round(train[0]["time"] - t0, 1),
            "steady_img_per_s": round(rate, 1),
            "data_wait_pct": round(sum(e["data_wait_pct"] for e in steady) / len(steady), 1),
            "computed_epoch_s": round(USERS_EPOCH / rate, 1),
            "gpu_mem_gb": train[-1].get("gpu_mem_gb"),
            "val_psnr": val[-1].get("psnr") if val else None}


def render_markdown(r: dict) -> str:
    return "\n".join([
        "| images | steps | launch → last step | of which to the first log (compile) | "
        "validation | whole command | steady img/s | data wait | 10K ÷ steady img/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['count']:,} | {r['steps']} | **{r['train_s']} s** | {r['first_window_s']} s | "
        f"{r['validation_s']} s | {r['total_s']} s | {r['steady_img_per_s']:,.1f} | "
        f"{r['data_wait_pct']}% | {r['computed_epoch_s']} s |", "",
        f"`{r['command']}`; {r['env'].get('gpu') or 'no GPU'}, {r['env']['cpus']} CPUs, torch "
        f"{r['env']['torch']}, DALI {r['env'].get('dali')}, {r['env']['date'][:10]}."]) + "\n"


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--work", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the photos, the database and the run (kept for reruns).")
@click.option("--count", default=USERS_EPOCH, show_default=True, type=click.IntRange(min=2))
@click.option("--size", default=512, show_default=True, type=click.IntRange(min=16))
@click.option("--patch", default=256, show_default=True, type=click.IntRange(min=8))
@click.option("--timeout", default=1800, show_default=True, type=click.IntRange(min=1),
              help="Seconds before the training command is stopped.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also append the JSON line here.")
@click.option("--md", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a markdown table here.")
@click.argument("srtrain_args", nargs=-1, type=click.UNPROCESSED)
def main(work, count, size, patch, timeout, out, md, srtrain_args):
    work.mkdir(parents=True, exist_ok=True)
    db, pack_s = packed(work, count, size, patch)
    run = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh run each time, never a resume
    cmd = ["srtrain", "--db", str(db), "--out", str(run), "--epochs", "1", "--patch",
           str(patch), "--quiet", *srtrain_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "srtrain", *cmd[1:]], env=env, cwd=ROOT,
                          timeout=timeout)
    t_end = time.time()
    if proc.returncode:
        raise click.ClickException(f"srtrain exited {proc.returncode}: {' '.join(cmd)}")
    rec = {"benchmark": "real_epoch", "count": count, "size": size, "patch": patch,
           "pack_s": round(pack_s, 1), "command": " ".join(cmd),
           **epoch_summary(run / "metrics.jsonl", t0, t_end),
           "env": _common.environment() | _common.accelerator_environment()}
    _common.emit(rec, out)
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(render_markdown(rec))


if __name__ == "__main__":
    main()
