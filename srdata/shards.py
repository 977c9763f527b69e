"""The process's LMDB environments: one per shard file, opened read-only on first use.

LMDB allows one Environment per file per process (py-lmdb refuses a second open), so every
reader of a shard in this process (``srdata.reader.PackedDB``,
``srdata.basicsr.BasicSRDB``, ``srdata verify``) shares one; the table is rebuilt after a
fork.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import lmdb

from . import format as fmt

# Each entry remembers the database identity it was checked against.
_ENVS: dict[str, tuple[lmdb.Environment, str | None]] = {}
_ENVS_PID = os.getpid()
_ENVS_LOCK = threading.Lock()
# (st_dev, st_ino) of each Environment's data.mdb when it was opened: see forget_replaced
_FILES: dict[str, tuple[int, int]] = {}


def _check_identity(db: Path, expected: str) -> None:
    try:
        now = fmt.identity(fmt.read_manifest(db))
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
