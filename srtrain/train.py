"""The training loop: one obvious loop, the GPU kept busy, every position resumable.

No host synchronisation in the hot loop: the loss stays on the device and is read every
``log_every`` steps. Data wait is the time the GPU sat idle between one step's work and the
next batch (CUDA events on the GPU's own timeline, so work queued earlier never counts as
waiting); on the CPU, the wall time spent in the loader.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext, suppress
import itertools
import json
import math
import os
import re
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import srdata
from srdata.format import atomic_temporaries, write_json_atomic
from srdata.publish import try_lock, unlock
from srdata.reader import open_db
from srdata.schedule import PatchSchedule

from . import checkpoint, ddp
from .config import AMP_DTYPES, TrainConfig, resolve_amp
from .kernels import check_cuda_graphs, compile_net, resolve_compile, set_kernels
from .models import build_model, load_weights
from .validate import ValSet, evaluate, split_ids


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says what to do."""


class Stepper:
    """Forward, backward and (every ``accum`` micro-batches) the optimizer step.

    AMP in one code path: autocast and the GradScaler are switched by ``enabled``."""

    def __init__(self, cfg: TrainConfig, model, net, device, amp: str, total_steps: int):
        self.model, self.net, self.accum = model, net, cfg.accum
        self.graphs = cfg.cuda_graphs  # with --compile: check_cuda_graphs refuses it without
        self.dtype, self.device = AMP_DTYPES[amp], device
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                     weight_decay=cfg.weight_decay,
                                     fused=device.type == "cuda")
        self.schedule, self.lr = cfg.schedule, cfg.lr
        self.sched = make_scheduler(self.opt, cfg.schedule, cfg.lr, total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.ema_max, self.ema_updates = cfg.ema, 0
        self.ema = (AveragedModel(model, multi_avg_fn=self._ema_update) if cfg.ema else None)
        self.micro = 0

    def _ema_update(self, ema_params, params, _n_averaged) -> None:
        # the decay counted on the host: reading n_averaged would sync with the GPU
        decay = ema_decay(self.ema_max, self.ema_updates)
        torch._foreach_lerp_(ema_params, params, 1 - decay)

    def replan(self, total_steps: int, done: int) -> None:
        """Re-plan the LR schedule over ``total_steps`` as if the run had been started with
        them, and continue it at step ``done``: the LR becomes the new plan's LR there."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr  # fresh schedulers start from the initial LR
        self.sched = make_scheduler(self.opt, self.schedule, self.lr, total_steps)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(done):  # 1M steps take ~2 s; closed forms differ per scheduler
                self.sched.step()

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Train on one batch; (its loss, still on the device; whether a step was taken)."""
        if self.graphs:  # this step's outputs may overwrite the last step's
            torch.compiler.cudagraph_mark_step_begin()
        last = (self.micro + 1) % self.accum == 0
        sync = self.net.no_sync() if hasattr(self.net, "no_sync") and not last else nullcontext()
        with sync:
            with torch.autocast(self.device.type, dtype=self.dtype,
                                enabled=self.dtype != torch.float32):
                sr = self.net(lr)
            loss = F.l1_loss(sr.float(), hr.float())
            self.scaler.scale(loss / self.accum).backward()
        self.micro += 1
        if not last:
            return loss.detach(), False
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
            self.ema_updates += 1
        return loss.detach(), True

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, s: dict) -> None:
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None and s.get("ema") is not None:
            self.ema.load_state_dict(s["ema"])
            self.ema_updates = int(self.ema.n_averaged)


def ema_decay(decay: float, updates: int) -> float:
    """The EMA decay for the update after ``updates`` earlier ones: ``decay`` once
    (1 + n) / (10 + n) exceeds it (n ~ 9000 for 0.999), less before, so a short run's EMA
    is not mostly its random initial weights (TensorFlow's ExponentialMovingAverage rule)."""
    return min(decay, (1 + updates) / (10 + updates))


# BasicSR's train_RRDBNet_PSNR_x4: CosineAnnealingRestartLR, periods [250k] * 4 of its 1M
# iterations, restart weights 1, eta_min 1e-7
RESTARTS, ETA_MIN = 4, 1e-7


def cosine_restarts(step: int, total_steps: int, lr: float) -> float:
    """LR factor at ``step``: RESTARTS equal cosine periods from lr down to ETA_MIN, each
    starting again at lr (a period's last step reaches ETA_MIN, as in BasicSR)."""
    period = total_steps / RESTARTS
    i = min(RESTARTS - 1, max(0, math.ceil(step / period) - 1))
    floor = min(ETA_MIN / lr, 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - i * period) / period))


def patch_schedule(cfg: TrainConfig) -> PatchSchedule | None:
    """``--patch-schedule`` as the loader takes it; None for one fixed ``--patch``."""
    if cfg.patch_schedule is None:
        return None
    return PatchSchedule.parse(cfg.patch_schedule, cfg.batch_size, cfg.batch_schedule)


def total_steps(epochs: int, accum: int, batches_in) -> int:
    """Optimizer steps of epochs 0 to ``epochs - 1``: the span of the OneCycle and cosine
    schedules. ``batches_in(epoch)``: the loader's batches that epoch. With a patch schedule
    and ``--batch-schedule pixels`` an epoch's steps change per stage; the LR schedule spans
    their sum, so it warms up and anneals once over the whole run, not once per stage."""
    return sum(batches_in(e) // accum for e in range(epochs))


def make_scheduler(opt, schedule: str, lr: float, total_steps: int):
    if schedule == "onecycle":
        # cycle_momentum off: Adam's betas stay 0.9/0.99 as in the reference recipes
        # (OneCycleLR would otherwise swing beta1 between 0.85 and 0.95)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                   cycle_momentum=False)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    if schedule == "cosine_restarts":
        # a closed form of the step: the scheduler's saved state is just its step count
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: cosine_restarts(step, total_steps, lr))
    raise ValueError(f"got schedule={schedule!r}, expected onecycle, cosine, constant or "
                     "cosine_restarts")


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


class Logger:
    """metrics.jsonl (one JSON object a line), written by the main process only."""

    def __init__(self, out: Path, main: bool, tensorboard: bool = False):
        self.path, self.main = out / "metrics.jsonl", main
        self.tb = None
        if main and tensorboard:
            from .tboard import TensorBoard
            self.tb = TensorBoard(out)

    def __call__(self, record: dict) -> None:
        if self.main:
            append_line(self.path, json.dumps(record))
            if self.tb is not None:
                self.tb.record(record)

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


def data_identities(db, val_db=None, lr_db=None) -> dict:
    """The identities of the run's open databases, which a move or copy keeps and a repack
    changes (``PackedDB.identity``, ``BasicSRDB.identity``)."""
    return {key: d.identity if d is not None else None
            for key, d in (("db", db), ("val_db", val_db), ("lr_db", lr_db))}


def loader_workers(asked: int | None) -> int:
    """The loader's CPU workers: as asked, or this process's share of the cores (torchrun
    starts one process per GPU on the same machine) less one for the training loop."""
    if asked is not None:
        return asked
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


def train(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns the last validation scores and counters."""
    d, device = ddp.setup(cfg.device)
    try:
        with run_lock(Path(cfg.out), d.main):
            return Trainer(cfg, d, device).run()
    finally:
        ddp.teardown(d)


# What a run writes in --out (checkpoints, config, metrics, validation grids, TensorBoard
# events): a fresh run refuses a folder holding any of them rather than replace or append
# to another run's files.
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


class Trainer:
    def __init__(self, cfg: TrainConfig, d: ddp.Dist, device: torch.device):
        cfg, why = resolve_compile(cfg, device, d.world_size)
        if why and d.main:
            warnings.warn(f"--compile auto compiles nothing: {why}. The step runs uncompiled "
                          "(esrgan's ran 1.5x faster compiled on an H100); --compile off says "
                          "so and silences this", stacklevel=2)
        self.cfg, self.d, self.device = cfg, d, device
        self.out = Path(cfg.out)
        self.amp = resolve_amp(cfg.amp, device)
        set_kernels(cfg, device)
        check_cuda_graphs(cfg, d.world_size)
        state = self._resume_state()
        torch.manual_seed(cfg.seed)
        db = open_db(cfg.db)
        if cfg.lr_db and cfg.degradation != "nn":  # the loader says so in its own words
            raise ValueError(f"--degradation {cfg.degradation} makes LR from HR, but --lr-db "
                             "brings its own LR; drop --degradation (or --lr-db)")
        if cfg.lr_db and cfg.val_degradation not in (None, "nn"):
            raise ValueError("--val-degradation makes LR from HR, but with --lr-db validation "
                             "uses the paired LR images; drop --val-degradation")
        if cfg.lr_db and cfg.val_db:
            raise ValueError("--val-db has no LR pairs: with --lr-db, validation holds out "
                             "--val-split of the paired databases; drop --val-db")
        train_ids, val_ids = split_ids(len(db), 0.0 if cfg.val_db else cfg.val_split,
                                       cfg.seed)
        self.schedule = patch_schedule(cfg)
        self.loader = srdata.make_loader(
            db, cfg.loader, cfg.batch_size, cfg.patch, cfg.scale, seed=cfg.seed,
            sample_ratio=cfg.sample_ratio, rank=d.rank, world_size=d.world_size,
            device=device, dtype=AMP_DTYPES[self.amp], channels_last=cfg.channels_last,
            workers=loader_workers(cfg.workers), ids=train_ids, lr_db=cfg.lr_db,
            patch_schedule=self.schedule, degradation=cfg.degradation, usm=cfg.usm)
        self.val = None
        vdb = open_db(cfg.val_db) if cfg.val_db else None
        # each database opened once: the loader holds the paired LR one
        lr = self.loader.lr
        self.data_ids = data_identities(db, vdb, lr.db if lr is not None else None)
        if state is not None:
            self._check_data(state)  # before any image is read
        if d.main and (vdb is not None or len(val_ids)):
            ids = range(len(vdb)) if vdb is not None else val_ids
            vdb = db if vdb is None else vdb
            # one size in every stage (the final patch), so scores compare across stages
            val_patch = self.schedule.final if self.schedule else cfg.patch
            self.val = ValSet(vdb, ids, val_patch, cfg.scale, cfg.val_images,
                              lr=self.loader.lr,
                              degradation=cfg.val_degradation or cfg.degradation)
        starts = [e for e, _ in self.schedule.stages] if self.schedule else [0]
        fewest = min(self.loader.batches_in(e) for e in starts)
        if fewest < cfg.accum:
            raise ValueError(f"--accum {cfg.accum} is more than the {fewest} "
                             "batches of an epoch; lower --accum or --batch-size")
        model = build_model(cfg.model, cfg.scale, cfg.num_feat, cfg.num_block, cfg.num_grow_ch)
        if cfg.init_weights and state is None:
            load_weights(model, cfg.init_weights)
        fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
        model = model.to(device, memory_format=fmt)
        net = model
        if d.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        net = compile_net(model, net, cfg.compile, cfg.cuda_graphs)
        self.model = model
        self.total_steps = total_steps(cfg.epochs, cfg.accum, self.loader.batches_in)
        self.step_fn = Stepper(cfg, model, net, device, self.amp, self.total_steps)
        self.step, self.best, self.stale = 0, -math.inf, 0
        self.in_epoch, self.step_batch = False, 0  # the loader position of the last step
        self.saved = {}  # checkpoint name -> the step it holds; every one has finite weights
        self.log = Logger(self.out, d.main, cfg.tensorboard)
        if state is not None:
            self._load(state)
            self._replan(TrainConfig.from_dict(state["config"]).epochs)

    # -- checkpoints ---------------------------------------------------------------------
    def _resume_state(self) -> dict | None:
        if not self.cfg.resume:
            if self.d.main:
                check_fresh_out(self.out)
            return None
        state = checkpoint.load(self.out / "last.pt")
        conflicts = self.cfg.resume_conflicts(TrainConfig.from_dict(state["config"]))
        if conflicts:
            raise ValueError("--resume needs the checkpoint's settings; these differ: "
                             + "; ".join(conflicts))
        if checkpoint.nonfinite(state["model"]):  # written by an srtrain without the guard
            raise ValueError(f"{self.out / 'last.pt'} holds non-finite weights (training had "
                             "diverged when it was saved); it cannot be resumed")
        return state

    def _check_data(self, state: dict) -> None:
        """--resume on the run's own databases, wherever they are now: compared by identity,
        so a moved or differently spelled path passes and a repacked database does not."""
        saved = state.get("data")
        if saved is None:  # a checkpoint from before identities: what its paths hold now
            old = TrainConfig.from_dict(state["config"])
            saved = data_identities(*(open_db(p) if p else None for p in
                                      (old.db, old.val_db, old.lr_db))
                                    ) if Path(old.db).exists() else {}
        for flag, key in (("--db", "db"), ("--val-db", "val_db"), ("--lr-db", "lr_db")):
            if saved.get(key) != self.data_ids[key]:
                raise ValueError(
                    f"--resume needs the run's own databases: {flag} "
                    f"{getattr(self.cfg, key)} is not the database the checkpoint was "
                    f"trained on (identity {self.data_ids[key]}, checkpoint "
                    f"{saved.get(key)}); give that database, or start a new run in another "
                    "--out")

    def _replan(self, saved_epochs: int) -> None:
        """--resume with another --epochs: the LR schedule is planned again over the new
        total, as if the run had started with it, and continues at the current step."""
        if self.cfg.epochs == saved_epochs:
            return
        loader = self.loader
        done = loader.epoch + (1 if loader.batch else 0)  # epochs begun
        if self.cfg.epochs < done:
            raise ValueError(f"--epochs {self.cfg.epochs}: the run has already trained "
                             f"{done} epoch(s); give --epochs {done} or more")
        self.step_fn.replan(self.total_steps, self.step)
        self.log({"event": "replan", "step": self.step, "epochs_before": saved_epochs,
                  "epochs": self.cfg.epochs, "total_steps": self.total_steps,
                  "lr": self.step_fn.sched.get_last_lr()[0]})

    def _load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.step_fn.load_state_dict(state)
        self.loader.load_state_dict(state["loader"])
        self.step, self.best, self.stale = state["step"], state["best_psnr"], state["stale"]
        self.saved["last.pt"] = self.step
        torch.set_rng_state(state["rng"])
        self.log({"event": "resume", "step": self.step, "epoch": self.loader.epoch,
                  "batch": self.loader.batch})

    def _save(self, name: str) -> None:
        if not self.d.main:
            return
        loader = self.loader.state_dict()
        if self.in_epoch:
            # resume after the last finished step: a batch taken but not trained on (Ctrl-C
            # in the forward pass) or a partial accumulation is done again
            loader["batch"] = self.step_batch
        state = {"model": checkpoint.unwrap(self.model).state_dict(), **self.step_fn.state_dict(),
                 "loader": loader, "step": self.step, "best_psnr": self.best,
                 "stale": self.stale, "config": self.cfg.to_dict(),
                 "rng": torch.get_rng_state(), "data": self.data_ids}
        bad = checkpoint.nonfinite(state["model"]) + checkpoint.nonfinite(state["ema"] or {})
        if bad:  # never replace a good checkpoint with weights that upscale to black
            raise TrainingError(
                f"the weights became non-finite (NaN or inf in {bad[0]}) by step {self.step}, "
                f"so {name} was not written; {self._good_state()}. Lower --lr, or try --amp "
                "bf16 or --amp off")
        checkpoint.save(self.out / name, state)
        self.saved[name] = self.step

    def _good_state(self) -> str:
        """Where the last good state is, in words: the newest checkpoint this run saved or
        resumed from (each one's weights were checked finite)."""
        if not self.saved:
            return "no checkpoint was saved"
        name = max(self.saved, key=lambda n: (self.saved[n], n == "last.pt"))
        return f"{self.out / name} (step {self.saved[name]}) holds the last good state"

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        # measured before the run writes anything: Ctrl-C in it leaves --out as it was
        profile = self.profile() if cfg.profile_loader else None
        self.out.mkdir(parents=True, exist_ok=True)
        if self.d.main:
            write_json_atomic(self.out / "config.json", cfg.to_dict(), indent=2)
        if profile is not None:
            self.log({"event": "profile", **profile})
        self.loader_start = self.loader.epoch
        result = {}
        try:
            for epoch in range(self.loader.epoch, cfg.epochs):
                self.loader.set_epoch(epoch)
                self.log_stage(epoch)
                self.train_epoch(epoch)
                result = self.validate(epoch)
                # after validation: the best score and patience count belong to the state
                self._save("last.pt")
                if self.stop_early():
                    break
        except KeyboardInterrupt:
            self._save("last.pt")
            self.log({"event": "interrupted", "step": self.step})
            raise
        finally:
            self.log.close()
        return {"step": self.step, "epoch": self.loader.epoch, "best_psnr": self.best,
                **result}

    def log_stage(self, epoch: int) -> None:
        """A patch schedule's stage begins (or a run resumes in one): its patch and batch."""
        if self.schedule is None:
            return
        s = self.loader.sampler
        if epoch == self.loader_start or epoch in dict(self.schedule.stages):
            self.log({"event": "stage", "epoch": epoch, "patch": s.patch,
                      "batch_size": s.batch_size, "batches": len(self.loader)})

    def train_epoch(self, epoch: int) -> None:
        cfg, timer = self.cfg, DataTimer(self.device)
        bar = tqdm(total=len(self.loader), initial=self.loader.batch, unit="batch",
                   desc=f"epoch {epoch}", dynamic_ncols=True, leave=False,
                   disable=not (self.d.main and cfg.progress))
        window = {"loss": torch.zeros((), device=self.device), "n": 0, "images": 0,
                  "t0": time.perf_counter()}
        self.in_epoch, self.step_batch = True, self.loader.batch
        for lr, hr in timed_fetches(self.loader, 0, timer):
            loss, stepped = self.step_fn(lr, hr)
            window["loss"] += loss
            window["n"] += 1
            window["images"] += hr.shape[0]
            bar.update()
            if not stepped:
                continue
            self.step += 1
            self.step_batch = self.loader.batch
            if self.step % cfg.log_every == 0:
                bar.set_postfix(self.flush(window, timer, epoch), refresh=False)
            if cfg.save_every and self.step % cfg.save_every == 0:
                self._save("last.pt")
        if self.step_fn.micro % cfg.accum:
            # the epoch's last batches did not fill an accumulation: drop their gradients,
            # so every epoch takes the same steps and a checkpoint sits on a step boundary
            self.step_fn.opt.zero_grad(set_to_none=True)
        self.step_fn.micro = 0
        self.in_epoch = False
        if window["n"]:
            self.flush(window, timer, epoch)
        bar.close()

    def flush(self, window: dict, timer: DataTimer, epoch: int) -> dict:
        """Read the window's loss (the one host sync), log it, stop on a non-finite loss."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - window["t0"]
        loss = float(ddp.mean(self.d, window["loss"] / window["n"]))
        wait = timer.collect()
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss} by step {self.step}; {self._good_state()}. Lower "
                "--lr, or try --amp bf16 or --amp off")
        record = {"event": "train", "step": self.step, "epoch": epoch, "loss": loss,
                  "lr": self.step_fn.sched.get_last_lr()[0],
                  "img_per_s": window["images"] * self.d.world_size / seconds,
                  "data_wait_ms": 1000 * wait / window["n"],
                  "data_wait_pct": 100 * wait / seconds, "time": time.time()}
        if self.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log(record)
        window.update(loss=torch.zeros((), device=self.device), n=0, images=0,
                      t0=time.perf_counter())
        return {"loss": f"{loss:.4f}", "img/s": f"{record['img_per_s']:.0f}",
                "wait": f"{record['data_wait_pct']:.0f}%"}

    def validate(self, epoch: int) -> dict:
        cfg = self.cfg
        if self.val is None or (epoch + 1) % cfg.val_every and epoch + 1 != cfg.epochs:
            return {}
        model = self.step_fn.ema.module if self.step_fn.ema is not None else self.model
        grid = self.out / "samples" / f"epoch{epoch:04d}.png"
        scores = evaluate(model, self.val, cfg.batch_size, self.device, AMP_DTYPES[self.amp],
                          cfg.channels_last, grid)
        self.log.image("val/grid_lr_bicubic_sr_hr", grid, self.step)
        improved = scores["psnr"] > self.best
        self.best, self.stale = (scores["psnr"], 0) if improved else (self.best, self.stale + 1)
        if improved:
            self._save("best.pt")
        self.log({"event": "val", "step": self.step, "epoch": epoch, **scores,
                  "time": time.time()})
        return scores

    def stop_early(self) -> bool:
        stop = bool(self.cfg.early_stop) and self.stale >= self.cfg.early_stop
        stop = ddp.broadcast_flag(self.d, stop, self.device)
        if stop:
            self.log({"event": "early_stop", "step": self.step, "best_psnr": self.best})
        return stop

    # -- loader efficiency -------------------------------------------------------------
    def profile(self, steps: int = 20, warmup: int = 5) -> dict:
        """img/s fed by the loader and on synthetic data, for the same step on copies of the
        model and optimizer (the run itself is untouched)."""
        return loader_efficiency(self.cfg, self.model, self.device, self.amp, steps, warmup)


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
                      warmup: int = 5, loader=None, dali_outputs: str | None = None) -> dict:
    """Loader efficiency: img/s with the loader ÷ img/s on synthetic (pre-made) batches.

    Also, per fed step: how long the GPU sat idle for data (``fed_data_wait_ms``, the
    trainer's data wait: the wall time on a CPU) and the median time the host spent
    fetching a batch (``fed_fetch_ms``). A loader that makes the host wait for the GPU
    shows a fetch as long as a step; one that is slow on the host, a GPU wait."""
    set_kernels(cfg, device)
    if loader is None:
        loader = srdata.make_loader(cfg.db, cfg.loader, cfg.batch_size, cfg.patch, cfg.scale,
                                    seed=cfg.seed + 1, sample_ratio=1.0, device=device,
                                    dtype=AMP_DTYPES[amp], channels_last=cfg.channels_last,
                                    workers=loader_workers(cfg.workers), lr_db=cfg.lr_db,
                                    degradation=cfg.degradation, usm=cfg.usm,
                                    dali_outputs=dali_outputs)

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
            "fed_fetch_ms": 1000 * statistics.median(fetches) if n else None}


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
