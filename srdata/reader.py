"""Read-only access to a packed database, safe in forked or spawned workers.

LMDB environments are opened lazily, per process, read-only with ``lock=False`` (nothing
writes a published database) and ``readahead=False`` (training reads at random). Pickling a
reader drops nothing it needs: environments live in a per-process table, so a DataLoader
worker or a DALI source process opens its own on first use instead of sharing a handle
across fork.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import lmdb
import numpy as np

from . import format as fmt

# LMDB allows one Environment per file per process (py-lmdb refuses a second open), so every
# reader of the same shard in this process shares one; rebuilt after a fork.
_ENVS: dict[str, lmdb.Environment] = {}
_ENVS_PID = os.getpid()
_ENVS_LOCK = threading.Lock()


def open_shard(path: Path) -> lmdb.Environment:
    """The process's read-only Environment for the shard directory ``path``."""
    global _ENVS, _ENVS_PID
    key = os.path.realpath(path)
    env = _ENVS.get(key)
    if env is not None and _ENVS_PID == os.getpid():
        return env
    with _ENVS_LOCK:
        if _ENVS_PID != os.getpid():  # inherited over fork: never reuse the parent's handles
            _ENVS, _ENVS_PID = {}, os.getpid()
        env = _ENVS.get(key)
        if env is None:
            try:
                env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False,
                                max_readers=fmt.MAX_READERS, subdir=True)
            except lmdb.Error as e:
                raise fmt.DBError(f"cannot open LMDB {path}: {e}; the database is "
                                  "incomplete or damaged, pack or copy it again") from e
            _ENVS[key] = env
        return env


class PackedDB:
    """An srpipe database: ``len(db)`` images, ``db.read(i)`` bytes, ``db.image(i)`` RGB."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = fmt.read_manifest(self.path)
        self.codec = self.manifest["codec"]
        if self.codec not in fmt.CODECS:
            raise fmt.DBError(f"{self.path} uses codec {self.codec!r}, this srpipe reads "
                              f"{', '.join(fmt.CODECS)}")
        self.records = fmt.read_index(self.path, self.manifest)
        self.heights = np.array([r.height for r in self.records], np.int64)
        self.widths = np.array([r.width for r in self.records], np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def read(self, i: int) -> bytes:
        """The stored value of image ``i``; DBError names the key if it is missing."""
        rec = self.records[i]
        env = open_shard(self.path / fmt.shard_name(rec.shard))
        with env.begin(buffers=False) as txn:
            value = txn.get(rec.key.encode())
        if value is None:
            raise fmt.DBError(f"{self.path}: key {rec.key} (image {i}, from {rec.path}) is "
                              f"missing from {fmt.shard_name(rec.shard)}; pack the database "
                              "again")
        return value

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as HxWx3 uint8 RGB."""
        rec = self.records[i]
        try:
            return fmt.decode_image(self.read(i), self.codec, rec.shape)
        except fmt.DBError as e:
            raise fmt.DBError(f"{self.path}: key {rec.key} (from {rec.path}): {e}") from None


def open_db(path: str | os.PathLike):
    """An srpipe database (PackedDB) or a BasicSR LMDB (BasicSRDB), whichever ``path`` holds."""
    from .basicsr import META, BasicSRDB  # basicsr builds on this module: import it late
    p = Path(path)
    if (p / fmt.MANIFEST).is_file():
        return PackedDB(p)
    if (p / META).is_file() and (p / "data.mdb").is_file():
        return BasicSRDB(p)
    return PackedDB(p)  # its error names the path and says how to pack
