import copy
import errno
import gc
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import this_tree
from srdata import handoff
from srdata.handoff import PREFIX, SUFFIX, Handoff


def _theirs():  # files of other programs in the temporary folder are none of our business
    return {n for n in os.listdir(tempfile.gettempdir()) if not n.startswith(PREFIX)}


def _ours():
    return sorted(n for n in os.listdir(tempfile.gettempdir()) if n.startswith(PREFIX))


@pytest.fixture
def temp(monkeypatch, tmp_path):
    """The temporary folder, for this test alone."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read once, then cached
    return tmp_path


def _total(h: Handoff) -> int:
    return int(h.get().sum())


def test_a_handoff_pickles_small_and_reads_back_in_a_spawned_worker(temp):
    big = np.arange(1_000_000, dtype=np.int64)  # 8 MB: far more than a pipe holds
    h = Handoff(big)
    assert h.get() is big and _ours() == []  # no file until the first pickling
    assert len(pickle.dumps(h)) < 500 and len(pickle.dumps(h)) < 500
    assert len(_ours()) == 1  # written once, however often it is pickled
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(_total, [h, h]) == [int(big.sum())] * 2
    del h
    gc.collect()
    assert _ours() == []  # the owner removes its file


def test_only_the_owner_removes_the_file_and_nothing_else(temp):
    (temp / "users-file.pkl").write_bytes(b"keep")
    before = _theirs()
    h = Handoff({"rows": list(range(1000))})
    copy = pickle.loads(pickle.dumps(h))  # what a worker holds
    assert copy.get() == h.get()
    del copy
    gc.collect()
    assert len(_ours()) == 1  # a worker's copy leaves the owner's file alone
    del h
    gc.collect()
    assert _ours() == [] and _theirs() == before
    assert (temp / "users-file.pkl").read_bytes() == b"keep"


def test_a_deep_copy_owns_no_file_of_the_original(temp):
    h = Handoff({"rows": [1, 2]})
    pickle.dumps(h)
    twin = copy.deepcopy(h)
    assert twin.get() == h.get() and twin.get() is not h.get()
    del h
    gc.collect()
    assert _ours() == []
    assert pickle.loads(pickle.dumps(twin)).get() == {"rows": [1, 2]}  # a file of its own


def test_a_process_other_than_the_owner_leaves_the_file(temp):
    """A process forked from the owner inherits its finalizer and runs it at exit: that
    must not delete the file the owner's workers read. (Forking here to run the child's
    exit handlers would hang: they include every library's, in a threaded process.)"""
    h = Handoff([1])
    pickle.dumps(h)
    path = temp / _ours()[0]
    handoff._remove(str(path), os.getpid() + 1)  # the finalizer, run by another process
    assert path.exists()
    handoff._remove(str(path), os.getpid())
    assert not path.exists()


def test_a_shallow_copy_is_the_same_handoff(temp):
    h = Handoff([1])
    assert copy.copy(h) is h


def test_a_full_temporary_folder_is_named(temp, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(handoff.pickle, "dump", full)
    with pytest.raises(OSError, match="data file for loader workers; set TMPDIR") as e:
        pickle.dumps(Handoff([1]))
    assert e.value.errno == errno.ENOSPC and PREFIX in e.value.filename
    assert _ours() == []  # the half-written file is gone


def test_a_vanished_file_is_named(temp):
    h = Handoff([1, 2, 3])
    data = pickle.dumps(h)
    os.unlink(temp / _ours()[0])
    with pytest.raises(RuntimeError, match=r"srpipe-handoff-.*\.pkl is gone.*start the run"):
        pickle.loads(data)


# A worker of OWNER (this script's parent when argv[2] says so) finds the file gone.
ORPHAN = """
import os, pickle, sys, time
from srdata import handoff
data = open(sys.argv[1], "rb").read()
if sys.argv[2] == "parent-ended":
    while os.getppid() == int(sys.argv[3]):  # the owner exits, and we are handed on
        time.sleep(0.02)
handoff.OWNER_EXIT_SECONDS = 0.3
try:
    pickle.loads(data)
except SystemExit as e:  # what a spawned worker's start does with it: exit, no traceback
    print("exit", e.code)
    raise
"""


def test_a_worker_of_a_run_that_stopped_leaves_quietly(temp, tmp_path):
    """A run that stops on an error removes its file while a worker may still be starting:
    that worker's traceback ("the file is gone ... start the run again") was the last line
    a user saw, under the run's own error. Only a live owner gets the message."""
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    out = tmp_path / "out.txt"
    # the owner: pickles a Handoff (writing its file), starts a worker, and ends
    owner = subprocess.run([sys.executable, "-c", f"""
import pickle, subprocess, sys
from srdata.handoff import Handoff
h = Handoff(list(range(10)))
open({str(tmp_path / "data")!r}, "wb").write(pickle.dumps(h))
subprocess.Popen([sys.executable, {str(script)!r}, {str(tmp_path / "data")!r}, "parent-ended",
                  str(__import__("os").getpid())], stdout=open({str(out)!r}, "w"),
                 stderr=subprocess.STDOUT)
"""], env=this_tree(), timeout=60)
    assert owner.returncode == 0
    deadline = time.time() + 30
    while time.time() < deadline and "exit" not in out.read_text():
        time.sleep(0.1)
    assert out.read_text() == "exit 1\n"
    # a live owner's worker: the file was removed under a running loader
    h = Handoff([1, 2])
    (tmp_path / "data").write_bytes(pickle.dumps(h))
    os.unlink(temp / _ours()[0])
    worker = subprocess.run([sys.executable, script, tmp_path / "data", "alive"],
                            env=this_tree(), capture_output=True,
                            text=True, timeout=60)
    assert worker.returncode == 1 and "is gone (removed by a temporary-file cleaner?)" in \
        worker.stderr


def test_loader_sources_pickle_to_a_constant_size(packed):
    """A worker's arguments must stay far under a pipe's 64 KB at any database size: a
    bigger payload made the workers start one after another (60 s for 15 torch workers)."""
    from srdata.dali_source import PatchSource
    from srdata.reader import open_db
    from srdata.sampler import Sampler
    from srdata.torch_loader import PatchDataset
    db = open_db(packed("jpeg"))
    sampler = Sampler(np.full(100_000, 512), np.full(100_000, 512), 4, 32)  # 2.4 MB of sizes
    assert len(pickle.dumps(PatchDataset(db))) < 1000
    assert len(pickle.dumps(PatchSource(db, sampler, 0, 0, 100))) < 1000


OWNER_SCRIPT = """
import pickle, time
from srdata.handoff import Handoff
h = Handoff(list(range(1000)))
pickle.dumps(h)  # as the loader does when it starts its workers
print(h._path, flush=True)
time.sleep(120)
"""


def _owner(temp):
    """A process that owns a handoff file in ``temp``, as a training run: (process, path)."""
    p = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT], stdout=subprocess.PIPE, text=True,
                         env=this_tree(TMPDIR=str(temp)))
    return p, Path(p.stdout.readline().strip())


def _aged(path: Path) -> Path:
    """``path`` dated before a sweep's grace (GRACE_SECONDS), so a sweep looks at it."""
    long_ago = time.time() - 2 * handoff.GRACE_SECONDS
    os.utime(path, (long_ago, long_ago), follow_symlinks=False)
    return path


def test_files_of_killed_runs_are_swept_and_nothing_else(temp):
    """A run ended by SIGKILL or SIGTERM cannot remove its file; the next one does, and
    leaves a live run's file, a file just made, another machine's, an older version's and a
    user's alone."""
    killed, terminated, live = _owner(temp), _owner(temp), _owner(temp)
    try:
        for (p, _), sig in ((killed, signal.SIGKILL), (terminated, signal.SIGTERM)):
            p.send_signal(sig)
            p.wait(timeout=30)
        just_made = temp / f"{handoff._mine()}new{SUFFIX}"  # its maker has yet to lock it
        other_host = temp / f"{PREFIX}elsewhere-x{SUFFIX}"  # its lock may not reach us
        older_version = temp / f"{PREFIX}old.pkl"  # unlocked, by a run that may still live
        users = temp / "users-file.flock.pkl"
        for path in (just_made, other_host, older_version, users):
            path.write_bytes(b"keep")
        for path in (killed[1], terminated[1], live[1], other_host, older_version, users):
            _aged(path)
        assert killed[1].exists() and terminated[1].exists()
        pickle.dumps(Handoff([1]))  # a new run starts its workers
        assert not killed[1].exists() and not terminated[1].exists()
        assert pickle.loads(live[1].read_bytes()) == list(range(1000))  # the live run's
        assert all(p.read_bytes() == b"keep"
                   for p in (just_made, other_host, older_version, users))
    finally:
        for p, _ in (killed, terminated, live):
            p.kill()
            p.wait()
            p.stdout.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_handoffs_and_sweeps_leave_no_descriptor_open(temp):
    """Each DALI pipeline build makes new handoffs: their locks must not pile up as open
    descriptors over a long run, nor the sweeps' looks at dead runs' files."""
    gc.collect()  # descriptors that earlier tests left to the collector
    before = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        dead = temp / f"{handoff._mine()}dead{i}{SUFFIX}"
        dead.write_bytes(b"")
        _aged(dead)
        pickle.dumps(Handoff([1]))
        assert not dead.exists()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before and _ours() == []


@pytest.mark.timeout(30)
def test_a_fifo_or_link_under_a_handoff_name_is_left_alone(temp, tmp_path_factory):
    """Anyone may make such names in a shared /tmp: a FIFO must not hang the run, and a
    link must not lead the sweep to its target."""
    fifo = temp / f"{handoff._mine()}fifo{SUFFIX}"
    os.mkfifo(fifo)
    target = tmp_path_factory.mktemp("elsewhere") / "users-file"
    target.write_bytes(b"keep")
    _aged(target)
    link = temp / f"{handoff._mine()}link{SUFFIX}"
    link.symlink_to(target)
    _aged(fifo), _aged(link)
    pickle.dumps(Handoff([1]))
    assert fifo.exists() and link.is_symlink() and target.read_bytes() == b"keep"


def test_a_file_that_cannot_be_locked_is_never_swept(temp, monkeypatch):
    """Where the lock fails, a live run's file would look like a dead run's to a sweep:
    it takes a name no sweep matches, and still reaches the workers."""
    monkeypatch.setattr(handoff, "_lock", lambda fd: False)
    h = Handoff([1, 2])
    data = pickle.dumps(h)
    (name,) = _ours()
    assert name.endswith(".pkl") and not name.endswith(SUFFIX)
    assert pickle.loads(data).get() == [1, 2]
    del h
    gc.collect()
    assert _ours() == []


def test_a_hard_link_under_a_handoff_name_is_left_alone(temp, tmp_path_factory):
    """A name that is one of several of a file (a user's, hard-linked) was never made by a
    handoff, which creates its file new: a sweep leaves that name too."""
    target = tmp_path_factory.mktemp("elsewhere") / "users-file"
    target.write_bytes(b"keep")
    linked = temp / f"{handoff._mine()}linked{SUFFIX}"
    os.link(target, linked)
    _aged(linked)
    pickle.dumps(Handoff([1]))
    assert linked.read_bytes() == b"keep" and os.path.samefile(linked, target)
