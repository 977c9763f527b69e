"""Where a pack writes: the destination checks, the lock, the swap into place, its recovery.

A pack builds ``.DB.partial-PID`` next to ``DB`` and publishes it with two renames:
``DB -> .DB.old-PID`` (when replacing), then ``.DB.partial-PID -> DB``, then removes the old
one. Every step is recoverable: an exception rolls the renames back, and a pack killed
(``kill -9``) between or after them leaves names that the next pack, or
``recover_publish``, repairs under the same lock: with no ``DB``, the old database goes back
into place; with the new ``DB`` in place, the old one is removed. ``.DB.lock`` (an
``flock``, released by the kernel when its holder dies) keeps two packs off one ``DB``.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
from pathlib import Path

from . import format as fmt

log = logging.getLogger(__name__)


class PackError(ValueError):
    """The pack cannot run or produced nothing; the message says what to change."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C arrived after the new database was in place; the message says what is where."""


def lock_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.lock"


def own_names(dst: Path) -> re.Pattern:
    """Names a pack into ``dst`` creates next to it (bytes, for the walk of IMAGES)."""
    name = re.escape(os.fsencode(dst.name))
    return re.compile(rb"\.%s\.(lock|partial-\d+|old-\d+)\Z" % name)


def try_lock(path: Path) -> tuple[int | None, str]:
    """(fd holding an ``flock`` on the file ``path``, "") or (None, the holder's pid as
    text, "" if unknown). The kernel releases the lock when its holder dies, even by
    ``kill -9``, so a lock file left behind never blocks anyone."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            return None, holder
        # The holder unlinks the file on release: a lock on an unlinked inode locks nothing.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % os.getpid(), 0)
            return fd, ""
        os.close(fd)


def unlock(path: Path, fd: int) -> None:
    """Release the lock ``try_lock(path)`` took."""
    with contextlib.suppress(OSError):
        path.unlink()
    os.close(fd)


@contextlib.contextmanager
def locked(dst: Path):
    """Hold ``.DB.lock`` or fail fast naming the pack that holds it."""
    try:
        fd, holder = try_lock(lock_path(dst))
    except OSError as e:
        raise PackError(f"cannot write in {dst.parent}: {e.strerror}; choose another DB "
                        "path") from None
    if fd is None:
        who = f"pid {holder}" if holder else "another process"
        raise PackError(f"another pack ({who}) is writing {dst}; wait for it to finish or "
                        "stop it, then run this again")
    try:
        yield
    finally:
        unlock(lock_path(dst), fd)


def prepare_parent(dst: Path) -> None:
    """Create DB's parent folder; one line if a file (or anything else) is in the way."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        for p in (dst.parent, *dst.parent.parents):
            if p.exists() and not p.is_dir():
                raise PackError(f"cannot create {dst}: {p} is a file, not a folder; choose "
                                "another DB path") from None
        raise PackError(f"cannot create {dst.parent}: {e.strerror}; choose another DB "
                        "path") from None


def check_destination(dst: Path, overwrite: bool, src: Path | None = None) -> None:
    """Refuse a DB that is, holds or lies above IMAGES, and any non-empty DB that is not
    ours; a database of ours is replaced only with ``overwrite``."""
    if src is not None:
        s, d = src.resolve(), dst.resolve()
        if s == d or s.is_relative_to(d):
            what = "is" if s == d else "contains"
            raise PackError(f"DB {dst} {what} the image folder {src}; packing there would "
                            "replace the images: choose a DB path outside IMAGES")
    if (dst.exists() or dst.is_symlink()) and not dst.is_dir():
        raise PackError(f"{dst} exists and is not a directory; choose another DB path")
    if os.path.ismount(dst):
        # a pack builds beside DB (on the parent's disk) and renames the result into
        # place, which a mount point refuses (EBUSY): say so before packing, not after
        raise PackError(f"{dst} is a mount point, and a pack builds the database beside DB, "
                        f"then renames it into place; pack into a folder inside it, such as "
                        f"{dst / 'db'}")
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    foreign = not_ours(dst)
    if foreign:
        raise PackError(f"{dst} is not an srpipe database ({foreign}); --overwrite only "
                        "replaces srpipe databases, so move its contents away or choose "
                        "another DB path")
    if not overwrite:
        raise PackError(f"{dst} already holds a database; pass --overwrite to replace it, "
                        "or choose another DB path")


# the files a pack writes, with format.atomic_file's temporary names (and older srpipe's)
_DB_ENTRIES = re.compile(r"(manifest\.json|index\.(?:json|bin))(\.tmp)?\Z|"
                         + fmt.atomic_temporaries("manifest.json", "index.json", "index.bin")
                         + r"\Z|shard-\d{5}\Z")
_SHARD_ENTRIES = {"data.mdb", "lock.mdb"}


def not_ours(dst: Path) -> str:
    """Why ``dst`` is not a database that srpipe wrote ("" if it is): only our manifest and
    the files a pack writes, so replacing it deletes nothing else."""
    try:
        manifest = json.loads((dst / fmt.MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {fmt.MANIFEST}"
    except (OSError, ValueError) as e:
        return f"{fmt.MANIFEST} is unreadable: {e}"
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT_NAME:
        return f"{fmt.MANIFEST} is not an srpipe manifest"
    for entry in sorted(os.scandir(dst), key=lambda e: e.name):
        if not _DB_ENTRIES.match(entry.name) or entry.is_symlink():
            return f"it holds {entry.name!r}, which srpipe did not write"
        shard = entry.name.startswith("shard-")
        # a pack writes files by those names: a folder by one of them is someone else's
        if entry.is_dir(follow_symlinks=False) != shard:
            return f"{entry.name} is {'not ' if shard else ''}a folder"
        if shard:
            for e in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if e.name not in _SHARD_ENTRIES or not e.is_file(follow_symlinks=False):
                    return f"it holds {entry.name}/{e.name}, which srpipe did not write"
    return ""


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


def publish(tmp: Path, dst: Path) -> None:
    """Move the finished database ``tmp`` to ``dst``; an old one is removed only after.

    On any exception before ``dst`` holds the new database, the old one is put back and the
    exception propagates. Ctrl-C after that raises ``Interrupted``, saying ``dst`` is complete.
    """
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    try:
        if os.path.lexists(dst):
            os.replace(dst, old)
        os.replace(tmp, dst)
        if os.path.lexists(old):
            _remove(old)
    except BaseException as e:
        if os.path.lexists(tmp):  # not published: the old database goes back
            if os.path.lexists(old) and not os.path.lexists(dst):
                os.replace(old, dst)
            raise
        left = (f"; the previous database's remains in {old.name} are removed by the next "
                f"pack to {dst.name}") if os.path.lexists(old) else ""
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"{dst} holds the new database, complete{left}") from None
        if not isinstance(e, OSError):
            raise
        log.warning("%s is complete, but removing the previous database failed (%s)%s",
                    dst, e, left)


def _leftovers(dst: Path) -> dict[str, list[Path]]:
    """What killed packs left next to ``dst``, by kind (``old``, ``partial``); one listing."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(old|partial)-\d+\Z")
    found = {"old": [], "partial": []}
    try:
        for p in dst.parent.iterdir():
            m = pattern.match(p.name)
            if m:
                found[m[1]].append(p)
    except OSError:
        pass
    return {kind: sorted(paths) for kind, paths in found.items()}


def repair(dst: Path) -> list[str]:
    """Undo what a killed pack left around ``dst``; the caller holds the lock, so no pack
    is running on it. Returns what was done (also logged)."""
    done, left = [], _leftovers(dst)
    for old in left["old"]:
        try:
            if not os.path.lexists(dst):
                os.replace(old, dst)
                done.append(f"restored {dst} from {old.name}: a pack was killed while "
                            "replacing it, so the previous database is back")
            else:
                _remove(old)
                done.append(f"removed {old.name}, the previous database that a pack killed "
                            f"after publishing {dst} left behind")
        except OSError as e:
            done.append(f"could not repair {old.name} (left by a killed pack): {e}")
    for part in left["partial"]:
        shutil.rmtree(part, ignore_errors=True)
        done.append(f"removed {part.name}, left by an interrupted pack")
    for line in done:
        log.warning("%s", line)
    return done


def recover_publish(dst: str | os.PathLike) -> list[str]:
    """Repair what a pack killed while publishing ``dst`` left behind, if no pack is
    running on it; for readers to call before opening. Returns what was done ([] if
    nothing, or if the lock cannot be taken, e.g. on a read-only file system)."""
    dst = Path(dst)
    if not any(_leftovers(dst).values()):
        return []
    try:
        fd, _ = try_lock(lock_path(dst))
    except OSError:
        return []
    if fd is None:
        return []
    try:
        return repair(dst)  # lists again: another process may have repaired it meanwhile
    finally:
        unlock(lock_path(dst), fd)


def write_failure(dst: Path, e: BaseException) -> str:
    """One line for a failed write (disk full, I/O error, read-only), free space included."""
    try:
        free = shutil.disk_usage(dst.parent).free
    except OSError:
        free = None
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
        free is not None and free < 64 << 20)
    where = f"the disk holding {dst.parent} is full" if full else f"writing {dst} failed"
    space = f" ({free / (1 << 20):.1f} MiB free)" if free is not None else ""
    return (f"{where}{space}: {e}; nothing was written to {dst} (a database already there "
            "is unchanged): free some space or choose another DB path")
