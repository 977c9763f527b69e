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
from . import publish

# LMDB allows one Environment per file per process (py-lmdb refuses a second open), so every
# reader of the same shard in this process shares one; rebuilt after a fork. Each entry
# remembers the database identity it was checked against.
_ENVS: dict[str, tuple[lmdb.Environment, str | None]] = {}
_ENVS_PID = os.getpid()
_ENVS_LOCK = threading.Lock()
# (st_dev, st_ino) of each Environment's data.mdb when it was opened: see forget_replaced
_FILES: dict[str, tuple[int, int]] = {}


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


def _check_identity(db: Path, expected: str) -> None:
    try:
        now = identity(fmt.read_manifest(db))
    except fmt.DBError as e:
        now = f"unreadable: {e}"
    if now != expected:
        raise fmt.DBError(f"{db} was packed again or replaced after it was opened (database "
                          f"id {expected[:12]}, now {now[:12]}); reading on would mix old and "
                          "new images: restart training with the new database")


def _check_size(env: lmdb.Environment, path: Path) -> None:
    """A data.mdb shorter than the LMDB's last used page (a partial copy, a full disk)
    would kill the process with SIGBUS on the first read past its end."""
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = os.path.getsize(path / "data.mdb")
    if have < need:
        raise fmt.DBError(f"{path.parent}: {path.name}/data.mdb is truncated: {have} of {need} "
                          "bytes; copy or pack it again")


def open_shard(path: Path, db_identity: str | None = None) -> lmdb.Environment:
    """The process's read-only Environment for the shard directory ``path``.

    Checked once per process and shard: the file is complete, and (``db_identity`` given)
    the database in ``path.parent`` is still the pack the caller opened."""
    global _ENVS, _ENVS_PID
    key = os.path.realpath(path)
    env, ident = _ENVS.get(key, (None, None))
    if env is not None and _ENVS_PID == os.getpid() and ident == db_identity:
        return env
    with _ENVS_LOCK:
        if _ENVS_PID != os.getpid():  # inherited over fork: never reuse the parent's handles
            _ENVS, _ENVS_PID = {}, os.getpid()
        env, ident = _ENVS.get(key, (None, None))
        if env is not None and ident == db_identity:
            return env
        if env is not None:  # this process opened another pack at this path before
            if db_identity is not None:
                _check_identity(path.parent, db_identity)
            del _ENVS[key]
            env.close()
        try:
            env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False,
                            max_readers=fmt.MAX_READERS, subdir=True)
        except lmdb.Error as e:
            raise fmt.DBError(f"cannot open LMDB {path}: {e}; the database is "
                              "incomplete or damaged, pack or copy it again") from e
        try:
            _check_size(env, path)
            if db_identity is not None:  # after the open: a swap before or after it shows
                _check_identity(path.parent, db_identity)
        except BaseException:
            env.close()
            raise
        _ENVS[key] = (env, db_identity)
        _FILES[key] = _file_id(key)
        return env


def _file_id(folder: str) -> tuple[int, int] | None:
    try:
        st = os.stat(os.path.join(folder, "data.mdb"))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def forget_replaced(path: Path) -> None:
    """Drop this process's Environment for the LMDB folder ``path`` if its data.mdb is no
    longer the file there (the LMDB was made again at the same path), so the next
    ``open_shard`` maps the file that is there now rather than reading the old one."""
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        if _ENVS_PID == os.getpid() and key in _ENVS and _FILES.get(key) != _file_id(key):
            del _ENVS[key]  # not closed: a read in another thread may still hold it


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
    from .basicsr import META, BasicSRDB  # basicsr builds on this module: import it late
    p = Path(path)
    if (p / fmt.MANIFEST).is_file():
        return PackedDB(p)
    if (p / META).is_file() or (p / "data.mdb").is_file():
        return BasicSRDB(p)  # its error names the file a BasicSR LMDB lacks
    return PackedDB(p)  # its error names the path and says how to pack
