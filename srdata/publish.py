"""Where a pack writes: the destination checks, the lock, the swap into place, its recovery.

A pack builds ``.DB.partial-PID`` next to ``DB`` and publishes it with two renames:
``DB -> .DB.old-PID`` (when replacing), then ``.DB.partial-PID -> DB``, then removes the old
one. Before the first rename it writes the journal ``.DB.publish-PID``: the identities of
the database it sets aside and of the one it puts in place. An exception rolls the renames
back; a pack killed (``kill -9``) between or after them leaves names that the next pack, or
``recover_publish``, repairs under the same lock: with no ``DB``, the one database set
aside goes back into place; with the journal's new database at ``DB``, the journal's old
one is removed. Whatever recovery cannot prove to be such a leftover (no journal, two
databases set aside, a ``DB`` that is not the one published, files srpipe does not write)
stays where it is, and a warning says what to do with it. ``.DB.lock`` (an ``flock``,
released by the kernel when its holder dies) keeps two packs off one ``DB``. No file here
is written through a symbolic or hard link (``format.open_own``, ``format.create_own``).
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
    return re.compile(rb"\.%s\.(lock|partial-\d+|old-\d+|publish-\d+)\Z" % name)


def try_lock(path: Path) -> tuple[int | None, str]:
    """(fd holding an ``flock`` on the file ``path``, "") or (None, the holder's pid as
    text, "" if unknown). The kernel releases the lock when its holder dies, even by
    ``kill -9``, so a lock file left behind never blocks anyone. A link at ``path`` is
    never written through: ``format.NotOurFile``."""
    while True:
        fd = fmt.open_own(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            return None, holder
        # The holder unlinks the file on release: a lock on an unlinked inode locks nothing.
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % os.getpid(), 0)
            return fd, ""
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether the name ``path`` (not followed) is still the file open as ``fd``."""
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        return False


def unlock(path: Path, fd: int) -> None:
    """Release the lock ``try_lock(path)`` took; its file is removed only if still ours."""
    with contextlib.suppress(OSError):
        if _same_file(fd, path):
            path.unlink()
    os.close(fd)


@contextlib.contextmanager
def locked(dst: Path):
    """Hold ``.DB.lock`` or fail fast naming the pack that holds it."""
    try:
        fd, holder = try_lock(lock_path(dst))
    except fmt.NotOurFile as e:
        raise PackError(f"cannot lock {dst}: {e}") from None
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
    return _foreign_entries(dst)


def _foreign_entries(folder: Path) -> str:
    """The first entry of ``folder`` that a pack does not write there, as a reason ("" if
    none): a database, or the partial one a pack builds."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
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


def _what(path: Path) -> tuple[str, str | None]:
    """("db", its identity) for a complete srpipe database, ("empty", None) for an empty
    folder (what a pack may replace), else ("other", why it is neither)."""
    if path.is_symlink() or not path.is_dir():
        return "other", "it is not a folder"
    try:
        if not any(os.scandir(path)):
            return "empty", None
        why = not_ours(path)
        if why:
            return "other", why
        return "db", fmt.identity(json.loads((path / fmt.MANIFEST).read_text()))
    except (OSError, ValueError) as e:
        return "other", f"it is unreadable: {e}"


def _delete(path: Path, kind: str) -> None:
    """Delete what ``_what`` found ``kind`` ("db" or "empty") at ``path``."""
    assert kind in ("db", "empty"), kind
    if kind == "empty":
        path.rmdir()  # fails if something arrived meanwhile: that stays
    else:
        shutil.rmtree(path)


def old_path(dst: Path, pid: int | str) -> Path:
    return dst.parent / f".{dst.name}.old-{pid}"


def journal_path(dst: Path, pid: int | str) -> Path:
    return dst.parent / f".{dst.name}.publish-{pid}"


def _write_journal(path: Path, old: tuple[str, str | None], new: str) -> None:
    """Record what a publish sets aside (``_what`` of DB) and what it puts in place (the
    new database's identity), so recovery can tell its leftovers from anything else."""
    data = json.dumps({"format": "srpipe-publish", "old": list(old), "new": new}).encode()
    fd = fmt.create_own(path)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_journal(path: Path) -> dict | None:
    """A journal ``_write_journal`` wrote, or None (missing, a link, cut short)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        journal = json.loads(os.read(fd, 1 << 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    ok = (isinstance(journal, dict) and journal.get("format") == "srpipe-publish"
          and isinstance(journal.get("old"), list) and isinstance(journal.get("new"), str))
    return {"old": tuple(journal["old"]), "new": journal["new"]} if ok else None


def _drop_journal(path: Path) -> None:
    """Remove a journal: srpipe's name, and a plain file with no other name."""
    with contextlib.suppress(OSError):
        if not fmt._foreign(path, os.lstat(path)):
            path.unlink()


def publish(tmp: Path, dst: Path) -> None:
    """Move the finished database ``tmp`` to ``dst``; an old one is removed only after, and
    only if it still is what was at ``dst`` when the swap began (else it is kept, logged).

    On any exception before ``dst`` holds the new database, the old one is put back and the
    exception propagates. Ctrl-C after that raises ``Interrupted``, saying ``dst`` is complete.
    """
    old, journal = old_path(dst, os.getpid()), journal_path(dst, os.getpid())
    replacing = os.path.lexists(dst)
    was = _what(dst) if replacing else None
    if was is not None and was[0] == "other":  # checked before packing: it changed since
        raise PackError(f"{dst} changed while the pack ran and is no longer an srpipe "
                        f"database ({was[1]}); it is left as it is: move its contents away "
                        "or choose another DB path, then pack again")
    try:
        if replacing:
            new = fmt.identity(json.loads((tmp / fmt.MANIFEST).read_text()))
            _write_journal(journal, was, new)
            os.replace(dst, old)
        os.replace(tmp, dst)
        if replacing:
            _drop_old(old, was)
            _drop_journal(journal)
    except BaseException as e:
        if os.path.lexists(tmp):  # not published: the old database goes back
            if os.path.lexists(old) and not os.path.lexists(dst):
                os.replace(old, dst)
            if not os.path.lexists(old):
                _drop_journal(journal)
            raise
        left = (f"; the previous database's remains in {old.name} are removed by the next "
                f"pack to {dst.name}") if os.path.lexists(old) else ""
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"{dst} holds the new database, complete{left}") from None
        if not isinstance(e, OSError):
            raise
        log.warning("%s is complete, but removing the previous database failed (%s)%s",
                    dst, e, left)


def _drop_old(old: Path, was: tuple[str, str | None]) -> None:
    now = _what(old)
    if now == was:
        _delete(old, now[0])
    else:  # someone wrote into DB while the pack ran: theirs, so kept
        log.warning("kept %s, the folder this pack replaced: it changed while the pack ran "
                    "(%s); delete it when you no longer need it", old, now[1] or now[0])


def _leftovers(dst: Path) -> dict[str, dict[str, Path]]:
    """What killed packs left next to ``dst``, by kind (``old``, ``partial``, ``publish``),
    each {pid: path}, in pid order; one listing."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(old|partial|publish)-(\d+)\Z")
    found = {"old": {}, "partial": {}, "publish": {}}
    try:
        for p in dst.parent.iterdir():
            m = pattern.match(p.name)
            if m:
                found[m[1]][m[2]] = p
    except OSError:
        pass
    return {kind: dict(sorted(paths.items(), key=lambda kv: int(kv[0])))
            for kind, paths in found.items()}


def repair(dst: Path) -> list[str]:
    """Undo what a killed pack left around ``dst``; the caller holds the lock, so no pack
    is running on it. Only what a journal or the format proves to be a pack's leftover is
    moved or removed. Returns what was done or left, and why (also logged)."""
    left = _leftovers(dst)
    journals = {pid: _read_journal(p) for pid, p in left["publish"].items()}
    if os.path.lexists(dst):
        done = [_settle_old(dst, old, journals.get(pid)) for pid, old in left["old"].items()]
    else:
        done = _restore(dst, left["old"], journals)
    for pid, path in left["publish"].items():  # its old one is back, removed, or never was
        if not os.path.lexists(old_path(dst, pid)):
            _drop_journal(path)
    missing = not os.path.lexists(dst) and left["old"]
    for part in left["partial"].values():
        # with DB missing and not restored, a finished one may be the database to put there
        done.append(f"kept {part.name}: {dst.name} is missing, and it may hold the database "
                    "a killed pack finished" if missing else _clear_partial(part))
    for line in done:
        log.warning("%s", line)
    return done


def _settle_old(dst: Path, old: Path, journal: dict | None) -> str:
    """A database set aside next to an existing ``dst``: removed if its journal proves the
    pack that set it aside published ``dst``."""
    now, at_dst = _what(old), _what(dst)
    if at_dst[0] != "db":
        return (f"kept {old.name}, the previous database of {dst}: {dst.name} is not a "
                f"complete srpipe database ({at_dst[1] or 'an empty folder'}), so "
                f"{old.name} may be the only copy; move {dst.name} away and rename "
                f"{old.name} to {dst.name} to get it back")
    if journal is None or at_dst[1] != journal["new"]:
        return (f"kept {old.name}: set aside by a pack to {dst.name}, but nothing records "
                f"that the database now at {dst.name} replaced it; delete it once you no "
                "longer need it")
    if now != journal["old"]:
        return (f"kept {old.name}: it is not what the pack that set it aside recorded; "
                "delete it once you no longer need it")
    try:
        _delete(old, now[0])
    except OSError as e:
        return f"could not remove {old.name} (left by a killed pack): {e}"
    return (f"removed {old.name}, the previous database that a pack killed after publishing "
            f"{dst} left behind")


def _restore(dst: Path, olds: dict[str, Path], journals: dict) -> list[str]:
    """No ``dst``: put back the one database a killed pack set aside, if there is one."""
    if not olds:
        return []
    if len(olds) > 1:
        names = ", ".join(p.name for p in olds.values())
        return [f"{dst} is missing and {len(olds)} earlier databases were set aside by "
                f"killed packs ({names}); srpipe does not choose between them: rename the "
                f"one you want to {dst.name}"]
    (pid, old), = olds.items()
    now, journal = _what(old), journals.get(pid)
    if now[0] == "other" or (journal is not None and now != journal["old"]):
        return [f"kept {old.name}: {now[1] or 'it changed after a pack set it aside'}; "
                f"it is not put back at {dst.name}"]
    try:
        os.replace(old, dst)
    except OSError as e:
        return [f"could not restore {dst} from {old.name} (left by a killed pack): {e}"]
    return [f"restored {dst} from {old.name}: a pack was killed while replacing it, so the "
            "previous database is back"]


def _clear_partial(part: Path) -> str:
    """Remove a database a killed pack was building, if it holds only what a pack writes."""
    why = "it is not a folder" if part.is_symlink() or not part.is_dir() else ""
    try:
        why = why or _foreign_entries(part)
        if not why:
            shutil.rmtree(part)
            return f"removed {part.name}, left by an interrupted pack"
    except OSError as e:
        why = str(e)
    return f"kept {part.name}, named as a pack's unfinished database: {why}; delete it yourself"


def recover_publish(dst: str | os.PathLike) -> list[str]:
    """Repair what a pack killed while publishing ``dst`` left behind, if no pack is
    running on it; for readers to call before opening. Returns what was done ([] if
    nothing, or if the lock cannot be taken, e.g. on a read-only file system)."""
    dst = Path(dst)
    if not any(_leftovers(dst).values()):
        return []
    try:
        fd, _ = try_lock(lock_path(dst))
    except fmt.NotOurFile as e:
        log.warning("not repairing what a killed pack left next to %s: %s", dst, e)
        return []
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
