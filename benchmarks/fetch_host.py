"""The host's own time in one fetch of a batch, when the loader is ahead of the step.

    python benchmarks/fetch_host.py --db DB [--loaders dali,torch] [--batch-sizes 32] \
        [--degradation nn,realesrgan] [--workers 0] [--per-run 0,1] [--pause 0.2] \
        [--fetches 20] [--out F.jsonl] [--md F.md] [--profile F.txt]

A training step replayed from CUDA graphs leaves the host little to do, so whatever the
host spends fetching the next batch the GPU spends idle (the fifth GPU session: DALI 2.3 ms
a batch, ``torch`` 0.4-0.7 ms; ``srcnn`` fed by DALI lost 26% of its 8 ms step). Before
each fetch this waits ``--pause`` seconds, for the workers and the pipeline to get ahead,
then times ``next()``: what is left is the main thread's own work (receiving the workers'
batch, feeding DALI, handing the outputs over as tensors), not the decode. Mean, median and
90th percentile of ``--fetches`` fetches after ``--warmup``, and apart the median of those
that began an epoch; one JSON line per configuration. DALI making several training
batches a run (``--per-run``, a comma list: 0 is the loader's default) puts the run's cost
on its first batch only: the mean per batch is the figure to compare then.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time

import click

import _common

LOADERS = ("dali", "torch")


def fetch_times(loader, fetches: int, warmup: int, pause: float,
                profiler=None, starts: list | None = None) -> list[float]:
    """Seconds of each timed ``next()``, each after ``pause`` seconds of letting the loader
    get ahead (epochs are chained: a small database still gives every fetch).
    ``profiler`` (a ``cProfile.Profile``): on during the timed fetches only. ``starts``:
    where given, also gets the seconds of the timed fetches that began an epoch."""
    import torch

    from srtrain.timing import forever
    cuda = loader.device.type == "cuda"
    it, times = forever(loader), []
    for i in range(warmup + fetches):
        if cuda:
            torch.cuda.synchronize(loader.device)
        time.sleep(pause)
        timed = i >= warmup
        if timed and profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        next(it)
        if timed:
            times.append(time.perf_counter() - t0)
            if profiler is not None:
                profiler.disable()
            if starts is not None and loader.batch == 1:  # the epoch's first batch
                starts.append(times[-1])
    return times


def write_profile(profiler, path: str, title: str, rows: int = 30) -> None:
    """Append the profiled fetches' functions, by own time and by cumulative time."""
    import io
    import pstats
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    for order in ("tottime", "cumulative"):
        stats.sort_stats(order).print_stats(rows)
    with open(path, "a") as f:
        f.write(f"## {title}\n\n{text.getvalue()}\n")


def p90(sorted_times: list[float]) -> float:
    """The nearest-rank 90th percentile: never below the median, whatever the count (the
    index floor(0.9 (n - 1)) gave the fastest of 2 fetches, under their median)."""
    return sorted_times[math.ceil(0.9 * len(sorted_times)) - 1]


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_markdown(records: list[dict]) -> str:
    rows = ["| loader | codec | LR | out | batch | batches a run | workers | host ms per fetch "
            "(mean) | median | p90 | an epoch's first |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {r['loader']} | {r['codec']} | {r['degradation']} | "
             f"{r.get('dtype', 'uint8')} | {r['batch_size']} | {r.get('per_run') or '-'} | "
             f"{r['workers']} | {_ms(r.get('fetch_ms_mean'))} | {r['fetch_ms']:.2f} | "
             f"{r['fetch_ms_p90']:.2f} | {_ms(r.get('epoch_start_ms'))} |" for r in records]
    env = records[0]["env"] if records else {}
    rows += ["", f"{env.get('gpu') or 'no GPU'}, {env.get('cpus')} CPUs, torch "
             f"{env.get('torch')}, DALI {env.get('dali')}, {str(env.get('date'))[:10]}; "
             f"each fetch after a {records[0]['pause_s'] if records else '-'} s pause."]
    return "\n".join(rows) + "\n"


@click.command()
@click.option("--db", type=click.Path(exists=True, file_okay=False), required=True,
              help="A database (srpipe or BasicSR LMDB).")
@click.option("--loaders", default="dali,torch", show_default=True,
              callback=lambda c, p, v: _common.some_of(v, LOADERS))
@click.option("--batch-sizes", default="32", show_default=True, callback=_common.batch_sizes)
@click.option("--degradation", default="nn", show_default=True,
              callback=_common.degradations, help="How LR is made (comma-separated).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="CPU workers per loader; 0 means all cores but one.")
@click.option("--per-run", default="0", show_default=True,
              callback=lambda c, p, v: _common.numbers(v),
              help="DALI: training batches per pipeline run (DaliTuning.batches_per_run; "
                   "0: the loader's default; a comma list, one configuration each).")
@click.option("--patch", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--scale", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default=None, help="cuda or cpu  [default: cuda if present]")
@click.option("--dtype", default="uint8", show_default=True,
              type=click.Choice(["uint8", "float32", "bfloat16"]),
              help="The loader's output: uint8 leaves the float conversion to the step, as "
                   "on a GPU; float32 is what srtrain asks for on a CPU.")
@click.option("--pause", default=0.2, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to let the loader get ahead before each fetch.")
@click.option("--fetches", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--out", type=click.Path(dir_okay=False), help="Also append the JSON lines here.")
@click.option("--md", type=click.Path(dir_okay=False), help="Write a markdown table here.")
@click.option("--profile", type=click.Path(dir_okay=False),
              help="Append cProfile's view of the timed fetches (the main thread's functions "
                   "by own and cumulative time) per configuration to this file.")
def main(db, loaders, batch_sizes, degradation, workers, per_run, patch, scale, device, dtype,
         pause, fetches, warmup, out, md, profile):
    import cProfile

    import torch

    import srdata
    from srdata.reader import open_db
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opened = open_db(db)
    env = _common.environment() | _common.accelerator_environment()
    records, seen = [], set()
    for name, deg, batch, runs in itertools.product(loaders, degradation, batch_sizes, per_run):
        if name != "dali" and runs != per_run[0]:
            continue  # one row: the option is DALI's
        tuning = srdata.DaliTuning(batches_per_run=runs or None) if name == "dali" else None
        # one row per batches a run resolved: 0 (the default) may be one of the numbers given
        key = (name, deg, batch, tuning and tuning.per_run(batch, dev.type == "cuda"))
        if key in seen:
            continue
        seen.add(key)
        lo = srdata.make_loader(opened, name, batch_size=batch, patch_size=patch,
                                scale=scale, workers=workers or None, device=dev,
                                dtype=getattr(torch, dtype), degradation=deg, dali=tuning)
        prof, starts = cProfile.Profile() if profile else None, []
        times = sorted(fetch_times(lo, fetches, warmup, pause, prof, starts))
        used = lo.workers  # make_loader's default where --workers is 0
        made = getattr(lo, "per_run", None)  # DALI: training batches a run
        del lo
        if prof is not None:
            write_profile(prof, profile, f"{name}, {deg} LR, batch {batch}, {used} workers, "
                          f"{made or 1} batch(es) a run, {dev.type}: {fetches} fetches")
        rec = {"benchmark": "fetch_host", "source": str(db), "codec": opened.codec,
               "loader": name, "degradation": deg, "batch_size": batch,
               "workers": used, "dtype": dtype, "per_run": made,
               "patch": patch, "scale": scale, "device": dev.type, "pause_s": pause,
               "fetches": fetches,
               "fetch_ms_mean": round(statistics.mean(times) * 1e3, 3),
               "fetch_ms": round(statistics.median(times) * 1e3, 3),
               "fetch_ms_p90": round(p90(times) * 1e3, 3),
               # an epoch's first fetch: where a pipeline that ends its epochs starts empty
               "epoch_start_ms": round(statistics.median(starts) * 1e3, 3) if starts else None,
               "env": env}
        _common.emit(rec, out)
        records.append(rec)
    if md:
        with open(md, "w") as f:
            f.write(render_markdown(records))


if __name__ == "__main__":
    main()
