"""Put a database into the OS page cache before training (``srdata warm``), or drop it.

Training reads records at random; from a cold cache each read is a disk seek, and the first
epoch runs at the disk's random-read speed rather than the decoder's. Reading every shard
once, front to back, is the quickest way to get the whole database into memory. ``evict``
drops a database's pages again (``POSIX_FADV_DONTNEED``, no root needed), so a benchmark
can measure a cold start without flushing the whole machine's cache.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from tqdm import tqdm

CHUNK = 8 << 20


def shard_files(db) -> list[Path]:
    """The LMDB data files of an srpipe database or a BasicSR LMDB."""
    shards = db.manifest.get("shards") or []
    if not shards:  # BasicSR: the directory is one environment
        return [db.path / "data.mdb"]
    return [db.path / s["name"] / "data.mdb" for s in shards]


def available_memory() -> int | None:
    """Bytes the kernel says it can give without swapping (MemAvailable), if it says."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def warm(db, progress: bool = True) -> dict:
    """Read every shard sequentially; returns bytes, seconds and GiB/s."""
    files = shard_files(db)
    total = sum(f.stat().st_size for f in files)
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="warming",
              disable=not progress, dynamic_ncols=True) as bar:
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    bar.update(n)
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": round(seconds, 3),
            "gib_per_s": round(total / (1 << 30) / max(seconds, 1e-9), 2)}


def evict(db) -> int:
    """Ask the kernel to drop the database's cached pages; returns the bytes concerned."""
    total = 0
    for path in shard_files(db):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total
