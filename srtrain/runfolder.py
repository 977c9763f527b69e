"""The run folder (--out): what a run writes there, its lock, and metrics.jsonl.

One run at a time trains in a folder (``run_lock``); a fresh run never starts over another
run's files (``check_fresh_out``); metrics.jsonl gets whole lines only (``append_line``),
and its records also reach the terminal (``srtrain.console``) and TensorBoard.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager, suppress
from pathlib import Path

from srdata.format import atomic_temporaries
from srdata.publish import try_lock, unlock

from .console import Console


class Logger:
    """metrics.jsonl (one JSON object a line), written by the main process only."""

    def __init__(self, out: Path, main: bool, tensorboard: bool = False,
                 console: bool = False):
        self.path, self.main = out / "metrics.jsonl", main
        self.tb = None
        if main and tensorboard:
            from .tboard import TensorBoard
            self.tb = TensorBoard(out)
        self.console = Console() if main and console else None

    def __call__(self, record: dict) -> None:
        if self.main:
            append_line(self.path, json.dumps(record))
            if self.tb is not None:
                self.tb.record(record)
            if self.console is not None:
                self.console(record)

    def image(self, tag: str, png: Path, step: int) -> None:
        if self.tb is not None:
            self.tb.image(tag, png, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def append_line(path: Path, line: str) -> None:
    """Append ``line`` whole or not at all: after a failed write (a full disk) the file is
    cut back, so no partial line is left for the next run's lines to follow."""
    data = memoryview((line + "\n").encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        os.close(fd)


RUN_FILES = ("last.pt", "best.pt", "config.json", "metrics.jsonl", "samples", "tb")


LOCK = ".lock"


# format.atomic_file's temporary copies of the files a run replaces whole: a run killed
# while saving leaves one behind (a checkpoint's size, hundreds of MB for esrgan)
PARTIAL = re.compile(atomic_temporaries("last.pt", "best.pt", "config.json") + r"\Z")


@contextmanager
def run_lock(out: Path, main: bool = True):
    """Hold OUT/.lock for the run's life, so a second run (or a --resume) into OUT while
    this one trains fails at once instead of mixing their files. Only the main process
    writes in OUT, so only it locks. A folder made here and left empty (the run failed
    before writing anything) is removed again."""
    if not main:
        yield
        return
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd, holder = try_lock(out / LOCK)
    if fd is None:
        who = f"pid {holder}" if holder else "another process"
        raise ValueError(f"another run ({who}) is training in {out}; wait for it to finish "
                         "or stop it, or choose another --out")
    _sweep_partial(out)
    try:
        yield
    finally:
        unlock(out / LOCK, fd)
        if made:
            with suppress(OSError):  # not empty: the run wrote its files
                out.rmdir()


def _sweep_partial(out: Path) -> None:
    """Remove the temporary files of saves that never finished: under OUT/.lock no other
    run is writing them."""
    for entry in os.scandir(out):
        if PARTIAL.match(entry.name) and entry.is_file(follow_symlinks=False):
            with suppress(OSError):
                os.unlink(entry.path)


def run_files(out: Path) -> list[str]:
    """The RUN_FILES names ``out`` holds."""
    return [n for n in RUN_FILES if os.path.lexists(out / n)]


def check_fresh_out(out: Path) -> None:
    """A run without --resume starts only in a folder that holds no run's files."""
    there = run_files(out)
    if not there:
        return
    if "last.pt" in there:
        raise ValueError(f"{out} already holds a run ({', '.join(there)}); pass --resume to "
                         "continue it, or choose another --out")
    raise ValueError(f"{out} already holds {', '.join(there)} of a run with no last.pt to "
                     "resume; choose another --out, or move those away to start over there")
