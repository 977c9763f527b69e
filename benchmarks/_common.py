"""Shared by the benchmark scripts: machine/version description, timing, output, inputs.

Run a benchmark as a script (``python benchmarks/NAME.py``): its folder is then on
``sys.path`` and ``import _common`` finds this module, in the parent and in spawned workers.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import numpy as np


def _cpuinfo(field: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds``: another job running would skew timings."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 3)


def _autogroup_nice() -> int | None:
    """The session's scheduler group nice: with autogroups, plain nice only ranks a
    process against its own session, so this is what counts against other sessions' jobs."""
    try:
        with open("/proc/self/autogroup") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def environment() -> dict:
    """What the numbers depend on; no hostname, so results can be shared as they are."""
    import cv2
    import lmdb
    import PIL

    import srdata

    flags = (_cpuinfo("flags") or "").split()
    return {
        "cpu_model": _cpuinfo("model name") or platform.processor() or None,
        # affinity, not os.cpu_count(): containers and taskset limit what we may use
        "cpus": len(os.sched_getaffinity(0)),
        "cpus_online": os.cpu_count(),
        "virtualized": "hypervisor" in flags,  # vCPUs may be host hyperthreads
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "pillow": PIL.__version__,
        "lmdb": lmdb.__version__,
        "srpipe": srdata.__version__,
        # measured before the benchmark starts: anything well above 0 means a noisy machine
        "cpu_busy_before": _cpu_busy(),
        # negative: this run was given priority over other jobs sharing the machine
        "nice": os.nice(0),
        "autogroup_nice": _autogroup_nice(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def accelerator_environment() -> dict:
    """torch, CUDA, GPU and DALI versions, for the benchmarks that use them."""
    import subprocess

    import torch
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None,
           "gpu_driver": None, "dali": None}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        try:
            env["gpu_driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    try:
        import nvidia.dali
        env["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return env


def median_time(fn, repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """(median seconds, every timed run) of ``fn()``; warm-up runs fill caches, untimed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def emit(record: dict, out: str | os.PathLike | None = None) -> None:
    """Print one JSON line; also append it to ``out`` so runs accumulate in one file."""
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")


def read_lines(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file written by ``emit``; none if it does not exist."""
    path = Path(path)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def some_of(value: str, allowed) -> list[str]:
    """A comma-list option's names, each one of ``allowed``: one configuration each."""
    names = value.split(",")
    if set(names) - set(allowed):  # "" splits to [""]: refused here too
        raise click.BadParameter(f"got {value}, expected some of {','.join(allowed)}")
    return names


def numbers(value: str, kind=int, least=0, most=None) -> list:
    """A comma-list option's numbers, each of ``kind`` in [least, most]: one configuration
    each. A typo must stop the run here, not after minutes of building its database."""
    try:
        got = [kind(v) for v in value.split(",")]
    except ValueError:
        got = []
    top = float("inf") if most is None else most
    if not got or not all(least <= v <= top for v in got):  # nan too
        span = f"from {least} to {most}" if most is not None else f"of at least {least}"
        what = "integers" if kind is int else "numbers"
        raise click.BadParameter(f"got {value}, expected comma-separated {what} {span}")
    return got


def switches(ctx, param, value: str) -> list[str]:
    """A click callback for an ``on``, ``off`` or ``on,off`` option."""
    return some_of(value, ("on", "off"))


def batch_sizes(ctx, param, value: str) -> list[int]:
    """A click callback for a comma list of batch sizes."""
    return numbers(value, least=1)


def worker_counts(ctx, param, value: str) -> list[int]:
    """A click callback for a comma list of CPU worker counts (0: the script's "all")."""
    return numbers(value, least=0)


def degradations(ctx, param, value: str | None) -> list[str] | None:
    """A click callback for a comma list of srtrain's ``--degradation`` kinds."""
    from srdata.sampler import DEGRADATIONS
    return None if value is None else some_of(value, DEGRADATIONS)


def make_photos(root: str | os.PathLike, count: int, min_side: int = 1000,
                max_side: int = 2000, seed: int = 0) -> list[Path]:
    """``count`` photo-like JPEGs (q95, each side in [min_side, max_side]) under ``root``.

    The size of a camera photo after a phone or web export: what users pack.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        jobs.append((root / f"photo{i:04d}.jpg", h, w, seed * 100_003 + i))
    # about 0.5 s per 2K image: worth all cores, it happens before anything is timed
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        return list(pool.map(_write_photo, jobs))


def build_jpeg_db(root: str | os.PathLike, count: int, size: int = 512,
                  min_size: int = 256) -> Path:
    """The users' setting, packed by the real packer: ``count`` size x size JPEG q95 photos."""
    from srdata.pack import PackConfig, pack
    root = Path(root)
    make_photos(root / "photos", count, min_side=size, max_side=size)
    pack(root / "photos", root / "db", PackConfig(size=size, min_size=min_size, codec="jpeg",
                                                 quality=95), progress=False)
    return root / "db"


def _write_photo(job) -> Path:
    from srdata.samples import synthetic_image, write_image

    path, h, w, seed = job
    write_image(path, synthetic_image(h, w, seed), quality=95)
    return path


def first_and_rate(stepper, lr, hr, dev, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds of the first step: with --compile, the compile's cost; img/s of ``steps``
    steps on the batch after ``warmup`` untimed ones, the first step among them)."""
    import torch

    from srtrain.timing import repeat, step_rate
    first = time.perf_counter()
    stepper(lr, hr)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    first = time.perf_counter() - first
    return first, step_rate(stepper, repeat(lr, hr), steps, max(0, warmup - 1), dev)
