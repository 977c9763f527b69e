"""srtrain under faults: divergence, disk full, unwritable folders, killed processes."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import one_error_line, read_only_folder, this_tree, zip_writer_full_disk
from srtrain import checkpoint
from srtrain.cli import main

ROOT = Path(__file__).resolve().parents[1]
# SRCNN on 32 px patches: a CPU step takes milliseconds; the faults, not the model, are tested.
FAST = ["--model", "srcnn", "--patch", "32", "--batch-size", "2", "--loader", "torch",
        "--workers", "0", "--device", "cpu", "--val-split", "0.2", "--val-images", "2", "-q"]


def train(db, out, *args):
    return CliRunner().invoke(main, ["--db", str(db), "--out", str(out), *FAST,
                                     *map(str, args)])


def srtrain_cmd(db, out, *args):
    return [sys.executable, "-m", "srtrain", "--db", str(db), "--out", str(out), *FAST,
            *map(str, args)]


def test_non_finite_weights_are_never_saved_or_used(packed, tmp_path, monkeypatch, image_dir):
    from srtrain import train as train_mod
    db, out = packed("png"), tmp_path / "run"
    real = train_mod.Stepper.__call__

    def diverge_after_step_3(self, lr, hr):
        loss, stepped = real(self, lr, hr)
        if self.sched.last_epoch == 3:  # optimizer steps taken
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan"))
        return loss, stepped
    monkeypatch.setattr(train_mod.Stepper, "__call__", diverge_after_step_3)
    # the loss is read every 100 steps: only the guard stands between NaN and last.pt
    r = train(db, out, "--epochs", 2, "--save-every", 2, "--log-every", 100, "--ema", 0.5)
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "non-finite" in line and f"{out / 'last.pt'} (step 2) holds the last good" in line
    state = checkpoint.load(out / "last.pt")
    assert state["step"] == 2 and not checkpoint.nonfinite(state["model"])
    assert not checkpoint.nonfinite(state["ema"])
    assert not list(out.glob(".*tmp*"))

    # diverged before any save: the message says so and names no file
    r = train(db, tmp_path / "early", "--epochs", 1, "--save-every", 4, "--log-every", 100)
    assert r.exit_code == 1 and "no checkpoint was saved" in one_error_line(r)
    assert not (tmp_path / "early" / "last.pt").exists()

    # a good checkpoint, an output under a file: a message
    (tmp_path / "file").write_text("not a folder")
    r = CliRunner().invoke(main, ["upscale", "--ckpt", str(out / "last.pt"),
                                  str(image_dir / "b"), str(tmp_path / "file" / "big"), "-q"])
    assert r.exit_code == 1 and "a file is in the way" in one_error_line(r)

    # a checkpoint with NaN weights (an older srtrain wrote them): refused, not a black image
    state["model"] = {k: torch.full_like(v, float("nan")) for k, v in state["model"].items()}
    state["ema"] = None
    checkpoint.save(tmp_path / "nan.pt", state)
    big = tmp_path / "big.png"
    r = CliRunner().invoke(main, ["upscale", "--ckpt", str(tmp_path / "nan.pt"),
                                  str(image_dir / "b" / "im000.png"), str(big), "-q"])
    assert r.exit_code == 1 and "non-finite weights" in one_error_line(r)
    assert not big.exists()
    checkpoint.save(out / "last.pt", state)
    r = train(db, out, "--epochs", 2, "--save-every", 2, "--log-every", 100, "--ema", 0.5,
              "--resume")
    assert r.exit_code == 1 and "cannot be resumed" in one_error_line(r)


STDIN_SCRIPT = """
import sys, srdata
for loader, workers in (("torch", 1), ("dali", 0), ("torch", 0)):
    try:
        lr, hr = next(iter(srdata.make_loader(sys.argv[1], loader, 2, 32, 4, device="cpu",
                                              workers=workers)))
        print("batch", loader, workers, tuple(hr.shape))
    except ValueError as e:
        print("refused", loader, workers, e)
"""


def test_a_script_on_standard_input_is_told_to_save_itself(packed):
    r = subprocess.run([sys.executable, "-", str(packed("png"))], input=STDIN_SCRIPT,
                       capture_output=True, text=True, timeout=120,
                       env=this_tree())
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("refused torch 1") and "standard input" in lines[0]
    assert "save the script to a file" in lines[0] and "workers=0" in lines[0]
    assert lines[1].startswith("refused dali 0") and "loader='torch', workers=0" in lines[1]
    assert lines[2] == "batch torch 0 (2, 3, 32, 32)"  # no workers: nothing to re-import


def full_disk_at(path):
    """Make the next write to ``path``, a temporary file of format.atomic_file, fail as on a
    full disk: ENOSPC from the kernel (/dev/full, handed out once in its place: atomic_file
    refuses a link there)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    from srdata import format as fmt
    real = fmt.create_own

    def create_own(p):
        if Path(p) != path:
            return real(p)
        fmt.create_own = real
        return os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    fmt.create_own = create_own


def test_a_full_disk_gets_a_message_and_leaves_the_last_checkpoint(packed, tmp_path,
                                                                    monkeypatch):
    db, out = packed("png"), tmp_path / "run"
    real, saves = checkpoint.save, []

    def save(path, state):  # the second save (step 4) finds the disk full
        saves.append(path.name)
        if len(saves) == 2:
            full_disk_at(path.with_name(f".{path.name}.tmp-{os.getpid()}"))
        return real(path, state)
    monkeypatch.setattr(checkpoint, "save", save)
    r = train(db, out, "--epochs", 2, "--save-every", 2, "--val-every", 5)
    assert r.exit_code == 1 and saves == ["last.pt"] * 2
    line = one_error_line(r)
    assert f"no space left on the device to write {out / 'last.pt'}" in line
    assert "--resume" in line
    assert checkpoint.load(out / "last.pt")["step"] == 2  # the old one, whole
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file

    # metrics.jsonl: the message, and no partial line left behind for the next run
    out = tmp_path / "run2"
    out.mkdir()
    real_write = os.write

    def write(fd, data):
        if bytes(data).startswith(b'{"event": "train", "step": 3'):
            real_write(fd, bytes(data)[:10])  # a part goes out, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(checkpoint, "save", real)
    monkeypatch.setattr(os, "write", write)
    r = train(db, out, "--epochs", 1, "--log-every", 1)
    monkeypatch.setattr(os, "write", real_write)
    assert r.exit_code == 1
    line = one_error_line(r)
    assert f"no space left on the device to write {out / 'metrics.jsonl'}" in line
    # no last.pt to resume from, and a fresh run refuses the stopped run's files
    assert line.endswith(f"then start again with another --out (or move config.json, "
                         f"metrics.jsonl out of {out})")
    steps = [e["step"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if e["event"] == "train"]
    assert steps == [1, 2]


def test_an_unwritable_out_is_named_before_any_work(packed, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    r = train(packed("png"), tmp_path / "file" / "run", "--epochs", 1)
    assert r.exit_code == 2 and "file is a file, so" in r.output and "--out" in r.output
    assert "Traceback" not in r.output
    ro = tmp_path / "ro"
    undo = read_only_folder(ro)
    try:
        r = train(packed("png"), ro / "run", "--epochs", 1)
    finally:
        subprocess.run(undo, check=True)
    assert r.exit_code == 2 and f"cannot write in {ro}" in r.output, r.output
    assert "Traceback" not in r.output and not (ro / "run").exists()


def spawned_children(pid):
    """Pids of the spawned worker processes (multiprocessing's spawn_main) of ``pid``."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and \
                    b"spawn_main" in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def alive(pid):
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def failure_line(cmd) -> tuple[str, str]:
    """Run ``cmd`` (srtrain in a subprocess): it must fail with exit 1, no traceback and one
    Error line; (that line, all of stderr)."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                       env=this_tree(OMP_NUM_THREADS="1"))
    lines = [x for x in r.stderr.splitlines() if x.startswith("Error: ")]
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(lines) == 1, \
        r.stderr[-3000:]
    return lines[0], r.stderr


def trained(out) -> bool:
    """Whether the run in ``out`` has logged a training step."""
    try:
        return '"event": "train"' in (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return False


def start_training(db, out, loader):
    """srtrain in a subprocess with one loader worker, once it is training: (process, workers)."""
    p = subprocess.Popen(srtrain_cmd(db, out, "--loader", loader, "--workers", 1, "--epochs",
                                     1000, "--log-every", 1),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=this_tree(OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    # a train record: the loader's workers have made a batch (the start record comes
    # before any worker)
    while not trained(out) and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    workers = spawned_children(p.pid)
    if p.poll() is not None or len(workers) != 1:
        p.kill()
        pytest.fail(f"training did not start with a worker: {p.communicate()[1][-2000:]}")
    return p, workers


def test_a_worker_death_that_breaks_a_checkpoint_write_is_named():
    """PyTorch's SIGCHLD handler raised in the middle of torch.save (seen in CI), whose
    cleanup then failed with a zip-writer error: the message names the worker's death."""
    from srtrain.cli import _failure
    try:
        try:
            raise RuntimeError("DataLoader worker (pid 30382) is killed by signal: Killed. ")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    except RuntimeError as e:
        message = _failure(e, "runs/x")
    assert message.startswith("a data loader worker process died (DataLoader worker (pid "
                              "30382) is killed by signal: Killed)") and "--resume" in message
    assert _failure(RuntimeError("CUDA error: an illegal memory access"), "runs/x") is None


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_a_killed_loader_worker_gets_a_message(packed, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    p, workers = start_training(packed("jpeg"), tmp_path / "run", loader)
    os.kill(workers[0], signal.SIGKILL)
    try:
        _, err = p.communicate(timeout=60)  # DALI's task queue used to wait on it forever
    finally:
        p.kill()
    assert p.returncode == 1 and "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("Error: ")]
    assert len(lines) == 1 and "worker process died" in lines[0] and "--resume" in lines[0], \
        err[-3000:]


def small_shm(cmd: list) -> list | None:
    """``cmd`` where /dev/shm holds 64 KiB (a mount namespace of its own); None where this
    machine cannot make one."""
    probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /dev/shm"]
    try:
        if subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
            return None
    except (OSError, subprocess.TimeoutExpired):
        return None
    return probe[:-1] + [probe[-1] + ' && exec "$@"', "sh", *map(str, cmd)]


@pytest.mark.dali
def test_a_full_dev_shm_is_named_with_what_to_do(packed, tmp_path):
    """A container's small /dev/shm (Docker's 64 MB) fills with the DALI workers' batches:
    the worker dies of SIGBUS, which once read as a system out of memory."""
    pytest.importorskip("nvidia.dali")
    cmd = small_shm(srtrain_cmd(packed("raw"), tmp_path / "run", "--loader", "dali",
                                "--workers", 1, "--epochs", 1))
    if cmd is None:
        pytest.skip("cannot mount a small /dev/shm here (unshare -rm)")
    lines = [failure_line(cmd)[0]]
    assert "ran out of shared memory" in lines[0] and "killed by SIGBUS" in lines[0], lines
    assert re.search(r"/dev/shm has [\d.]+ of 0.1 MiB free", lines[0]), lines
    assert "--shm-size" in lines[0], lines


def test_a_dev_shm_too_small_for_the_torch_ring_is_refused_at_start(packed, tmp_path,
                                                                     monkeypatch):
    real = os.statvfs

    class Small:  # 0.1 of 1 MiB free
        f_frsize, f_bsize, f_blocks, f_bavail = 4096, 4096, 256, 25
    monkeypatch.setattr(os, "statvfs", lambda p: Small if p == "/dev/shm" else real(p))
    line = one_error_line(train(packed("raw"), tmp_path / "run", "--epochs", 1,
                                "--batch-size", 8, "--patch", 64))
    assert re.search(r"need 0\.2 MiB of shared memory and /dev/shm has 0\.1 of 1\.0 MiB "
                     r"free; lower --workers or the batch size", line), line
    assert not (tmp_path / "run" / "last.pt").exists()


def test_torch_saying_its_shared_memory_ran_out_is_one_line():
    """Both ways torch says it (a worker's failed allocation forwarded with its traceback,
    and a worker's bus error), whatever the exception they come wrapped in."""
    from srtrain.cli import _failure
    worker = ("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most "
              "recent call last):\n  File \"x.py\", line 3, in f\nRuntimeError: unable to "
              "allocate shared memory(shm) for file </torch_1_2_3>: No space left on device "
              "(28)\n")
    bus = ("DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that "
           "dataloader's workers are out of shared memory. Please try to raise your shared "
           "memory limit.")
    for said, first in ((worker, "RuntimeError: unable to allocate shared memory(shm) for "
                                 "file </torch_1_2_3>: No space left on device (28); "),
                        (bus, "DataLoader worker (pid 4242) is killed by signal: Bus error; ")):
        try:
            try:
                raise RuntimeError(said)
            except RuntimeError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        except RuntimeError as e:
            message = _failure(e, "runs/x")
        assert message.startswith(f"the data loader ran out of shared memory ({first}"
                                  "/dev/shm has "), message
        assert "--shm-size" in message and "\n" not in message


@pytest.mark.dali
def test_dali_workers_die_with_a_killed_trainer(packed, tmp_path):
    pytest.importorskip("nvidia.dali")
    p, workers = start_training(packed("jpeg"), tmp_path / "run", "dali")
    p.kill()
    p.wait(timeout=30)
    deadline = time.time() + 10
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if alive(w)]
    for w in left:  # leave nothing running, even when the test fails
        os.kill(w, signal.SIGKILL)
    assert not left, "DALI workers outlived their killed parent"


PARENT_SCRIPT = """
import os, subprocess, sys, threading, time
child = '''
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("_proc", sys.argv[1])
proc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(proc)
proc.die_with_parent(int(sys.argv[2]), started_by_main_thread=False, poll_seconds=0.1)
print("ready", flush=True)
time.sleep(120)
'''
started = []
def start():  # from a helper thread that ends once the worker is up
    started.append(subprocess.Popen([sys.executable, "-c", child, sys.argv[1],
                                     str(os.getpid())], stdout=subprocess.PIPE, text=True))
    assert started[0].stdout.readline() == "ready\\n"
t = threading.Thread(target=start)
t.start()
t.join()
kid = started[0]
time.sleep(0.5)
print(kid.pid, kid.poll() is None, flush=True)
time.sleep(120)
"""


def test_a_worker_started_from_a_thread_lives_until_its_parent_dies():
    p = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, str(ROOT / "srdata" / "_proc.py")],
                         stdout=subprocess.PIPE, text=True)
    try:
        pid, alive_after_thread = p.stdout.readline().split()
    finally:
        p.kill()
        p.wait()
    assert alive_after_thread == "True"  # PR_SET_PDEATHSIG would have fired at thread exit
    deadline = time.time() + 10
    while alive(int(pid)) and time.time() < deadline:
        time.sleep(0.05)
    if alive(int(pid)):
        os.kill(int(pid), signal.SIGKILL)
        pytest.fail("the worker outlived its killed parent")


def test_json_written_whole_or_not_at_all(tmp_path):
    from srdata.format import write_json_atomic
    path = tmp_path / "config.json"
    path.write_text('{"old": 1}')
    tmp = tmp_path / f".config.json.tmp-{os.getpid()}"
    full_disk_at(tmp)  # every write: ENOSPC
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"new": 2})
    assert path.read_text() == '{"old": 1}' and not os.path.lexists(tmp)


def test_atomic_temporaries_names_the_files_atomic_file_writes(tmp_path):
    """A run's sweep of killed saves and a pack's --overwrite check know atomic_file's
    temporary files by this pattern alone: it must match what atomic_file writes."""
    from srdata.format import atomic_file, atomic_temporaries
    with atomic_file(tmp_path / "last.pt", "wb") as f:
        f.write(b"part of a checkpoint")
        (tmp,) = [p.name for p in tmp_path.iterdir()]
    assert re.fullmatch(atomic_temporaries("best.pt", "last.pt"), tmp)
    assert not re.fullmatch(atomic_temporaries("best.pt", "config.json"), tmp)


def test_a_second_run_into_a_folder_in_training_is_refused(packed, tmp_path, monkeypatch):
    from srtrain import train as train_mod
    db, out = packed("png"), tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("4242\n")  # left by a run killed with -9: it locks nothing
    real, second = train_mod.Stepper.__call__, []

    def start_others_on_first_step(self, lr, hr):
        if not second:  # the first run holds its folder: the others find it in use
            second.append(train(db, out, "--epochs", 1))
            second.append(train(db, out, "--epochs", 1, "--resume"))
        return real(self, lr, hr)
    monkeypatch.setattr(train_mod.Stepper, "__call__", start_others_on_first_step)
    r = train(db, out, "--epochs", 1)
    assert r.exit_code == 0, r.output
    for other in second:
        assert other.exit_code == 1
        line = one_error_line(other)
        assert f"another run (pid {os.getpid()}) is training in {out}" in line
    starts = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "train"]
    assert starts == sorted(starts)  # one run's lines only
    assert not (out / ".lock").exists()  # released, and removed, at the end


@pytest.mark.parametrize("names", [["config.json", "metrics.jsonl", "samples"], ["best.pt"]])
def test_a_fresh_run_never_writes_over_a_runs_files(packed, tmp_path, names):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    for name in names:
        if name != "samples":
            (out / name).write_text("mine\n")
    (out / "samples" / "epoch0000.png").write_text("mine\n")
    before = {p: p.read_text() for p in out.rglob("*") if p.is_file()}
    r = train(packed("png"), out, "--epochs", 1)
    assert r.exit_code == 1
    line = one_error_line(r)
    assert f"{out} already holds {', '.join(names)}" in line and "another --out" in line
    assert {p: p.read_text() for p in out.rglob("*") if p.is_file()} == before


def test_a_disk_full_under_the_zip_writers_error_gets_a_message(packed, tmp_path,
                                                                monkeypatch):
    from srdata.format import atomic_file
    db, out = packed("png"), tmp_path / "run"
    real, saves = checkpoint.save, []

    def save(path, state):  # the second save: ENOSPC part-way, hidden by torch's zip writer
        saves.append(path.name)
        if len(saves) < 2:
            return real(path, state)
        with atomic_file(path, "wb") as f:
            zip_writer_full_disk(f, b"PK part of a checkpoint")
    monkeypatch.setattr(checkpoint, "save", save)
    r = train(db, out, "--epochs", 2, "--save-every", 2, "--val-every", 5)
    assert r.exit_code == 1 and saves == ["last.pt"] * 2
    line = one_error_line(r)
    assert "no space left on the device" in line and "--resume" in line
    assert checkpoint.load(out / "last.pt")["step"] == 2  # the old one, whole
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(packed, tmp_path,
                                                                  monkeypatch):
    from srtrain import train as train_mod
    db, out = packed("png"), tmp_path / "run"

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod.Trainer, "profile", interrupt)
    r = train(db, out, "--epochs", 1, "--profile-loader")
    assert r.exit_code == 130 and "saved" not in r.output, r.output
    assert "interrupted before the first checkpoint" in r.output
    assert not (out / "last.pt").exists()
    monkeypatch.undo()
    assert train(db, out, "--epochs", 1).exit_code == 0  # nothing left in the way

    monkeypatch.setattr(train_mod.Trainer, "profile", interrupt)
    r = train(db, out, "--epochs", 2, "--profile-loader", "--resume")
    assert r.exit_code == 130 and "saved" not in r.output, r.output
    assert f"{out / 'last.pt'} is as it was; continue with --resume" in r.output


@pytest.mark.parametrize("device, message", [
    ("foo", "got device 'foo', expected cpu, cuda or cuda:N"),
    ("cuda", "got device 'cuda', but no CUDA GPU is visible"),
    ("cuda:1", "got device 'cuda:1', but no CUDA GPU is visible"),
])
def test_a_bad_device_is_named(packed, tmp_path, monkeypatch, image_dir, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch
    r = train(packed("png"), tmp_path / "run", "--epochs", 1, "--device", device)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"Error: Invalid value for --device: {message}" in r.output, r.output
    assert not (tmp_path / "run").exists()
    ckpt = tmp_path / "any.pt"
    ckpt.write_bytes(b"")
    r = CliRunner().invoke(main, ["upscale", "--ckpt", str(ckpt), str(image_dir),
                                  str(tmp_path / "big"), "--device", device, "-q"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"Error: Invalid value for --device: {message}" in r.output, r.output


def test_the_next_run_removes_what_killed_saves_left(packed, tmp_path):
    """kill -9 during a save leaves OUT/.last.pt.tmp-PID, a whole checkpoint's size, which
    nothing removed; the next run in OUT (holding its lock) does, and only those."""
    db, out = packed("png"), tmp_path / "run"
    assert train(db, out, "--epochs", 1).exit_code == 0
    partial = [out / ".last.pt.tmp-4242", out / ".best.pt.tmp-17", out / ".config.json.tmp-9"]
    for p in partial:
        p.write_bytes(b"\0" * 1000)
    kept = [out / ".last.pt.tmp-notes", out / "last.pt.tmp-5"]
    for p in kept:
        p.write_text("mine")
    (out / ".best.pt.tmp-18").mkdir()  # not a file a save writes
    r = train(db, out, "--epochs", 2, "--resume")
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in partial)
    assert all(p.read_text() == "mine" for p in kept) and (out / ".best.pt.tmp-18").is_dir()


def test_tensorboard_write_failures_are_one_line(packed, tmp_path, monkeypatch):
    """The events are written by the writer's thread: its traceback must not be printed
    with our line, which names the events folder."""
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer import record_writer
    db, out = packed("png"), tmp_path / "run"
    assert train(db, out, "--epochs", 1).exit_code == 0
    undo = read_only_folder(out / "tb")
    try:
        r = train(db, out, "--epochs", 2, "--resume", "--tensorboard")
    finally:
        subprocess.run(undo, check=True)
    line = one_error_line(r)
    assert line.startswith(f"Error: cannot write TensorBoard events in {out / 'tb'} (")
    assert line.endswith("); make it writable, or drop --tensorboard"), line
    assert "Exception in thread" not in r.output and "Traceback" not in r.output

    real, writes = record_writer.RecordWriter.write, []

    def write(self, data):  # the disk fills up after the first events
        writes.append(len(data))
        if len(writes) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    out = tmp_path / "run2"
    r = train(db, out, "--epochs", 2, "--tensorboard", "--log-every", 1)
    time.sleep(0.5)  # what the writer thread would print comes after the command's end
    line = one_error_line(r)
    assert f"no space left on the device to write {out / 'tb'}; free some space" in line
    assert "Exception in thread" not in r.output


def test_a_run_that_fails_before_its_first_step_leaves_nothing(packed, tmp_path, monkeypatch):
    """A loader that cannot start (a full TMPDIR): the run's config.json, metrics.jsonl and
    TensorBoard events would make the same command refuse the folder afterwards."""
    from srtrain import train as train_mod
    db, out = packed("png"), tmp_path / "run"
    tb = ["--tensorboard"] if _has_tensorboard() else []

    def no_room(self, epoch):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "tmp" / "x"))
    monkeypatch.setattr(train_mod.Trainer, "train_epoch", no_room)
    r = train(db, out, "--epochs", 1, *tb)
    line = one_error_line(r)
    assert line.endswith(f"write {tmp_path / 'tmp' / 'x'}; free some space, then start again")
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    r = train(db, out, "--epochs", 1, *tb)
    assert r.exit_code == 1 and sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    monkeypatch.undo()
    r = train(db, out, "--epochs", 1, *tb)
    assert r.exit_code == 0, r.output


def _has_tensorboard():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def nearly_full_tmpdir(cmd: list, folder) -> list | None:
    """``cmd`` with TMPDIR a tmpfs of 8 KiB holding 4 KiB in ``folder`` (a mount namespace
    of its own): small files still fit, so Python keeps it as its temporary folder; None
    where this machine cannot make one."""
    mount = (f"mount -t tmpfs -o size=8k tmpfs {folder} && "
             f"head -c 4096 /dev/zero > {folder}/fill")
    probe = ["unshare", "-rm", "sh", "-c", mount]
    try:
        if subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
            return None
    except (OSError, subprocess.TimeoutExpired):
        return None
    return probe[:-1] + [f'{mount} && TMPDIR={folder} exec "$@"', "sh", *map(str, cmd)]


@pytest.mark.dali
def test_a_nearly_full_tmpdir_under_dali_is_named(packed, tmp_path):
    """DALI writes its pipeline's converted code to TMPDIR; when that failed, the graph ran
    unconverted and failed with a TypeError about enabling conditionals."""
    pytest.importorskip("nvidia.dali")
    tmp, out = tmp_path / "tmp", tmp_path / "run"
    tmp.mkdir()
    cmd = nearly_full_tmpdir(srtrain_cmd(packed("png"), out, "--loader", "dali",
                                         "--workers", 1, "--epochs", 1), tmp)
    if cmd is None:
        pytest.skip("cannot mount a small TMPDIR here (unshare -rm)")
    line, err = failure_line(cmd)
    assert line == (f"Error: no space left on the device to write {tmp}; free some space, "
                    "then start again"), line
    assert "AutoGraph" not in err and not out.exists()


RRDB = ["--model", "rrdbnet", "--num-feat", "8", "--num-block", "1", "--num-grow-ch", "8"]


@pytest.mark.parametrize("flag, value, more", [
    ("--lr", "1e38", []), ("--lr", "nan", []), ("--lr", "inf", []),
    ("--weight-decay", "nan", []), ("--weight-decay", "1e38", []), ("--ema", "nan", []),
    ("--sample-ratio", "nan", []), ("--val-split", "nan", []), ("--seed", "-1", []),
    ("--seed", str(2**64), []), ("--epochs", "1000000000", []),
    ("--workers", str(10**20), []), ("--num-feat", str(10**20), RRDB),
    ("--num-block", str(10**9), RRDB), ("--num-grow-ch", str(10**9), RRDB),
])
def test_numbers_that_overflow_or_are_not_finite_are_refused(packed, tmp_path, flag, value,
                                                             more):
    r = train(packed("png"), tmp_path / "run", "--epochs", 1, *more, flag, value)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"Invalid value for '{flag}'" in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_non_finite_init_weights_or_ema_are_refused(packed, tmp_path):
    db, out = packed("png"), tmp_path / "run"
    assert train(db, out, "--epochs", 1, "--ema", 0.5).exit_code == 0
    state = checkpoint.load(out / "last.pt")
    ema = state["ema"]
    ema["module.conv1.bias"] = torch.full_like(ema["module.conv1.bias"], float("inf"))
    checkpoint.save(out / "last.pt", state)  # finite model, diverged EMA
    r = train(db, out, "--epochs", 2, "--ema", 0.5, "--resume")
    assert "holds non-finite weights" in one_error_line(r) and "cannot be resumed" in r.output
    bad = tmp_path / "nan.pth"
    torch.save({"params": {k: torch.full_like(v, float("nan"))
                           for k, v in state["model"].items()}}, bad)
    line = one_error_line(train(db, tmp_path / "run2", "--epochs", 1, "--init-weights", bad))
    assert f"weights in {bad} hold NaN or inf (in conv1.weight and more)" in line
    assert not (tmp_path / "run2").exists()


def test_dali_workers_that_never_start_are_one_line(packed, tmp_path, monkeypatch):
    """DALI's pool says only "Workers initialization failed" when a source worker ends
    while starting (out of memory on a loaded machine)."""
    import srdata

    def no_workers(*args, **kwargs):
        raise RuntimeError("Workers initialization failed")
    monkeypatch.setattr(srdata, "make_loader", no_workers)
    r = train(packed("png"), tmp_path / "run")
    line = one_error_line(r)
    assert "DALI's worker processes did not start" in line and "--loader torch" in line
    assert line.endswith("then start again")
