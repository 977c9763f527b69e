"""What each storage codec costs and gives: bytes per image, fidelity to the resized
source (PSNR), and single-thread decode speed with OpenCV, for 512 px records packed
from 1-2K px photos.

    python benchmarks/codec_compare.py [--count 48] [--repeats 5] [--out FILE.jsonl]

One JSON line per codec configuration. Decode times cover ``srdata.format.decode_image``
on values already read from LMDB into memory: the codec's cost alone, not the storage's
(``raw`` is a zero-copy ``np.frombuffer``, so its time is only the call's overhead).
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import click
import cv2
import numpy as np

import _common
from srdata import format as fmt
from srdata import images
from srdata.pack import PackConfig, pack
from srdata.reader import PackedDB

CONFIGS = [  # (codec, quality, subsampling)
    ("jpeg", 90, "444"), ("jpeg", 95, "444"), ("jpeg", 100, "444"), ("jpeg", 95, "420"),
    ("png", 95, "444"), ("raw", 95, "444"),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


@click.command()
@click.option("--count", default=48, show_default=True, help="Synthetic photos to generate.")
@click.option("--src", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Pack this folder instead of synthetic photos.")
@click.option("--size", default=512, show_default=True)
@click.option("--repeats", default=5, show_default=True, help="Timed decode passes.")
@click.option("--warmup", default=1, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also append the JSON lines to this file.")
def main(count, src, size, repeats, warmup, out):
    env = _common.environment()
    cv2.setNumThreads(1)  # per-core cost: loaders decode one image per worker thread
    with tempfile.TemporaryDirectory(prefix="srpipe-bench-") as tmp:
        tmp = Path(tmp)
        if src is None:
            src = tmp / "photos"
            _common.make_photos(src, count)
        references = {}  # source path -> what every codec should reproduce
        results = []
        for codec, quality, subsampling in CONFIGS:
            cfg = PackConfig(size=size, min_size=min(size, 256), codec=codec, quality=quality,
                             subsampling=subsampling)
            dst = tmp / f"db-{codec}-{quality}-{subsampling}"
            manifest = pack(src, dst, cfg, progress=False)
            db = PackedDB(dst)
            values = [db.read(i) for i in range(len(db))]
            scores = []
            for value, rec in zip(values, db.records):
                if rec.path not in references:
                    path = os.fsencode(src / rec.path)
                    references[rec.path] = images.resize(
                        images.load_rgb(path, cfg.max_pixels), size, "short")
                scores.append(psnr(fmt.decode_image(value, codec, rec.shape),
                                   references[rec.path]))
            results.append({"codec": codec, "quality": quality, "subsampling": subsampling,
                            "manifest": manifest, "values": values, "scores": scores,
                            "shapes": [r.shape for r in db.records], "times": []})

        # rounds interleave the codecs: a shared VM drifts by 10-20% over a minute, which
        # timing one codec after another would attribute to the codecs
        for round_ in range(warmup + repeats):
            for r in results:
                t0 = time.perf_counter()
                for value, shape in zip(r["values"], r["shapes"]):
                    fmt.decode_image(value, r["codec"], shape)
                if round_ >= warmup:
                    r["times"].append(time.perf_counter() - t0)

        for r in results:
            manifest, shapes, n = r["manifest"], r["shapes"], len(r["values"])
            pixels = sum(h * w for h, w, _ in shapes)
            finite = [s for s in r["scores"] if math.isfinite(s)]
            seconds = statistics.median(r["times"])
            jpeg = r["codec"] == "jpeg"
            _common.emit({
                "benchmark": "codecs",
                "source": "synthetic" if src.parent == tmp else str(src),
                "size": size, "codec": r["codec"],
                "quality": r["quality"] if jpeg else None,
                "subsampling": r["subsampling"] if jpeg else None,
                "images": n,
                "megapixels_per_image": round(pixels / n / 1e6, 3),
                "bytes_per_image": round(manifest["bytes"] / manifest["count"]),
                "bytes_per_pixel": round(manifest["bytes"] / pixels, 3),
                # JSON has no infinity: null means lossless (every image identical)
                "psnr_mean_db": round(statistics.mean(finite), 2) if finite else None,
                "psnr_min_db": round(min(finite), 2) if finite else None,
                "lossless_images": n - len(finite),
                "decode_us_per_image": round(1e6 * seconds / n, 1),
                "decode_images_per_s": round(n / seconds, 1),
                "decode_repeats": repeats,
                "pack_seconds": manifest["pack_stats"]["seconds"],
                "env": env,
            }, out)

if __name__ == "__main__":  # spawned pack workers import this module as __mp_main__
    main()
