"""What opening a database of a million records costs: seconds, and bytes pickled per worker.

    python benchmarks/open_scale.py [--count 1000000] [--out F.jsonl]

Real-ESRGAN users train on DF2K+OST sub-image LMDBs of a few hundred thousand records, and
every loader worker receives the opened database by pickle. This builds, for COUNT records:

- an srpipe database's manifest and index (real rows, as ``srdata pack`` writes them: the
  format version's index.bin, or with ``--formats srpipe-v1`` a version-1 index.json; the
  shards hold nothing, as opening never reads them);
- a BasicSR LMDB (``meta_info.txt`` and a data.mdb of one tiny PNG per key, so the PNG
  header read at open, one page per record, is real),

then opens each ``--repeats`` times (a fresh process state each time, the files in the page
cache) and reports the median seconds, the pickled size and the peak memory. One JSON line
per format.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import cv2
import lmdb
import numpy as np

import _common
import srdata
from srdata import format as fmt

MiB = 1 << 20


def build_packed(root: Path, count: int, version: int = fmt.FORMAT_VERSION) -> Path:
    db = root / f"packed-v{version}"
    per_shard = 10_000
    shards = [{"name": fmt.shard_name(k), "count": min(per_shard, count - k * per_shard),
               "bytes": 0, "sha256": ""} for k in range(-(-count // per_shard))]
    for shard in shards:
        (db / shard["name"]).mkdir(parents=True)
    rows = [[i // per_shard, fmt.record_key(i).decode(), 480, 480, 3, 118_000 + i % 9000,
             (i * 2654435761) & 0xFFFFFFFF, f"DF2K_HR_sub/{i // 100:06d}_s{i % 100:03d}.png"]
            for i in range(count)]
    if version == 1:  # what users' databases packed before version 2 hold
        index = fmt.INDEX
        fmt.write_json_atomic(db / index, {"format_version": 1, "rows": rows,
                                           "columns": list(fmt.INDEX_COLUMNS)})
    else:
        index = fmt.write_index(db, rows, shards)
    manifest = {"format": fmt.FORMAT_NAME, "format_version": version,
                "count": count, "codec": "png", "index": index, "id": "0" * 32,
                "index_sha256": fmt.sha256_file(db / index), "source_root": str(root),
                "skipped": [], "params": {}, "shards": shards}
    fmt.write_json_atomic(db / fmt.MANIFEST, manifest)
    return db


def build_basicsr(root: Path, count: int) -> Path:
    db = root / "train_HR_sub.lmdb"
    png = cv2.imencode(".png", np.zeros((480, 480, 3), np.uint8),
                       [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()
    env = lmdb.open(str(db), map_size=count * 8192 + 64 * MiB)  # sparse: only what is used
    keys = [f"{i // 100:06d}_s{i % 100:03d}" for i in range(count)]
    with env.begin(write=True) as txn:
        for k in keys:
            txn.put(k.encode(), png)
    env.close()
    (db / "meta_info.txt").write_text("".join(f"{k}.png (480,480,3) 1\n" for k in keys))
    return db


OPEN = """
import pickle, resource, sys, time
from srdata.reader import open_db
t0 = time.perf_counter()
db = open_db(sys.argv[1])
seconds = time.perf_counter() - t0
t0 = time.perf_counter()
blob = pickle.dumps(db)
pickle_s = time.perf_counter() - t0
t0 = time.perf_counter()
pickle.loads(blob)
print(seconds, len(blob), pickle_s, time.perf_counter() - t0,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(db: Path, repeats: int) -> dict:
    runs = []
    # the srdata this process imported, not whatever `python -c` finds first in its cwd
    env = os.environ | {"PYTHONPATH": os.pathsep.join(
        [str(Path(srdata.__file__).resolve().parents[1])] + sys.path[1:])}
    for _ in range(repeats):  # a fresh process each time: nothing cached but the files
        out = subprocess.run([sys.executable, "-c", OPEN, str(db)], capture_output=True,
                             text=True, check=True, cwd=db.parent, env=env)
        runs.append([float(v) for v in out.stdout.split()])
    opens = [r[0] for r in runs]
    return {"open_s": round(statistics.median(opens), 3), "open_s_all": [round(v, 3)
                                                                          for v in opens],
            "pickle_mib": round(runs[0][1] / MiB, 1),
            "pickle_s": round(statistics.median(r[2] for r in runs), 3),
            "unpickle_s": round(statistics.median(r[3] for r in runs), 3),
            "peak_rss_mib": round(max(r[4] for r in runs) / 1024, 1)}


def _formats(ctx, param, value: str) -> list[str]:
    return _common.some_of(value, ("srpipe", "srpipe-v1", "basicsr"))


@click.command()
@click.option("--count", default=1_000_000, show_default=True, help="Records per database.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--formats", default="srpipe,basicsr", show_default=True, callback=_formats,
              help="Comma-separated: srpipe (this version's index), srpipe-v1, basicsr.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also append the JSON lines to this file.")
@click.option("--label", default="", help="Recorded as is, e.g. which code was measured "
              "(PYTHONPATH=OTHER_CHECKOUT measures that checkout's srdata).")
def main(count, repeats, formats, out, label):
    env = _common.environment()
    with tempfile.TemporaryDirectory(prefix="srpipe-open-") as tmp:
        for name in formats:
            t0 = time.perf_counter()
            if name == "basicsr":
                db = build_basicsr(Path(tmp), count)
            else:
                db = build_packed(Path(tmp), count, 1 if name == "srpipe-v1" else
                                  fmt.FORMAT_VERSION)
            built = time.perf_counter() - t0
            load = os.getloadavg()[0]  # other jobs on a shared machine inflate the seconds
            record = {"benchmark": "open_scale", "format": name, "label": label,
                      "records": count, "build_s": round(built, 1)} | measure(db, repeats) \
                | {"load_avg_1m_before": round(load, 2),
                   "load_avg_1m_after": round(os.getloadavg()[0], 2), "env": env}
            _common.emit(record, out)


if __name__ == "__main__":
    main()
