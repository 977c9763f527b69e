"""``srtrain demo``: the whole pipeline on real photos in a few minutes, with no network.

Crops of scikit-image's bundled sample photos are written as files, packed with the real
packer, and trained on with the real trainer; a short report says what happened. Validation
crops come from a strip of every photo that no training crop touches, so the PSNR against
bicubic measures what the model learnt, not what it memorised.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import TrainConfig

log = logging.getLogger(__name__)

# The colour photos scikit-image ships in its wheel (others need a download, so are left out).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina")
SCALES = (1.0, 0.75, 0.5)  # photos are downscaled before cropping: objects at several sizes
CROP = 160                 # training crop side; packed as is (--size CROP never upscales)
HOLDOUT = 0.25             # the right-hand fraction of each photo: validation crops only
VAL_PER_PHOTO = 4
# What the demo writes in OUT; --overwrite removes these and nothing else.
OWN = ("images", "val-images", "db", "val-db", "run", "report.txt")
# Written in OUT before anything else: names alone cannot tell a demo from a user's folder
# (images/, db/, run/ are common), so --overwrite empties only a folder carrying this mark.
MARK = ".srtrain-demo"
# The trainer's settings: measured on a 2-core CPU, 30 epochs of 160 crops take ~90 s and
# end ~0.7 dB above bicubic; smaller batches or rates, or a bigger model, do worse in the time.
PATCH, SCALE = 64, 4
TRAIN = dict(model="rrdbnet", num_feat=32, num_block=2, num_grow_ch=16, batch_size=8,
             patch=PATCH, scale=SCALE, lr=2e-3, schedule="onecycle", log_every=5)
EPOCHS, IMAGES = 30, 160
LR_MADE_BY = {"nn": "nearest neighbour (every 4th pixel)",
              "bicubic": "bicubic downscale (MATLAB imresize, as DIV2K)",
              "realesrgan": "Real-ESRGAN's blur/resize/noise/JPEG, twice"}


def preset_settings(model: str, lr: float | None = None) -> dict:
    """TrainConfig settings to train ``model`` on the demo's data: the demo's own (its
    small rrdbnet at lr 2e-3) for ``"demo"``; for a preset, the demo's patch, batch and
    schedule at srtrain's default learning rate (2e-3 suits only the tiny model: esrgan
    collapses with it). ``lr`` replaces either."""
    if model == "demo":
        settings = dict(TRAIN)
    else:
        settings = {k: v for k, v in TRAIN.items() if not k.startswith("num_")} | {
            "model": model, "lr": TrainConfig.lr}
    return settings | ({"lr": lr} if lr else {})


class DemoError(ValueError):
    """The demo cannot run as asked; the message says what to change."""


def resolve_loader(loader: str) -> str:
    """``auto``: DALI when it imports (on the GPU if there is one, else its CPU mode)."""
    if loader != "auto":
        return loader
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "torch"
    return "dali"


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless it is an earlier demo's and ``overwrite``; even then
    remove only our own files, so a mistyped --out never deletes a user's folder. Marks
    ``out`` as the demo's before anything else is written in it."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out} exists and is not a directory; choose another --out")
    entries = sorted(p.name for p in out.iterdir() if p.name != MARK) if out.is_dir() else []
    if entries:
        _check_earlier_demo(out, entries, overwrite)
    for name in entries:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).write_text("made by `srtrain demo`; `srtrain demo --overwrite` may delete "
                            f"{', '.join(OWN)} here, and nothing else\n")


def _check_earlier_demo(out: Path, entries: list[str], overwrite: bool) -> None:
    """A non-empty ``out`` may be replaced only when the demo made it (it carries MARK, or,
    from before the mark, the report a finished demo writes) and holds nothing the demo did
    not write."""
    if not (out / MARK).is_file() and not _old_demo_report(out):
        # a user's folder, or an unfinished demo from before the mark: names prove nothing
        raise DemoError(f"{out} is not empty and has no {MARK} file, so this srtrain demo did "
                        "not make it; choose another --out (an older version's unfinished "
                        "demo there is yours to delete)")
    if not overwrite:
        raise DemoError(f"{out} holds an earlier demo; pass --overwrite to replace it, "
                        "or choose another --out")
    foreign = [e for e in entries if e not in OWN]
    if foreign:
        raise DemoError(f"{out} holds files the demo did not write ({', '.join(foreign[:3])}"
                        f"{' ...' if len(foreign) > 3 else ''}); choose another --out")


def _old_demo_report(out: Path) -> bool:
    """Whether ``out`` holds the report of a demo finished before MARK existed, so that
    `make demo` still replaces it (with the name check that follows, as then)."""
    try:
        with open(out / "report.txt") as f:
            return f.readline().startswith("srpipe demo: pack -> load -> train -> validate")
    except (OSError, UnicodeDecodeError):
        return False


def load_photos() -> dict[str, np.ndarray]:
    """The bundled photos as RGB uint8; any that would need a download is skipped."""
    import skimage.data
    photos = {}
    for name in PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception as e:  # pooch missing, no network, renamed in a new release
            log.warning("skipping skimage.data.%s: %s", name, e)
            continue
        if img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
            photos[name] = img
    if not photos:
        raise DemoError("none of scikit-image's sample photos could be loaded; "
                        "reinstall scikit-image (pip install scikit-image)")
    return photos


def write_crops(photos: dict, images: Path, val_images: Path, count: int, seed: int) -> None:
    """``count`` training crops (random photo, scale, position) from the left part of each
    photo, and ``VAL_PER_PHOTO`` validation crops from its held-out right-hand strip."""
    rng = np.random.default_rng(seed)
    images.mkdir(parents=True)
    val_images.mkdir(parents=True)
    names = sorted(photos)
    for i in range(count):
        name = names[i % len(names)]
        img = photos[name]
        split = int(img.shape[1] * (1 - HOLDOUT))
        fits = [s for s in SCALES if min(img.shape[0], split) * s >= CROP]
        s = float(rng.choice(fits or [CROP / min(img.shape[0], split)]))
        part = downscale(img[:, :split], s)
        y = int(rng.integers(0, part.shape[0] - CROP + 1))
        x = int(rng.integers(0, part.shape[1] - CROP + 1))
        ext = ".png" if i % 4 == 0 else ".jpg"  # both decoders get exercised
        save(images / f"{name}-{i:04d}{ext}", part[y:y + CROP, x:x + CROP])
    for name in names:
        img = photos[name]
        strip = img[:, int(img.shape[1] * (1 - HOLDOUT)):]
        side = min(strip.shape[:2])
        for k in range(VAL_PER_PHOTO):
            y = int(rng.integers(0, strip.shape[0] - side + 1))
            # the k-th crop of every photo sorts together: the grid shows different photos
            save(val_images / f"{k}-{name}.png", strip[y:y + side])


def downscale(img: np.ndarray, s: float) -> np.ndarray:
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BOX))


def save(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(rgb)).save(path, quality=95)


def run_demo(out: str | Path, loader: str = "auto", epochs: int = EPOCHS,
             images: int = IMAGES, overwrite: bool = False, progress: bool = True,
             seed: int = 0, degradation: str = "nn") -> dict:
    """Write crops, pack them, train, and write OUT/report.txt; returns the report's facts."""
    from .train import train
    out, t0 = Path(out), time.perf_counter()
    say = print if progress else lambda *a: None
    if images < TRAIN["batch_size"]:
        raise DemoError(f"--images {images} is less than one batch; use "
                        f"{TRAIN['batch_size']} or more")
    prepare_out(out, overwrite)
    loader = resolve_loader(loader)
    say(f"writing {images} training crops of scikit-image's sample photos to {out}/images")
    count, val_count = make_data(out, images, seed, progress)
    run = out / "run"
    say(f"training {epochs} epochs with the {loader} loader on {describe_device(loader)}; "
        f"validation after each")
    result = train(TrainConfig(db=str(out / "db"), val_db=str(out / "val-db"), out=str(run),
                               loader=loader, epochs=epochs, seed=seed,
                               val_images=val_count, progress=progress,
                               degradation=degradation, **TRAIN))
    facts = {"images": count, "val_images": val_count, "loader": loader,
             "degradation": degradation,
             "device": describe_device(loader), "epochs": result["epoch"],
             "steps": result["step"], "best_psnr": result["best_psnr"], **summarize(run),
             "grid": str(sorted((run / "samples").glob("*.png"))[-1]),
             "out": str(out), "seconds": time.perf_counter() - t0}
    (out / "report.txt").write_text(report(facts))
    return facts


def make_data(out: Path, images: int, seed: int, progress: bool = True) -> tuple[int, int]:
    """Crops in OUT/images and OUT/val-images, packed to OUT/db and OUT/val-db; returns
    how many training and validation records were packed."""
    from srdata.pack import PackConfig, pack
    write_crops(load_photos(), out / "images", out / "val-images", images, seed)
    cfg = PackConfig(size=CROP, fit="short", min_size=PATCH, workers=0)
    return (pack(out / "images", out / "db", cfg, progress=progress)["count"],
            pack(out / "val-images", out / "val-db", cfg, progress=progress)["count"])


def summarize(run: Path) -> dict:
    """From a run's metrics.jsonl: the last epoch's mean img/s and data-wait %, and the last
    validation's PSNR and SSIM with bicubic's."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [e for e in events if e["event"] == "train"]
    last = [e for e in trained if e["epoch"] == trained[-1]["epoch"]]
    val = [e for e in events if e["event"] == "val"][-1]
    return {"img_per_s": float(np.mean([e["img_per_s"] for e in last])),
            "data_wait_pct": float(np.mean([e["data_wait_pct"] for e in last])),
            **{k: val[k] for k in ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic")}}


def describe_device(loader: str) -> str:
    """Where the model trains, and where DALI decodes."""
    if torch.cuda.is_available():
        return f"GPU ({torch.cuda.get_device_name()})"
    mode = ", DALI's CPU mode" if loader == "dali" else ""
    return f"CPU ({torch.get_num_threads()} threads){mode}"


def report(f: dict) -> str:
    """The human-readable summary written to report.txt and printed."""
    gain = f["psnr"] - f["psnr_bicubic"]
    out = f["out"]
    return "\n".join([
        "srpipe demo: pack -> load -> train -> validate, on scikit-image's sample photos",
        f"  packed        {f['images']} training crops ({out}/db), {f['val_images']} "
        f"validation crops from held-out strips ({out}/val-db)",
        f"  loader        {f['loader']} on {f['device']}",
        f"  LR            {f['degradation']}: {LR_MADE_BY[f['degradation']]}; training and "
        "validation",
        f"  training      {f['epochs']} epochs, {f['steps']} steps, x{SCALE}, "
        f"{TRAIN['patch']} px HR patches, batch {TRAIN['batch_size']}",
        f"  last epoch    {f['img_per_s']:.1f} img/s, waiting for data {f['data_wait_pct']:.0f}%"
        " of the time",
        f"  validation    PSNR {f['psnr']:.2f} dB vs bicubic {f['psnr_bicubic']:.2f} dB "
        f"({gain:+.2f} dB; best {f['best_psnr']:.2f} dB, in best.pt)",
        f"                SSIM {f['ssim']:.4f} vs bicubic {f['ssim_bicubic']:.4f}  (Y channel, "
        f"{SCALE} px border, as BasicSR)",
        f"  sample grid   {f['grid']}  (LR ({f['degradation']}) | bicubic | SR | HR)",
        f"  metrics       {out}/run/metrics.jsonl; checkpoints {out}/run/best.pt, last.pt",
        f"  wall time     {f['seconds']:.0f} s",
        "",
        "Go further:",
        f"  srtrain upscale --ckpt {out}/run/best.pt photo.jpg photo_x4.png",
        "  srdata pack PHOTOS/ db/                   # your own photos (512 px short side)",
        "  srtrain --db db/ --out runs/mine          # ESRGAN size, 256 px patches: a GPU job",
        "  srtrain --db db/ --out runs/small --model fast --patch 128   # lighter, for a CPU",
        ""])
