"""Describe a database (``srdata inspect``) and check every record (``srdata verify``)."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from . import format as fmt
from .reader import PackedDB
from .warm import shard_files


def describe(db: PackedDB) -> dict:
    m = db.manifest  # a BasicSR LMDB's manifest lacks what srpipe records at pack time
    nbytes = m.get("bytes") or sum(f.stat().st_size for f in shard_files(db))
    short = np.minimum(db.heights, db.widths)
    pct = lambda a, q: int(np.percentile(a, q))  # noqa: E731
    return {
        "path": str(db.path),
        "format": m.get("format", fmt.FORMAT_NAME),
        "format_version": m.get("format_version"),
        "count": len(db),
        "codec": db.codec,
        "params": m.get("params", {}),
        "bytes": nbytes,
        "bytes_per_image": round(nbytes / len(db)),
        "shards": [{k: s[k] for k in ("name", "count", "bytes")} for s in m["shards"]],
        "sizes": {
            "height": {"min": int(db.heights.min()), "median": pct(db.heights, 50),
                       "max": int(db.heights.max())},
            "width": {"min": int(db.widths.min()), "median": pct(db.widths, 50),
                      "max": int(db.widths.max())},
            "short_side": {"min": int(short.min()), "p10": pct(short, 10),
                           "median": pct(short, 50), "max": int(short.max())},
        },
        "skipped": m["skipped"],
        "source_root": m["source_root"],
        "created": m.get("created"),
    }


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_record(db: PackedDB, rec: fmt.Record, checksums: bool) -> str | None:
    where = f"key {rec.key} (image {rec.id}, from {rec.path})"
    try:
        value = db.read(rec.id)
    except fmt.DBError:
        return f"{where}: missing from {fmt.shard_name(rec.shard)}"
    if checksums and (len(value) != rec.nbytes or fmt.crc32(value) != rec.crc32):
        return (f"{where}: checksum mismatch ({len(value)} bytes, crc32 "
                f"{fmt.crc32(value):08x}; index says {rec.nbytes} bytes, {rec.crc32:08x})")
    try:
        fmt.decode_image(value, db.codec, rec.shape)
    except fmt.DBError as e:
        return f"{where}: {e}"
    return None


def verify(db: PackedDB, progress: bool = True) -> list[str]:
    """Decode every record and check its crc32 and shape; returns one line per problem.

    A BasicSR LMDB records no checksums: its records are only decoded and their shapes
    checked against meta_info.txt."""
    problems = []
    checksums = db.manifest.get("format") == fmt.FORMAT_NAME
    for shard in db.manifest["shards"]:
        path = db.path / shard["name"] / "data.mdb"
        if not path.is_file():
            problems.append(f"{shard['name']}: {path} is missing")
        elif _sha256(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: data.mdb sha256 differs from the manifest "
                            "(file modified since packing)")
    missing = {s["name"] for s in db.manifest["shards"]
               if not (db.path / s["name"] / "data.mdb").is_file()}
    records = [r for r in db.records if fmt.shard_name(r.shard) not in missing]
    problems += [f"key {r.key} (image {r.id}, from {r.path}): shard {fmt.shard_name(r.shard)} "
                 "is missing" for r in db.records if fmt.shard_name(r.shard) in missing]
    threads = min(8, len(os.sched_getaffinity(0)))  # OpenCV decode releases the GIL
    with ThreadPoolExecutor(threads) as ex:
        results = ex.map(lambda r: _check_record(db, r, checksums), records)
        for problem in tqdm(results, total=len(records), unit="img", desc="verifying",
                            disable=not progress, dynamic_ncols=True):
            if problem:
                problems.append(problem)
    return problems
