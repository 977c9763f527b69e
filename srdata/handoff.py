"""Large objects for spawned worker processes, handed over through a file, not the start pipe.

A spawned process gets its arguments through a pipe that the parent writes in one go and
the child unpickles as it reads. Unpickling a loader worker's arguments imports torch (or
DALI) before it reaches the dataset, and while the child imports, the parent's write waits
as soon as more than the pipe's 64 KB are still unread. So with a database index in the
arguments (about 44 bytes an image: 4,000 images are 175 KB) the workers started one after
another. On the H100 box 15 torch workers took 60 s to deliver a first batch, 4 workers 15 s.

``Handoff(obj)`` pickles as a file name: the first time it is pickled, it writes ``obj`` to
a temporary file it owns, and each copy unpickled in a worker reads the object back from
that file. The owner removes the file when the Handoff is collected or the process exits normally.

A process ended by a signal it does not handle (SIGKILL, the OOM killer, SIGTERM as
schedulers send it) cannot remove its files, about 44 bytes an image each. So the owner
holds an ``flock`` on each file while it lives (the kernel drops it however the process
ends), and writing a new file removes the files of this kind in the same folder whose lock
is free: their owner is gone. Only files named ``srpipe-handoff-<this host>-*.flock.pkl`` are
swept (a shared folder's locks may not reach other machines), and only after a minute, so
a file another process has just made and not yet locked, and the unlocked
``srpipe-handoff-*.pkl`` of srpipe versions before the lock (and of a folder that cannot
lock), are left alone; so are FIFOs, links (symbolic or hard) and other users' files under
such names.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import os
import pickle
import re
import socket
import stat
import tempfile
import threading
import time
import weakref

try:
    import fcntl
except ImportError:  # not on Windows: files are then left behind as before the lock
    fcntl = None

PREFIX, SUFFIX = "srpipe-handoff-", ".flock.pkl"
GRACE_SECONDS = 60  # a swept file is older: its maker has locked it, if it still lives
OWNER_EXIT_SECONDS = 3  # a worker that finds no file waits this long for its owner to end


def _remove(path: str, owner: int, fd: int | None = None) -> None:
    if os.getpid() != owner:  # a forked child inherits the finalizer, not the file
        return
    try:
        # by name only while the name is still the file we made and hold (``fd``)
        if fd is None or os.path.samestat(os.fstat(fd), os.lstat(path)):
            os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        if fd is not None:
            os.close(fd)  # and with it the lock


def _owner_ended(owner: int | None) -> bool:
    """Whether the process that wrote a worker's file (the worker's parent: loaders start
    their workers themselves) has ended, or ends within OWNER_EXIT_SECONDS. A run that
    stops on an error it reports, or on Ctrl-C, removes its file while a worker may still
    be starting; the kernel hands an orphan to another parent at once."""
    if owner is None or owner == os.getpid():
        return False
    deadline = time.monotonic() + OWNER_EXIT_SECONDS
    while os.getppid() == owner:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _mine() -> str:
    """The start of the names of this machine's files."""
    return PREFIX + re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) + "-"


def _lock(fd: int) -> bool:
    """Take the file's lock without waiting: False when another process holds it or the
    file system cannot lock (then nothing is swept, and nothing is lost)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _create() -> tuple[str, int]:
    """A new file for the object and its descriptor, which holds the file's lock; where the
    lock cannot be taken, a file under a name no sweep matches. The object is written
    through this descriptor, never by name again (``mkstemp`` made the file, O_EXCL)."""
    fd, path = tempfile.mkstemp(prefix=_mine(), suffix=SUFFIX)
    if _lock(fd):
        return path, fd
    os.close(fd)  # unlocked, it would look like a dead run's file to a sweep
    os.unlink(path)
    fd, path = tempfile.mkstemp(prefix=PREFIX, suffix=".pkl")
    return path, fd


def _sweep(folder: str) -> None:
    """Remove the handoff files in ``folder`` that no live process holds."""
    if fcntl is None:  # no locks, so no locked files to tell from dead ones
        return
    for path in glob.glob(os.path.join(glob.escape(folder), f"{_mine()}*{SUFFIX}")):
        # Read only: where flock is emulated by POSIX locks (NFS), which a process's own
        # files do not hold against it, the exclusive lock then fails and nothing is swept.
        # Not blocking on a FIFO, not following a link.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # gone, a link, or another user's
            continue
        try:
            st = os.fstat(fd)
            if (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_nlink == 1
                    and time.time() - st.st_mtime >= GRACE_SECONDS
                    and _lock(fd)  # under our lock, so no other sweep races us to it
                    and os.path.samestat(st, os.lstat(path))):  # the name is still it
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


class Handoff:
    """Holds ``obj``; ``.get()`` returns it, in the owner and in every worker."""

    def __init__(self, obj):
        self._obj, self._path, self._owner = obj, None, None
        self._lock = threading.Lock()  # DALI may pickle from another thread than the owner

    def get(self):
        return self._obj

    def __getstate__(self) -> dict:
        with self._lock:
            if self._path is None:  # pickled for the first time: write the object once
                path, fd = _create()  # fd: the file (and its lock), held while we live
                remove = weakref.finalize(self, _remove, path, os.getpid(), fd)  # at exit too
                try:
                    _sweep(os.path.dirname(path))
                    with os.fdopen(os.dup(fd), "wb") as f:  # fd stays: it holds the lock
                        pickle.dump(self._obj, f, protocol=pickle.HIGHEST_PROTOCOL)
                except BaseException as e:
                    with contextlib.suppress(OSError):  # the error to report is e
                        remove()
                    if isinstance(e, OSError):  # name our file: not the run's --out
                        raise OSError(e.errno, f"{e.strerror} (the data file for loader "
                                      "workers; set TMPDIR to a folder with room)",
                                      path) from None
                    raise
                self._path, self._owner = path, os.getpid()
        return {"path": self._path, "owner": self._owner}

    # Not through pickling, the default for copies: a copy would share our file and could
    # outlive it. A shallow copy is this Handoff; a deep one holds a copy of the object.
    def __copy__(self) -> "Handoff":
        return self

    def __deepcopy__(self, memo) -> "Handoff":
        return Handoff(copy.deepcopy(self._obj, memo))

    def __setstate__(self, state: dict) -> None:
        # Read at once: the owner keeps the file while its loader lives, and so while the
        # loader's workers start, unless the run stops meanwhile.
        path = state["path"]
        try:
            with open(path, "rb") as f:
                obj = pickle.load(f)
        except FileNotFoundError:
            if _owner_ended(state.get("owner")):
                # the run has stopped and said why: a traceback here would be its last line
                raise SystemExit(1) from None
            raise RuntimeError(f"the worker's data file {path} is gone (removed by a "
                               "temporary-file cleaner?); start the run again") from None
        self._obj, self._path, self._lock = obj, path, threading.Lock()
        self._owner = state.get("owner")
