"""How fast `srdata pack` turns a folder of 1-2K px photos into a 512 px JPEG database,
with one worker and with all cores, and how close that is to linear scaling.

    python benchmarks/pack_throughput.py [--count 48] [--repeats 3] [--out FILE.jsonl]

One JSON line per worker count. Besides the wall time it reports where the time went: the
parent's LMDB writes (``writer_seconds``), the parent's and the workers' CPU time, and
the cost of starting and stopping a spawn pool that does nothing, which a short pack pays
in full.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click

import _common
from srdata import pack as srpack


def _noop(_=None):
    return os.getpid()


def pool_start_stop(workers: int) -> float:
    """Seconds to start a pool as pack does, have every worker answer once, and join it."""
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                             initializer=srpack._init_worker,
                             initargs=(os.getpid(), True)) as pool:
        # until every worker has answered: a pool is not started before its slowest is
        pids = set()
        while len(pids) < workers:
            pids.update(pool.map(_noop, range(workers * 4)))
    return time.perf_counter() - t0


def _cpu_seconds(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def pack_once(src: Path, dst: Path, cfg: srpack.PackConfig) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    # workers are joined inside pack(), so their CPU time lands in RUSAGE_CHILDREN
    parent0 = _cpu_seconds(resource.RUSAGE_SELF)
    children0 = _cpu_seconds(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    manifest = srpack.pack(src, dst, cfg, progress=False)
    wall = time.perf_counter() - t0
    return {"wall": wall, "stats": manifest["pack_stats"],
            "count": manifest["count"] + len(manifest["skipped"]),
            "parent_cpu": _cpu_seconds(resource.RUSAGE_SELF) - parent0,
            "workers_cpu": _cpu_seconds(resource.RUSAGE_CHILDREN) - children0}


def summarize(runs: list[dict]) -> dict:
    med = lambda f: round(statistics.median(f(r) for r in runs), 3)  # noqa: E731
    count, seconds = runs[0]["count"], statistics.median(r["wall"] for r in runs)
    writer = med(lambda r: r["stats"]["writer_seconds"])
    return {
        "images": count,
        "seconds_median": round(seconds, 3),
        "seconds_all": [round(r["wall"], 3) for r in runs],
        "images_per_s": round(count / seconds, 2),
        "pack_stats_seconds_median": med(lambda r: r["stats"]["seconds"]),
        "writer_seconds_median": writer,
        "writer_fraction": round(writer / seconds, 4),
        "parent_cpu_seconds_median": med(lambda r: r["parent_cpu"]),
        "workers_cpu_seconds_median": med(lambda r: r["workers_cpu"]),
        "workers_cpu_ms_per_image": round(1000 * med(lambda r: r["workers_cpu"]) / count, 1),
    }


@click.command()
@click.option("--count", default=48, show_default=True, help="Synthetic photos to generate.")
@click.option("--src", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Pack this folder instead of synthetic photos.")
@click.option("--size", default=512, show_default=True)
@click.option("--workers", "worker_counts", default="1,0", show_default=True,
              callback=_common.worker_counts,
              help="Comma-separated worker counts; 0 means all cores.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--warmup", default=1, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also append the JSON lines to this file.")
def main(count, src, size, worker_counts, repeats, warmup, out):
    env = _common.environment()
    cores = env["cpus"]
    counts = sorted({w or cores for w in worker_counts})
    with tempfile.TemporaryDirectory(prefix="srpipe-bench-") as tmp:
        tmp = Path(tmp)
        if src is None:
            src = tmp / "photos"
            _common.make_photos(src, count)
        configs = {w: srpack.PackConfig(size=size, min_size=min(size, 256), codec="jpeg",
                                        workers=w) for w in counts}
        runs = {w: [] for w in counts}
        # rounds interleave the worker counts: a shared VM drifts by 10-20% over a minute,
        # and a drift between two blocks of runs would show up as (in)efficiency
        for round_ in range(warmup + repeats):
            for workers, cfg in configs.items():
                run = pack_once(src, tmp / "db", cfg)
                if round_ >= warmup:  # warm-up: page cache, imports, first-run allocations
                    runs[workers].append(run)
        per_image = {}
        for workers, cfg in configs.items():
            result = summarize(runs[workers])
            startup, _ = _common.median_time(lambda: pool_start_stop(workers), repeats, 1)
            per_image[workers] = result["images_per_s"]
            base = per_image.get(1)
            _common.emit({
                "benchmark": "pack_throughput",
                "source": "synthetic" if src.parent == tmp else str(src),
                "size": size, "codec": "jpeg", "quality": cfg.quality,
                "subsampling": cfg.subsampling, "workers": workers,
                "repeats": repeats, "warmup": warmup,
                **result,
                "pool_start_stop_seconds_median": round(startup, 3),
                # (img/s with W workers) / (W x img/s with one): 1.0 is linear scaling
                "scaling_efficiency": round(result["images_per_s"] / (workers * base), 3)
                if base else None,
                "env": env,
            }, out)


if __name__ == "__main__":  # spawned pack workers import this module as __mp_main__
    main()
