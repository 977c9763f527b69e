"""Worker processes that end with the process that started them.

A worker blocked on a queue never notices that its parent was killed (SIGKILL, the OOM
killer): it sleeps on for minutes, holding its memory. Linux can signal it instead
(``PR_SET_PDEATHSIG``), but that signal fires when the *thread* that started the worker
exits, not the process; so a worker started from any other thread than the main one
watches its parent's pid from a thread of its own.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
import weakref

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, started_by_main_thread: bool = True,
                    poll_seconds: float = 1.0) -> None:
    """End this process as soon as process ``parent`` dies, even by SIGKILL, and leave
    Ctrl-C to ``parent``.

    Call once, early, in the worker. ``started_by_main_thread``: whether ``parent`` started
    this process from its main thread (else the parent-death signal would come too early,
    when that thread ends, and the pid is polled every ``poll_seconds`` instead)."""
    # Ctrl-C in a terminal interrupts every process of its group: the parent answers it
    # (a checkpoint, one line) and ends its workers; a worker's own KeyboardInterrupt
    # would only add a traceback each to that line
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform != "linux":
        return
    if started_by_main_thread and _set_pdeathsig(signal.SIGKILL):
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        return
    threading.Thread(target=_watch, args=(parent, poll_seconds), daemon=True,
                     name="die-with-parent").start()


def _set_pdeathsig(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, poll_seconds: float) -> None:
    # an orphan is re-parented (to init or a subreaper), so its parent pid changes
    while os.getppid() == parent:
        time.sleep(poll_seconds)
    os._exit(1)


def main_script_problem() -> str | None:
    """Why spawned processes could not re-import the main script, or None when they can.

    A spawned process (a DataLoader or DALI worker) first runs the parent's main script
    again from its file, before it can unpickle anything; a script fed on standard input
    (``python - < train.py``) has no file, and every worker would die without saying why."""
    import multiprocessing.process
    main = sys.modules.get("__main__")
    if getattr(main, "__spec__", None) is not None:  # python -m: re-imported by name
        return None
    path = getattr(main, "__file__", None)
    if path is None:  # an interactive session or -c: workers do not run the main script
        return None
    if os.path.basename(path) == "<stdin>":
        return "it came from standard input (python - < script.py)"
    if not os.path.isabs(path) and multiprocessing.process.ORIGINAL_DIR is not None:
        path = os.path.join(multiprocessing.process.ORIGINAL_DIR, path)
    return None if os.path.isfile(path) else f"its file {path} is gone"


class WorkerDied(RuntimeError):
    """A worker process this one was waiting on has died (killed, or crashed)."""


def raise_when_a_worker_dies(owner, check) -> None:
    """While ``owner`` lives, on SIGCHLD, raise ``WorkerDied(check(owner))`` in the main
    thread when ``check`` returns a message (a worker of ``owner`` has died); once.

    A main thread blocked on a dead worker may never wake (DALI's task queue waits forever
    for a killed worker to take a task); the signal interrupts that wait, and the handler's
    exception ends it. Only the main thread can install handlers: elsewhere this does
    nothing. One handler serves every owner; an earlier one (e.g. PyTorch's DataLoader's)
    is still called."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return
    installed = signal.getsignal(signal.SIGCHLD)
    if not hasattr(installed, "watched"):
        previous = installed

        def installed(signum, frame):
            if callable(previous):
                previous(signum, frame)
            for entry in list(installed.watched):
                owner_now = entry[0]()
                message = entry[1](owner_now) if owner_now is not None else None
                if owner_now is None or message:
                    installed.watched.remove(entry)
                if message:
                    raise WorkerDied(message)
        installed.watched = []
        signal.signal(signal.SIGCHLD, installed)
        threading.Thread(target=_nudge, args=(installed.watched,), daemon=True,
                         name="srpipe-worker-deaths").start()
    installed.watched.append((weakref.ref(owner), check))


def _nudge(watched: list, seconds: float = 0.5) -> None:
    """The kernel hands SIGCHLD to any one thread; when that is not the main thread, a main
    thread blocked in an uninterruptible wait never runs the handler. Signal it directly."""
    main = threading.main_thread()
    while main.is_alive():
        time.sleep(seconds)
        if any(_has_a_dead_worker(ref, check) for ref, check in list(watched)):
            signal.pthread_kill(main.ident, signal.SIGCHLD)


def _has_a_dead_worker(ref, check) -> bool:
    # The owner is held only for this call: a loop variable in _nudge would keep the last
    # owner (a loader with its pipeline, workers and device memory) alive while it sleeps,
    # and so for good.
    owner = ref()
    return owner is not None and bool(check(owner))


def killed(exitcode: int | None) -> str | None:
    """How a process with this ``multiprocessing`` exit code was ended by a signal, or None
    (still running, exited, or told to stop: SIGTERM is how pools end their workers)."""
    if exitcode is None or exitcode >= 0 or exitcode == -signal.SIGTERM:
        return None
    try:
        return f"killed by {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"killed by signal {-exitcode}"


def shm_space() -> str:
    """How full /dev/shm is: the loaders' workers hand their batches over there, and a
    container's default (Docker: 64 MB) runs out (a DALI worker then dies of SIGBUS)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return "no /dev/shm"
    mib = st.f_frsize / 2**20
    digits = 0 if st.f_blocks * mib >= 10 else 1
    return (f"/dev/shm has {st.f_bavail * mib:.{digits}f} of {st.f_blocks * mib:.{digits}f} "
            "MiB free")
