"""Timing the step and the loader: the GPU's idle time waiting for data (``DataTimer``,
``timed_fetches``: what the trainer reports as data wait), steps per second, and loader
efficiency (img/s fed by the loader / img/s on one pre-made batch), for the benchmarks and
``srtrain --profile-loader``.
"""
from __future__ import annotations

import copy
import itertools
import statistics
import time

import torch

import srdata

from .config import AMP_DTYPES, TrainConfig, loader_workers
from .kernels import check_cuda_graphs, compile_net, resolve_compile, set_kernels
from .stepper import Stepper


class DataTimer:
    """Seconds the training loop waited for data since the last ``collect()``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pairs, self.seconds, self._t0, self._a = [], 0.0, 0.0, None

    def before(self):
        if self.cuda:
            self._a = torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._t0 = time.perf_counter()

    def after(self):
        if self.cuda:
            b = torch.cuda.Event(enable_timing=True)
            b.record()
            self.pairs.append((self._a, b))
        else:
            self.seconds += time.perf_counter() - self._t0

    def collect(self) -> float:
        """Call after a synchronisation: every recorded event has completed."""
        s = self.seconds + sum(a.elapsed_time(b) for a, b in self.pairs) / 1000
        self.pairs, self.seconds = [], 0.0
        return s


def step_rate(stepper, batches, steps: int, warmup: int, device) -> float:
    """Images per second trained by ``stepper`` on ``batches``, after ``warmup`` steps."""
    n, t0 = 0, None
    for i, (lr, hr) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        if i >= warmup:
            n += hr.shape[0]
        stepper(lr, hr)
        if i + 1 == warmup + steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def forever(loader):
    """Batches from ``loader``, epoch after epoch."""
    while True:
        yield from loader


def repeat(lr, hr):
    """The same batch forever: synthetic data, no loader cost at all."""
    while True:
        yield lr, hr


def timing_stepper(cfg: TrainConfig, model, device, amp: str) -> Stepper:
    """A Stepper over ``model`` (compiled as --compile says) for timing steps: its LR
    schedule spans far more steps than are timed, so the rate is a mid-run step's."""
    cfg, _ = resolve_compile(cfg, device)
    check_cuda_graphs(cfg)
    net = compile_net(model, model, cfg.compile, cfg.cuda_graphs)
    return Stepper(cfg, model, net, device, amp, 10**6)


def loader_efficiency(cfg: TrainConfig, model, device, amp: str, steps: int = 20,
                      warmup: int = 5, loader=None, dali=None) -> dict:
    """Loader efficiency: img/s with the loader ÷ img/s on synthetic (pre-made) batches.

    Also, per fed step: how long the GPU sat idle for data (``fed_data_wait_ms``, the
    trainer's data wait: the wall time on a CPU) and the median and mean time the host
    spent fetching a batch (``fed_fetch_ms``, ``fed_fetch_ms_mean``: DALI making several
    batches a run puts the run's cost on one fetch in several). A loader that makes the host
    wait for the GPU shows a fetch as long as a step; one that is slow on the host, a GPU
    wait. ``dali``: the ``srdata.DaliTuning`` of a DALI loader made here."""
    set_kernels(cfg, device)
    if loader is None:
        loader = srdata.make_loader(cfg.db, cfg.loader, cfg.batch_size, cfg.patch, cfg.scale,
                                    seed=cfg.seed + 1, sample_ratio=1.0, device=device,
                                    dtype=AMP_DTYPES[amp], channels_last=cfg.channels_last,
                                    workers=loader_workers(cfg.workers), lr_db=cfg.lr_db,
                                    degradation=cfg.degradation, usm=cfg.usm,
                                    dali=dali)

    # one pass over the loader for both runs: a second iter() would start its workers (and
    # build a DALI pipeline) again, the first one left half-read
    batches = forever(loader)
    lr, hr = next(batches)
    synthetic = step_rate(timing_stepper(cfg, copy.deepcopy(model), device, amp),
                          repeat(lr, hr), steps, warmup, device)
    fetches, timer = [], DataTimer(device)
    # the fetches inside step_rate's timed window: from the second timed step on
    fed = step_rate(timing_stepper(cfg, copy.deepcopy(model), device, amp),
                    timed_fetches(batches, warmup + 1, timer, fetches), steps, warmup, device)
    waited, n = timer.collect(), len(fetches)  # step_rate ended synchronised
    return {"synthetic_img_per_s": synthetic, "loader_img_per_s": fed,
            "loader_efficiency": fed / synthetic,
            "fed_data_wait_ms": 1000 * waited / n if n else None,
            "fed_fetch_ms": 1000 * statistics.median(fetches) if n else None,
            "fed_fetch_ms_mean": 1000 * statistics.mean(fetches) if n else None,
            # DALI's batches a pipeline run, as the loader made them
            **({"dali_per_run": loader.per_run} if hasattr(loader, "per_run") else {})}


def timed_fetches(batches, skip: int, timer: DataTimer, seconds: list | None = None):
    """``batches``, each fetch after the first ``skip`` timed: the device's idle time around
    it added to ``timer`` (the trainer's data wait), and the host's seconds in it appended
    to ``seconds`` (when given)."""
    it = iter(batches)
    for i in itertools.count():
        timed = i >= skip
        if timed:
            timer.before()
            t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        if timed:
            if seconds is not None:
                seconds.append(time.perf_counter() - t0)
            timer.after()
        yield batch
