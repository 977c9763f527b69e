"""How many (LR, HR) training pairs per second each loader delivers to the device.

    python benchmarks/loader_throughput.py [--db DB | --count 10000] \
        [--loaders dali,dali-roi,torch] [--batch-sizes 32,64] [--workers 4,0] \
        [--crc on,off] [--degradation nn,bicubic,realesrgan] [--out F.jsonl] [--md F.md] \
        [--plot F.png]

Without ``--db`` it builds, with the real packer, a database of COUNT 512x512 photo-like
JPEG q95 images (the users' setting). Each configuration (loader x batch size x CPU
workers, 0 meaning all cores but one) runs epochs of exactly ``--batches`` batches (a
``sample_ratio`` of the database; fewer in a smaller one, with a warning where that leaves
under two batches per worker, as then the time is one batch's latency rather than a rate),
so a pass never breaks off mid-epoch: one warm-up epoch
(workers start, decoders allocate), then ``--repeats`` timed epochs, synchronised on the
GPU; img/s is the median epoch's. One JSON line per configuration. ``--crc on,off`` adds
rows with the per-read crc32 check switched off, to measure what it costs (``crc`` field).
``--degradation`` measures each way of making the LR (``degradation`` field): torch makes it
on the device after the batch arrives, DALI in its graph.

The first batch of every epoch is left out of the timing (it holds the workers' start-up
on a fresh loader; ``startup_s`` reports that). Then a cold/warm pair for the first loader
at the largest budget: a fresh loader's first epoch after the database was dropped from the
page cache (``srdata warm --evict``) and after it was read in (``srdata warm``).
"""
from __future__ import annotations

import copy
import itertools
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import click

import _common
from srdata import warm
from srdata.reader import open_db

LOADERS = {  # name -> (loader, DaliTuning's roi_decode)
    "dali": ("dali", False),
    "dali-roi": ("dali", True),
    "torch": ("torch", None),
}


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_seconds(loader) -> tuple[float, float, int]:
    """(seconds to the first batch, seconds for the rest, images after the first batch)
    for one whole epoch, the device's work included."""
    t0 = time.perf_counter()
    first, n = None, 0
    for lr, hr in loader:
        if first is None:
            _sync(loader.device)
            first, t1 = time.perf_counter() - t0, time.perf_counter()
        else:
            n += hr.shape[0]
    _sync(loader.device)
    return first, time.perf_counter() - t1, n


def build_loader(db, name, batch_size, workers, args, degradation="nn", tuning=None):
    import srdata
    # + 1: the first batch of an epoch is not timed (see epoch_seconds)
    ratio = min(1.0, (args["batches"] + 1) * batch_size / len(db))
    loader, roi = LOADERS[name]
    dali = None if loader == "torch" else srdata.DaliTuning(
        roi_decode=roi, threads=(tuning or {}).get("dali_threads"),
        hw_decoder_load=(tuning or {}).get("hw_decoder_load"),
        decoder_hints=(tuning or {}).get("decoder_hints"))
    return srdata.make_loader(db, loader, batch_size=batch_size, patch_size=args["patch"],
                              scale=args["scale"], sample_ratio=ratio, workers=workers,
                              dtype=args["dtype"], device=args["device"],
                              degradation=degradation, dali=dali)


def measure(db, name, batch_size, workers, args, degradation="nn", tuning=None) -> dict:
    lo = build_loader(db, name, batch_size, workers, args, degradation, tuning)
    startup, _, _ = epoch_seconds(lo)  # warm-up: workers start, decoders allocate
    runs = [epoch_seconds(lo) for _ in range(args["repeats"])]
    rates = [n / t for _, t, n in runs]
    timed = runs[0][2] // batch_size
    if timed < 2 * workers:
        warnings.warn(short_epoch(timed, workers, len(db), batch_size, args["batches"]))
    return {"images_per_epoch": runs[0][2] + batch_size, "timed_batches": timed,
            "images_per_s": round(statistics.median(rates), 1),
            "images_per_s_all": [round(r, 1) for r in rates],
            "startup_s": round(startup, 3)}


def short_epoch(timed: int, workers: int, images: int, batch_size: int, batches: int) -> str:
    """Why a rate timed over fewer batches than twice the workers misleads, and the fix.

    Each worker then makes one batch or two of the epoch, all at once: the epoch's time is
    about one batch's latency, not the loader's rate (the third H100 session's raw rows,
    14 batches for 15 workers, spread from 23,395 to 48,241 img/s)."""
    need = (max(batches, 2 * workers) + 1) * batch_size
    return (f"timed {timed} batches with {workers} workers: that measures a batch's latency "
            f"more than the rate; give --batches {2 * workers} or more"
            + (f" and a database of at least {need} images (it holds {images})"
               if images < need else ""))


def cold_warm(db, name, batch_size, workers, args) -> dict:
    """A fresh loader's first epoch after the first batch, from a cold and a warm cache."""
    out = {}
    for state in ("cold", "warm"):
        warm.evict(db) if state == "cold" else warm.warm(db, progress=False)
        lo = build_loader(db, name, batch_size, workers, args)
        _, seconds, n = epoch_seconds(lo)
        out[f"first_epoch_{state}_images_per_s"] = round(n / seconds, 1)
        del lo
    return out


def crc_cost(db, repeats: int) -> dict:
    """One thread, records in memory: the crc32 every read checks against a full decode,
    a steadier measure of its share than two loader runs on a busy machine."""
    from srdata import format as fmt
    n = min(len(db), 200)
    values = [db.read(i) for i in range(n)]
    shapes = [(int(db.heights[i]), int(db.widths[i]), 3) for i in range(n)]
    crc, _ = _common.median_time(lambda: [fmt.crc32(v) for v in values], repeats)
    dec, _ = _common.median_time(lambda: [fmt.decode_image(v, db.codec, s)
                                          for v, s in zip(values, shapes)], repeats)
    return {"records": n, "bytes_per_record": round(sum(map(len, values)) / n),
            "crc_ms_per_record": round(crc / n * 1e3, 4),
            "decode_ms_per_record": round(dec / n * 1e3, 3),
            "crc_share_of_decode": round(crc / dec, 4)}


def _seconds(value) -> str:
    # a fresh loader's wait for its first batch: workers starting, a pipeline building
    return "-" if value is None else f"{value:.1f} s"


def render_markdown(records: list[dict]) -> str:
    rows = [r for r in records if r.get("kind") == "throughput"]
    def key(r):
        return r["batch_size"], r["workers"], r.get("crc", True), r.get("degradation", "nn")

    torch_rate = {key(r): r["images_per_s"] for r in rows if r["loader"] == "torch"}
    nn_rate = {(r["loader"], *key(r)[:3]): r["images_per_s"] for r in rows
               if r.get("degradation", "nn") == "nn"}
    lines = ["| loader | batch | CPU workers | crc32 check | LR | img/s | x torch (same batch, "
             "workers, check, LR) | x nn LR | first batch |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        base = torch_rate.get(key(r))
        ratio = f"{r['images_per_s'] / base:.2f}" if base else "-"
        nn = nn_rate.get((r["loader"], *key(r)[:3]))
        vs_nn = f"{r['images_per_s'] / nn:.2f}" if nn else "-"
        tuned = "".join(f", {k} {v}" for k, v in r.get("tuning", {}).items())
        lines.append(f"| {r['loader']}{tuned} | {r['batch_size']} | {r['workers']} | "
                     f"{'on' if r.get('crc', True) else 'off'} | {r.get('degradation', 'nn')} | "
                     f"{r['images_per_s']:,.0f} | {ratio} | {vs_nn} | "
                     f"{_seconds(r.get('startup_s'))} |")
    for r in records:
        if r.get("kind") == "crc_cost":
            lines.append(f"\ncrc32 check per read: {r['crc_ms_per_record']:.3f} ms per "
                         f"{r['bytes_per_record'] / 1e3:,.0f} KB record, "
                         f"{r['crc_share_of_decode']:.1%} of its decode "
                         f"({r['decode_ms_per_record']:.2f} ms, one thread).")
        if r.get("kind") == "cold_warm":
            lines.append(f"\nFirst epoch of a fresh `{r['loader']}` loader (batch "
                         f"{r['batch_size']}, {r['workers']} workers): "
                         f"cold page cache {r['first_epoch_cold_images_per_s']:,.0f} img/s, "
                         f"warm {r['first_epoch_warm_images_per_s']:,.0f} img/s.")
    env = records[0]["env"]
    lines.append(f"\n{env.get('gpu') or 'no GPU'}, {env['cpus']} CPUs ({env['cpu_model']}), "
                 f"torch {env['torch']}, DALI {env.get('dali')}, {env['date'][:10]}; "
                 f"{records[0]['db_images']:,} x {records[0]['codec']} records, patch "
                 f"{records[0]['patch']}, scale {records[0]['scale']}.")
    return "\n".join(lines) + "\n"


def render_plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.get("kind") == "throughput" and r.get("crc", True)]
    if len({r.get("degradation", "nn") for r in rows}) > 1:  # one bar per loader x LR
        rows = [r | {"loader": f"{r['loader']} {r['degradation']}"} for r in rows]
    batches = sorted({r["batch_size"] for r in rows})
    loaders = list(dict.fromkeys(r["loader"] for r in rows))
    workers = sorted({r["workers"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), sharey=True,
                             squeeze=False)
    width = 0.8 / len(loaders)
    for ax, bs in zip(axes[0], batches):
        for k, name in enumerate(loaders):
            rate = {r["workers"]: r["images_per_s"] for r in rows
                    if r["loader"] == name and r["batch_size"] == bs}
            xs = [i + (k - (len(loaders) - 1) / 2) * width for i in range(len(workers))]
            ax.bar(xs, [rate.get(w, 0) for w in workers], width, label=name)
        ax.set_xticks(range(len(workers)), [str(w) for w in workers])
        ax.set_xlabel("CPU workers")
        ax.set_title(f"batch {bs}")
    axes[0][0].set_ylabel("images / s")
    axes[0][-1].legend()
    env = rows[0]["env"]
    fig.suptitle(f"loader throughput: {env.get('gpu') or 'CPU only'}, {env['cpus']} CPUs",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tunings(db, thread_counts: list[int], hw_loads: list[float], prealloc_modes: list[str]
            ) -> list[dict]:
    """DaliTuning's knobs (under their result-field names), one dict per combination
    asked for ({}: DALI's defaults). Preallocation hints: buffers for the largest image, so the decoders never
    grow them mid-run."""
    side = int(max(db.heights.max(), db.widths.max()))
    hints = {"preallocate_width_hint": side, "preallocate_height_hint": side}
    out = []
    for threads, load, pre in itertools.product(thread_counts or [None], hw_loads or [None],
                                                prealloc_modes):
        t = {"dali_threads": threads, "hw_decoder_load": load,
             "decoder_hints": hints if pre == "on" else None}
        out.append({k: v for k, v in t.items() if v is not None})
    return out


def _shown(tuning: dict) -> dict:
    return {k: ("on" if k == "decoder_hints" else v) for k, v in tuning.items()}


def _names(ctx, param, value: str) -> list[str]:
    return _common.some_of(value, LOADERS)


def _threads(ctx, param, value: str) -> list[int]:
    return _common.numbers(value, least=1) if value else []


def _loads(ctx, param, value: str) -> list[float]:
    return _common.numbers(value, float, least=0, most=1) if value else []


@click.command()
@click.option("--db", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Measure this database instead of building one.")
@click.option("--count", default=10_000, show_default=True,
              help="Images in the database built when --db is not given.")
@click.option("--size", default=512, show_default=True, help="Side of the built images.")
@click.option("--loaders", "names", default="dali,dali-roi,torch", show_default=True,
              callback=_names)
@click.option("--batch-sizes", default="32,64", show_default=True,
              callback=_common.batch_sizes)
@click.option("--workers", "worker_counts", default="4,0", show_default=True,
              callback=_common.worker_counts,
              help="CPU workers per loader; 0 means all cores but one.")
@click.option("--patch", default=256, show_default=True, help="HR patch side.")
@click.option("--scale", default=4, show_default=True)
@click.option("--dtype", default="uint8", type=click.Choice(["uint8", "float16", "bfloat16",
                                                              "float32"]), show_default=True)
@click.option("--device", default=None, help="cuda or cpu  [default: cuda if present]")
@click.option("--batches", default=50, show_default=True, help="Batches per timed epoch.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--crc", "crc_modes", default="on", show_default=True,
              callback=_common.switches,
              help="on, off or on,off: the crc32 check on every read (off: to measure its cost).")
@click.option("--degradation", "kinds", default="nn", show_default=True,
              callback=_common.degradations,
              help="How LR is made: some of nn, bicubic, realesrgan (comma-separated).")
@click.option("--dali-threads", "thread_counts", default="", show_default=True,
              callback=_threads,
              help="DALI CPU threads to try (comma list; default: as many as workers).")
@click.option("--hw-decoder-load", "hw_loads", default="", show_default=True, callback=_loads,
              help="GPU decode: hardware decoder shares to try, e.g. 0.65,0.9,1 "
                   "[default: DALI's].")
@click.option("--prealloc", "prealloc_modes", default="off", show_default=True,
              callback=_common.switches,
              help="GPU decode: on,off = with and without preallocation hints sized to "
                   "the database's images.")
@click.option("--cold/--no-cold", default=True, show_default=True,
              help="Also measure a first epoch from a cold and a warm page cache.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also append the JSON lines to this file.")
@click.option("--md", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a markdown table here.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG bar chart here (needs matplotlib: pip install '.[bench]').")
def main(db, count, size, names, batch_sizes, worker_counts, patch, scale, dtype, device,
         batches, repeats, crc_modes, kinds, thread_counts, hw_loads, prealloc_modes,
         cold, out, md, plot):
    import torch

    from srdata.loader import resolve_device
    env = _common.environment() | _common.accelerator_environment()
    cores = env["cpus"]
    budgets = sorted({w or max(1, cores - 1) for w in worker_counts})
    args = {"patch": patch, "scale": scale, "dtype": getattr(torch, dtype),
            "device": resolve_device(device), "batches": batches, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="srpipe-bench-") as tmp:
        source = str(db) if db else f"synthetic {size}x{size} jpeg q95"
        if db is None:
            db = _common.build_jpeg_db(tmp, count, size, min_size=patch)
        database = open_db(db)
        common = {"benchmark": "loader_throughput", "source": source,
                  "db_images": len(database), "codec": database.codec,
                  "quality": database.manifest.get("params", {}).get("quality")
                  if database.codec == "jpeg" else None, "patch": patch,
                  "scale": scale, "dtype": dtype, "device": str(args["device"])}
        records = []
        combos = tunings(database, thread_counts, hw_loads, prealloc_modes)
        for bs in batch_sizes:
            for workers in budgets:
                for name, crc, kind, tuning in (
                        (n, c, k, t) for n, c, k in itertools.product(
                            names, crc_modes, kinds)
                        for t in ([{}] if n == "torch" else combos)):  # DALI's knobs only
                    d = copy.copy(database)  # the flag travels to the workers with it
                    d._check_crc = crc == "on"
                    r = common | {"kind": "throughput", "loader": name, "batch_size": bs,
                                  "workers": workers, "crc": crc == "on", "degradation": kind}
                    r |= {"tuning": _shown(tuning)} if tuning else {}
                    records.append(r | measure(d, name, bs, workers, args, kind, tuning)
                                   | {"env": env})
                    _common.emit(records[-1], out)
        if "off" in crc_modes:
            records.append(common | {"kind": "crc_cost"} | crc_cost(database, repeats)
                           | {"env": env})
            _common.emit(records[-1], out)
        if cold:
            bs, workers = batch_sizes[-1], budgets[-1]
            r = common | {"kind": "cold_warm", "loader": names[0], "batch_size": bs,
                          "workers": workers}
            records.append(r | cold_warm(database, names[0], bs, workers, args) | {"env": env})
            _common.emit(records[-1], out)
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(render_markdown(records))
    if plot:
        render_plot(records, plot)


if __name__ == "__main__":  # spawned workers import this module as __mp_main__
    main()
