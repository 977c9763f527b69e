"""Describe a database (``srdata inspect``) and check every record (``srdata verify``)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from . import format as fmt
from .reader import PackedDB
from .shards import open_shard
from .warm import shard_files


def _check_described(db: PackedDB) -> None:
    """The manifest's fields that only ``inspect`` shows (reading needs none of them, so
    ``format.read_manifest`` leaves them be), checked before they are shown."""
    m = db.manifest
    path = db.path / fmt.MANIFEST
    skipped = m.get("skipped")
    if not isinstance(skipped, list) or not all(
            isinstance(s, dict) and {"path", "reason"} <= s.keys() for s in skipped):
        raise fmt._bad_manifest(path, "skipped is not a list of {\"path\": ..., "
                                      "\"reason\": ...} entries")
    if not isinstance(m.get("source_root"), str):
        raise fmt._bad_manifest(path, f"source_root is {m.get('source_root')!r}, expected a "
                                      "path")
    sizes = [("bytes", m.get("bytes"))] + [(f"{s['name']}'s {k}", s.get(k))
                                          for s in m["shards"] for k in ("count", "bytes")]
    for key, value in sizes:
        if value is not None and (type(value) is not int or value < 0):
            raise fmt._bad_manifest(path, f"{key} is {value!r}, expected a whole number")


def describe(db: PackedDB) -> dict:
    _check_described(db)
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
        "shards": [{k: s.get(k) for k in ("name", "count", "bytes")} for s in m["shards"]],
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
        "id": m.get("id"),
    }


def _check_record(db: PackedDB, i: int) -> str | None:
    """One line naming the key if record ``i`` is missing, damaged (LMDB error, crc32 or
    size mismatch) or does not decode to its index shape."""
    try:
        value = db.read(i)  # checks the crc32 and names the key and the cause
    except fmt.DBError as e:
        msg = str(e)
        return msg[len(f"{db.path}: "):] if msg.startswith(f"{db.path}: ") else msg
    rec = db.records[i]
    try:
        fmt.decode_image(value, db.codec, rec.shape)
    except fmt.DBError as e:
        return f"key {rec.key} (image {i}, from {rec.path}): {e}"
    return None


def _open_shards(db: PackedDB) -> dict[int, str]:
    """Shard number -> why it cannot be read at all (missing, truncated, not LMDB...)."""
    broken = {}
    for k, shard in enumerate(db.manifest["shards"]):
        path = db.path / shard["name"]
        if not (path / "data.mdb").is_file():
            broken[k] = f"{shard['name']}: {path / 'data.mdb'} is missing"
            continue
        try:
            open_shard(path, db.identity)
        except fmt.DBError as e:
            broken[k] = f"{shard['name']}: {e}"
    return broken


def verify(db: PackedDB, progress: bool = True) -> list[str]:
    """Decode every record and check its crc32 and shape; returns one line per problem.

    A shard that cannot be opened (missing, truncated, damaged) is one line stating why, not
    one per key. A BasicSR LMDB records no checksums: its records are only decoded and their
    shapes checked against their PNG headers."""
    problems = []
    for shard in db.manifest["shards"]:
        path = db.path / shard["name"] / "data.mdb"
        if path.is_file() and fmt.sha256_file(path) != shard.get("sha256"):
            problems.append(f"{shard['name']}: data.mdb sha256 differs from the manifest "
                            "(file modified since packing)")
    broken = _open_shards(db)
    problems += [broken[k] + f" ({int((db.records.shard == k).sum())} records unreadable)"
                 for k in sorted(broken)]
    ids = np.flatnonzero(~np.isin(db.records.shard, list(broken)))
    threads = min(8, len(os.sched_getaffinity(0)))  # OpenCV decode releases the GIL
    with ThreadPoolExecutor(threads) as ex:
        results = ex.map(lambda i: _check_record(db, int(i)), ids)
        for problem in tqdm(results, total=len(ids), unit="img", desc="verifying",
                            disable=not progress, dynamic_ncols=True):
            if problem:
                problems.append(problem)
    return problems


def warnings(db) -> list[str]:
    """What is odd but readable: a BasicSR meta_info.txt listing shapes that differ from
    the stored images (BasicSR trains on those, and so do we, at the stored size)."""
    out = []
    for i, h, w in getattr(db, "mismatches", []):
        rec = db.records[i]
        out.append(f"key {rec.key!r} (image {i}): meta_info.txt lists {h}x{w} (HxW), the "
                   f"stored PNG is {rec.height}x{rec.width}; reading it at the stored size")
    return out
