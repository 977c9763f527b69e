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
A process ended by a signal it does not handle (SIGKILL, and SIGTERM as schedulers send
it) leaves its files behind in the temporary folder, named ``srpipe-handoff-*.pkl``: about
44 bytes an image each, safe to delete once the run is gone.
"""
from __future__ import annotations

import copy
import os
import pickle
import tempfile
import threading
import weakref

PREFIX = "srpipe-handoff-"


def _remove(path: str, owner: int) -> None:
    if os.getpid() != owner:  # a forked child inherits the finalizer, not the file
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Handoff:
    """Holds ``obj``; ``.get()`` returns it, in the owner and in every worker."""

    def __init__(self, obj):
        self._obj, self._path = obj, None
        self._lock = threading.Lock()  # DALI may pickle from another thread than the owner

    def get(self):
        return self._obj

    def __getstate__(self) -> dict:
        with self._lock:
            if self._path is None:  # pickled for the first time: write the object once
                fd, path = tempfile.mkstemp(prefix=PREFIX, suffix=".pkl")
                weakref.finalize(self, _remove, path, os.getpid())  # also at exit
                try:
                    with os.fdopen(fd, "wb") as f:
                        pickle.dump(self._obj, f, protocol=pickle.HIGHEST_PROTOCOL)
                except BaseException as e:
                    _remove(path, os.getpid())
                    if isinstance(e, OSError):  # name our file: not the run's --out
                        raise OSError(e.errno, f"{e.strerror} (the data file for loader "
                                      "workers; set TMPDIR to a folder with room)",
                                      path) from None
                    raise
                self._path = path
        return {"path": self._path}

    # Not through pickling, the default for copies: a copy would share our file and could
    # outlive it. A shallow copy is this Handoff; a deep one holds a copy of the object.
    def __copy__(self) -> "Handoff":
        return self

    def __deepcopy__(self, memo) -> "Handoff":
        return Handoff(copy.deepcopy(self._obj, memo))

    def __setstate__(self, state: dict) -> None:
        # Read at once: the owner is inside Process.start() and keeps the file until then.
        path = state["path"]
        try:
            with open(path, "rb") as f:
                obj = pickle.load(f)
        except FileNotFoundError:
            raise RuntimeError(f"the worker's data file {path} is gone (removed by a "
                               "temporary-file cleaner?); start the run again") from None
        self._obj, self._path, self._lock = obj, path, threading.Lock()
