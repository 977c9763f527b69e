"""Validation PSNR per minute of training: a fixed patch, a progressive patch schedule, and
``--sample-ratio 0.3``.

    python benchmarks/time_to_quality.py [--model demo] [--images 160] [--epochs 24] \
        [--patch 64] [--schedule 32:0,48:8,64:16] [--out F.jsonl] [--md F.md] [--plot F.png]

Three runs of one preset on the same data (``srtrain demo``'s crops of scikit-image's sample
photos, validated every epoch on its held-out crops at the final patch size), through
srtrain's own ``train``:

- ``fixed``: ``--patch`` every epoch;
- ``progressive``: ``--schedule`` (``--patch-schedule``; ``--batch-schedule keep``);
- ``sample-ratio``: ``--patch`` on a fresh ``--sample-ratio`` of the images each epoch.

One JSON line per validation (run, epoch, minutes since the run started — model build,
loader start and the validations included, the same for every run —, images and HR
megapixels trained on, PSNR) and one per run (final PSNR, minutes and megapixels to reach
each target). Megapixels (images x patch area) measure the compute spent whatever the load:
a step's cost grows with them. Targets: ``--targets`` in dB, or by default the fixed run's
final PSNR minus 0.3 and minus 0.1 dB. The chart plots PSNR against minutes and against
megapixels. Wall times on a shared machine are noisy: the record holds the CPU load seen
before the start.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

import _common


def images_per_epoch(db: str, batch_size: int, patch: int, sample_ratio: float,
                     schedule: str | None, epochs: int) -> list[tuple[int, int]]:
    """(images, HR patch side) of each epoch (one rank, whole batches): what the trainer's
    loader takes, counted by the same sampler without reading an image."""
    import srdata
    lo = srdata.make_loader(db, "torch", batch_size, patch, 4, sample_ratio=sample_ratio,
                            device="cpu", workers=0, patch_schedule=schedule)
    stage = lo.schedule or (lambda e: (patch, batch_size))
    return [(lo.batches_in(e) * stage(e)[1], stage(e)[0]) for e in range(epochs)]


def seen(per_epoch: list[tuple[int, int]], epoch: int) -> dict:
    """Images and HR megapixels trained on by the end of ``epoch``: the pixels are the
    load-independent measure of the compute spent (a step's cost grows with them)."""
    done = per_epoch[:epoch + 1]
    return {"images_seen": sum(n for n, _ in done),
            "megapixels_seen": round(sum(n * p * p for n, p in done) / 1e6, 3)}


def run_one(name: str, tmp: Path, settings: dict, val: int, env: dict, out: Path | None):
    from srtrain.config import TrainConfig
    from srtrain.train import train
    run = tmp / f"run-{name}"
    cfg = TrainConfig(db=str(tmp / "db"), val_db=str(tmp / "val-db"), out=str(run),
                      val_images=val, val_every=1, progress=False, seed=0, **settings)
    per_epoch = images_per_epoch(cfg.db, cfg.batch_size, cfg.patch, cfg.sample_ratio,
                                 cfg.patch_schedule, cfg.epochs)
    t0 = time.time()
    train(cfg)
    events = _common.read_lines(run / "metrics.jsonl")
    points = []
    for e in (e for e in events if e["event"] == "val"):
        points.append({"benchmark": "time_to_quality", "run": name, "epoch": e["epoch"],
                       "minutes": round((e["time"] - t0) / 60, 3),
                       **seen(per_epoch, e["epoch"]),
                       "psnr": round(e["psnr"], 4), "psnr_bicubic": round(e["psnr_bicubic"], 4)})
        _common.emit(points[-1], out)
    return {"run": name, "minutes": round((time.time() - t0) / 60, 3),
            "patch_schedule": cfg.patch_schedule, "sample_ratio": cfg.sample_ratio,
            "points": points, "settings": settings, "env": env}


def first_at(points: list[dict], target: float, key: str = "minutes") -> float | None:
    """``key`` (minutes, megapixels_seen) of the first validation at ``target`` dB or more."""
    return next((p[key] for p in points if p["psnr"] >= target), None)


def summarize(runs: list[dict], targets: list[float]) -> list[dict]:
    rows = []
    for r in runs:
        p = r["points"]
        rows.append({"benchmark": "time_to_quality", "summary": True, "run": r["run"],
                     "patch_schedule": r["patch_schedule"], "sample_ratio": r["sample_ratio"],
                     "final_psnr": p[-1]["psnr"], "best_psnr": max(x["psnr"] for x in p),
                     "psnr_bicubic": p[-1]["psnr_bicubic"], "minutes": r["minutes"],
                     "images_seen": p[-1]["images_seen"],
                     "megapixels_seen": p[-1]["megapixels_seen"],
                     "minutes_to": {f"{t:.2f}": first_at(p, t) for t in targets},
                     "megapixels_to": {f"{t:.2f}": first_at(p, t, "megapixels_seen")
                                       for t in targets},
                     "settings": r["settings"], "env": r["env"]})
    return rows


def table(rows: list[dict]) -> str:
    targets = list(rows[0]["minutes_to"])
    head = ["run", "schedule", "final PSNR dB", "best PSNR dB", "images seen", "HR Mpx",
            "minutes", *[f"min to {t} dB" for t in targets], *[f"Mpx to {t} dB" for t in targets]]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        sched = r["patch_schedule"] or f"{r['settings']['patch']} fixed"
        if r["sample_ratio"] < 1:
            sched += f", sample ratio {r['sample_ratio']:g}"
        cells = [r["run"], sched, f"{r['final_psnr']:.2f}", f"{r['best_psnr']:.2f}",
                 f"{r['images_seen']:,}", f"{r['megapixels_seen']:.1f}", f"{r['minutes']:.1f}",
                 *["not reached" if m is None else f"{m:.1f}" for m in r["minutes_to"].values()],
                 *["not reached" if m is None else f"{m:.1f}"
                   for m in r["megapixels_to"].values()]]
        lines.append("| " + " | ".join(cells) + " |")
    r, env, s = rows[0], rows[0]["env"], rows[0]["settings"]
    lines.append(
        f"\nBicubic: {r['psnr_bicubic']:.2f} dB. {s['epochs']} epochs, model {s['model']}, "
        f"batch {s['batch_size']}, lr {s['lr']:g} one-cycle, loader {s['loader']}; "
        f"{env.get('gpu') or 'no GPU'}, {env['cpus']} CPUs (busy {env['cpu_busy_before']} "
        f"before the start), torch {env['torch']}, DALI {env.get('dali')}, {env['date'][:10]}.")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for r in runs:
        p = r["points"]
        label = r["run"] + (f" ({r['patch_schedule']})" if r["patch_schedule"] else "")
        a.plot([x["minutes"] for x in p], [x["psnr"] for x in p], marker=".", label=label)
        b.plot([x["megapixels_seen"] for x in p], [x["psnr"] for x in p], marker=".",
               label=label)
    bicubic = runs[0]["points"][-1]["psnr_bicubic"]
    top = max(x["psnr"] for r in runs for x in r["points"])
    for ax in (a, b):
        ax.axhline(bicubic, color="grey", ls=":", lw=1, label="bicubic")
        ax.grid(alpha=0.3)
    if top > bicubic - 2:  # the first epochs' low scores would squash the range that matters
        a.set_ylim(bicubic - 2, top + 0.2)
    a.set_xlabel("wall minutes (validation included)")
    b.set_xlabel("HR megapixels trained on (images x patch area)")
    a.set_ylabel("validation PSNR (Y) dB")
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rerender(path: Path, md: Path | None, plot_path: Path | None) -> None:
    records = _common.read_lines(path)
    rows = [r for r in records if r.get("summary")]
    runs = [{**r, "points": [p for p in records if p.get("run") == r["run"]
                             and not p.get("summary")]} for r in rows]
    if md:
        md.write_text(table(rows))
    if plot_path:
        s, env = rows[0]["settings"], rows[0]["env"]
        plot(runs, plot_path, _title(s, runs[0]["points"][-1]["images_seen"]
                                     // max(1, len(runs[0]["points"])), env))


def _title(s: dict, images: int, env: dict) -> str:
    return (f"time to quality: {s['model']} x{s['scale']}, {images} crops, {s['epochs']} "
            f"epochs, batch {s['batch_size']} ({env.get('gpu') or 'CPU'})")


RUNS = ("fixed", "progressive", "sample-ratio")


def _model(ctx, param, value: str) -> str:
    from srtrain.models import MODELS
    names = ("demo", *MODELS)
    if value not in names:
        raise click.BadParameter(f"got {value}, expected one of {','.join(names)}")
    return value


def _runs(ctx, param, value: str) -> list[str]:
    return _common.some_of(value, RUNS)


def _targets(ctx, param, value: str | None) -> list[float] | None:
    return None if value is None else _common.numbers(value, float)


@click.command()
@click.option("--model", default="demo", show_default=True, callback=_model,
              help="demo (the demo's RRDBNet 32/2/16) or an srtrain --model preset.")
@click.option("--images", default=160, show_default=True, help="Training crops (160 px).")
@click.option("--epochs", default=24, show_default=True)
@click.option("--patch", default=64, show_default=True, help="The fixed and final patch.")
@click.option("--schedule", default="32:0,48:8,64:16", show_default=True,
              help="The progressive run's --patch-schedule.")
@click.option("--sample-ratio", default=0.3, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--lr", type=float, help="Peak learning rate  [default: the demo's 2e-3 for "
                                       "--model demo, else srtrain's 2e-4]")
@click.option("--loader", default="auto", type=click.Choice(["auto", "dali", "torch"]),
              show_default=True)
@click.option("--runs", default=",".join(RUNS), show_default=True, callback=_runs)
@click.option("--targets", callback=_targets,
              help="dB, comma-separated  [default: fixed final -0.3, -0.1]")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--md", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--render", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Train nothing: write --md and --plot from this earlier --out file.")
def main(model, images, epochs, patch, schedule, sample_ratio, batch_size, lr, loader, runs,
         targets, out, md, plot_path, render):
    if render:
        return rerender(render, md, plot_path)
    from srtrain import demo
    env = _common.environment() | _common.accelerator_environment()
    loader = demo.resolve_loader(loader)
    base = demo.preset_settings(model, lr) | {
        "patch": patch, "batch_size": batch_size, "epochs": epochs, "loader": loader,
        "log_every": 5}
    variants = {"fixed": {}, "progressive": {"patch_schedule": schedule},
                "sample-ratio": {"sample_ratio": sample_ratio}}
    done = []
    with tempfile.TemporaryDirectory(prefix="srpipe-ttq-") as tmp:
        tmp = Path(tmp)
        _, val = demo.make_data(tmp, images, seed=0, progress=False)
        for name in runs:
            done.append(run_one(name, tmp, base | variants[name], val, env, out))
    final = done[0]["points"][-1]["psnr"]
    goals = targets or [round(final - 0.3, 2), round(final - 0.1, 2)]
    rows = summarize(done, goals)
    for r in rows:
        _common.emit(r, out)
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(table(rows))
    if plot_path:
        plot(done, plot_path, _title(base, images, env))


if __name__ == "__main__":  # spawned loader workers import this module as __mp_main__
    main()
