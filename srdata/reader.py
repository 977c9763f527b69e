"""Read-only access to a packed database, safe in forked or spawned workers.

LMDB environments are opened lazily, per process, read-only with ``lock=False`` (nothing
writes a published database) and ``readahead=False`` (training reads at random). Pickling a
reader drops nothing it needs: environments live in a per-process table (``srdata.shards``),
so a DataLoader worker or a DALI source process opens its own on first use instead of
sharing a handle across fork. ``open_db`` opens either kind of database: an srpipe pack
(``PackedDB``, here) or a BasicSR LMDB (``srdata.basicsr``).
"""
from __future__ import annotations

import os
from pathlib import Path

import lmdb
import numpy as np

from . import format as fmt
from . import publish
from .basicsr import META, BasicSRDB
from .shards import open_shard

# a pack's identity (its manifest's id), defined with the format
identity = fmt.identity


def same_database(saved: str | None, now: str | None) -> bool:
    """Whether the identity ``saved`` (a checkpoint's) is that of the database whose identity
    is ``now``. A BasicSR LMDB's identity saved by an earlier srpipe version lacks the
    ``;data:`` part (``BasicSRDB.identity``): it is compared on the part it holds."""
    if saved == now:
        return True
    return (isinstance(saved, str) and isinstance(now, str) and saved.startswith("sha256:")
            and ";" not in saved and now.startswith(saved + ";data:"))


class PackedDB:
    """An srpipe database: ``len(db)`` images, ``db.read(i)`` bytes, ``db.image(i)`` RGB.

    ``db.records`` is a ``format.Index`` (numpy columns; ``db.records[i]`` a ``Record``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        # a pack killed while swapping a new database in may have left the old one aside
        # (.DB.old-PID) and none at DB: put it back, or clear what the swap left (logged)
        publish.recover_publish(self.path)
        self.manifest = fmt.read_manifest(self.path)
        self.codec = self.manifest.get("codec")
        if self.codec not in fmt.CODECS:
            raise fmt.DBError(f"{self.path} uses codec {self.codec!r}, this srpipe reads "
                              f"{', '.join(fmt.CODECS)}")
        self.records = fmt.read_index(self.path, self.manifest)
        self.heights, self.widths = self.records.height, self.records.width
        self.identity = identity(self.manifest)
        # Every read checks the value's crc32 (~1% of a JPEG decode, see
        # benchmarks/loader_throughput.py --crc); off only to measure that cost.
        self._check_crc = True

    def __len__(self) -> int:
        return len(self.records)

    def _where(self, i: int) -> str:
        rec = self.records[i]
        return (f"{self.path}: key {rec.key} (image {i}, from {rec.path}) in "
                f"{fmt.shard_name(rec.shard)}")

    def read(self, i: int) -> bytes:
        """The stored value of image ``i``; DBError names the key if it is missing, damaged
        or does not match the index's crc32."""
        idx = self.records
        shard = int(idx.shard[i])
        try:
            env = open_shard(self.path / fmt.shard_name(shard), self.identity)
            with env.begin(buffers=False) as txn:
                value = txn.get(idx.keys[i])
        except lmdb.Error as e:
            raise fmt.DBError(f"{self._where(i)}: LMDB error: {e}; the shard is damaged, copy "
                              "or pack the database again") from None
        if value is None:
            raise fmt.DBError(f"{self._where(i)}: missing from the shard; pack the database "
                              "again")
        if self._check_crc and (len(value) != idx.nbytes[i] or fmt.crc32(value) != idx.crc32[i]):
            raise fmt.DBError(f"{self._where(i)}: checksum mismatch: {len(value)} bytes, crc32 "
                              f"{fmt.crc32(value):08x}; the index says {idx.nbytes[i]} bytes, "
                              f"{idx.crc32[i]:08x}; copy or pack the database again")
        return value

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as HxWx3 uint8 RGB."""
        idx = self.records
        shape = (int(idx.height[i]), int(idx.width[i]), int(idx.channels[i]))
        value = self.read(i)  # its errors name the database, shard and key already
        try:
            return fmt.decode_image(value, self.codec, shape)
        except fmt.DBError as e:
            rec = self.records[i]
            raise fmt.DBError(f"{self.path}: key {rec.key} (from {rec.path}): {e}") from None


def open_db(path: str | os.PathLike):
    """An srpipe database (PackedDB) or a BasicSR LMDB (BasicSRDB), whichever ``path`` holds."""
    p = Path(path)
    if (p / fmt.MANIFEST).is_file():
        return PackedDB(p)
    if (p / META).is_file() or (p / "data.mdb").is_file():
        return BasicSRDB(p)  # its error names the file a BasicSR LMDB lacks
    return PackedDB(p)  # its error names the path and says how to pack
