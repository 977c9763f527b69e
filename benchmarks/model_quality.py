"""What each model preset buys: validation PSNR/SSIM over bicubic, against its training speed.

    python benchmarks/model_quality.py [--models srcnn,fast,light] [--epochs 30] [--lr 2e-4] \
        [--out F.jsonl] [--md F.md]
    python benchmarks/model_quality.py --models demo --degradations nn,bicubic,realesrgan ...

Every preset trains on the same data with the same settings: ``srtrain demo``'s (160 crops of
scikit-image's sample photos, 64² HR patches, ×4, batch 8, one-cycle, seed 0) but srtrain's
default learning rate, 2e-4 (the demo's 2e-3 suits its tiny model; esrgan collapses with it),
through srtrain's own ``train``, and is validated once at the end on the demo's held-out
crops (Y channel, 4 px border). One JSON line per preset: PSNR and SSIM, bicubic's, img/s of
the last epoch and wall time. A small-data measurement: it ranks presets for a fixed number
of epochs; more data and longer runs widen the gaps.

``--degradations``: train each model once per way of making the training LR (``srtrain
--degradation``) and evaluate every one of them on validation LR made each way (fixed
parameters per image): a train x validation table, one JSON line per cell
(``kind: degradation``), which shows what a model trained on one LR is worth on another.
``--models demo`` is the demo's own small model at its learning rate.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

import _common


def _table(records: list[dict]) -> str:
    lines = ["| model | parameters | PSNR dB | vs bicubic | SSIM | train img/s | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['psnr']:.2f} | "
                     f"{r['psnr'] - r['psnr_bicubic']:+.2f} | {r['ssim']:.4f} | "
                     f"{r['img_per_s']:,.1f} | {r['seconds']:.0f} |")
    r, env = records[0], records[0]["env"]
    rates = {x["model"]: x["lr"] for x in records}  # demo trains at its own 2e-3
    lr = (f"lr {r['lr']:g}" if len(set(rates.values())) == 1 else
          "lr " + ", ".join(f"{v:g} ({m})" for m, v in rates.items()))
    lines.append(f"\nBicubic: PSNR {r['psnr_bicubic']:.2f} dB, SSIM {r['ssim_bicubic']:.4f}. "
                 f"{env.get('gpu') or 'no GPU'}, {env['cpus']} CPUs, torch {env['torch']}, "
                 f"DALI {env.get('dali')}, {env['date'][:10]}; {r['epochs']} epochs of "
                 f"{r['images']} crops, patch {r['patch']}, batch {r['batch_size']}, "
                 f"{lr}, loader {r['loader']}.")
    return "\n".join(lines) + "\n"


def _models(ctx, param, value: str) -> list[str]:
    from srtrain.models import MODELS
    return _common.some_of(value, (*MODELS, "demo"))


@click.command()
@click.option("--models", default="srcnn,fast,light", show_default=True, callback=_models,
              help="srtrain --model presets, or demo (the demo's own small RRDBNet).")
@click.option("--epochs", default=30, show_default=True)
@click.option("--lr", type=float, help="Peak learning rate  [default: srtrain's, 2e-4]")
@click.option("--loader", default="auto", type=click.Choice(["auto", "dali", "torch"]),
              show_default=True)
@click.option("--degradations", callback=_common.degradations,
              help="Train on each of these LR kinds and validate on each "
                   "(some of nn, bicubic, realesrgan).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--md", type=click.Path(dir_okay=False, path_type=Path))
def main(models, epochs, lr, loader, degradations, out, md):
    if degradations:
        return degradation_matrix(models, epochs, lr, loader, degradations, out, md)
    from srtrain import demo
    from srtrain.config import TrainConfig
    from srtrain.models import build_model
    from srtrain.train import train
    env = _common.environment() | _common.accelerator_environment()
    loader = demo.resolve_loader(loader)
    records = []
    with tempfile.TemporaryDirectory(prefix="srpipe-quality-") as tmp:
        tmp = Path(tmp)
        images, val = demo.make_data(tmp, demo.IMAGES, seed=0, progress=False)
        for name in models:
            settings = demo.preset_settings(name, lr)
            t0 = time.perf_counter()
            run = tmp / f"run-{name}"
            cfg = TrainConfig(db=str(tmp / "db"), val_db=str(tmp / "val-db"), out=str(run),
                              loader=loader, epochs=epochs, seed=0, val_images=val,
                              val_every=epochs, progress=False, **settings)
            train(cfg)
            r = demo.summarize(run)
            model = build_model(cfg.model, cfg.scale, cfg.num_feat, cfg.num_block,
                                cfg.num_grow_ch)
            records.append({
                "benchmark": "model_quality", "model": name,
                "parameters": sum(p.numel() for p in model.parameters()),
                "epochs": epochs, "images": images, "val_images": val, "loader": loader,
                "patch": settings["patch"], "batch_size": settings["batch_size"],
                "lr": settings["lr"],
                **{k: round(r[k], 4) for k in ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic")},
                "img_per_s": round(r["img_per_s"], 1),
                "seconds": round(time.perf_counter() - t0, 1), "env": env})
            _common.emit(records[-1], out)
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(_table(records))


def _matrix_table(records: list[dict]) -> str:
    kinds = list(dict.fromkeys(r["val_degradation"] for r in records))
    lines = ["| model | trained on | " + " | ".join(f"val LR {k}: PSNR (vs bicubic) / SSIM"
                                                 for k in kinds) + " |",
             "|---|---|" + "---:|" * len(kinds)]
    for (model, trained), rows in _group(records).items():
        cells = {r["val_degradation"]: f"{r['psnr']:.2f} ({r['psnr'] - r['psnr_bicubic']:+.2f})"
                                       f" / {r['ssim']:.4f}" for r in rows}
        lines.append(f"| {model} | {trained} | " + " | ".join(cells[k] for k in kinds) + " |")
    bic = {r["val_degradation"]: r for r in records}
    r, env = records[0], records[0]["env"]
    lines.append("\nBicubic upscaling of each validation LR: " + ", ".join(
        f"{k} {bic[k]['psnr_bicubic']:.2f} dB / {bic[k]['ssim_bicubic']:.4f}" for k in kinds)
        + f". {env.get('gpu') or 'no GPU'}, {env['cpus']} CPUs, torch {env['torch']}, "
        f"{env['date'][:10]}; {r['epochs']} epochs of {r['images']} crops, patch {r['patch']}, "
        f"batch {r['batch_size']}, lr {r['lr']:g}, loader {r['loader']}; {r['val_images']} "
        "validation crops, Y channel.")
    return "\n".join(lines) + "\n"


def _group(records):
    out = {}
    for r in records:
        out.setdefault((r["model"], r["train_degradation"]), []).append(r)
    return out


def degradation_matrix(models, epochs, lr, loader, kinds, out, md) -> None:
    import torch

    from srdata.reader import open_db
    from srtrain import checkpoint, demo
    from srtrain.config import TrainConfig
    from srtrain.train import train
    from srtrain.validate import ValSet, evaluate
    env = _common.environment() | _common.accelerator_environment()
    loader = demo.resolve_loader(loader)
    records = []
    with tempfile.TemporaryDirectory(prefix="srpipe-quality-") as tmp:
        tmp = Path(tmp)
        images, n_val = demo.make_data(tmp, demo.IMAGES, seed=0, progress=False)
        vdb = open_db(tmp / "val-db")
        vals = {k: ValSet(vdb, range(len(vdb)), demo.PATCH, demo.SCALE, n_val, degradation=k)
                for k in kinds}
        for name, trained in ((m, k) for m in models for k in kinds):
            settings = demo.preset_settings(name, lr)
            run, t0 = tmp / f"run-{name}-{trained}", time.perf_counter()
            train(TrainConfig(db=str(tmp / "db"), val_db=str(tmp / "val-db"), out=str(run),
                              loader=loader, epochs=epochs, seed=0, val_images=n_val,
                              val_every=epochs, progress=False, degradation=trained,
                              **settings))
            seconds = time.perf_counter() - t0
            model = checkpoint.load_model(run / "last.pt")
            for k, val in vals.items():
                r = evaluate(model, val, 8, torch.device("cpu"), torch.float32, True)
                records.append({
                    "benchmark": "model_quality", "kind": "degradation", "model": name,
                    "train_degradation": trained, "val_degradation": k, "epochs": epochs,
                    "images": images, "val_images": len(val), "loader": loader,
                    "patch": settings["patch"], "batch_size": settings["batch_size"],
                    "lr": settings["lr"], **{m: round(r[m], 4) for m in (
                        "psnr", "ssim", "psnr_bicubic", "ssim_bicubic")},
                    "train_seconds": round(seconds, 1), "env": env})
                _common.emit(records[-1], out)
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(_matrix_table(records))


if __name__ == "__main__":  # spawned loader workers import this module as __mp_main__
    main()
