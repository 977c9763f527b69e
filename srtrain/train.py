"""The training loop: one obvious loop, the GPU kept busy, every position resumable.

No host synchronisation in the hot loop: the loss stays on the device and is read every
``log_every`` steps. Data wait is the time the GPU sat idle between one step's work and the
next batch (CUDA events on the GPU's own timeline, so work queued earlier never counts as
waiting); on the CPU, the wall time spent in the loader.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import suppress
from pathlib import Path

import torch
from tqdm import tqdm

import srdata
from srdata.format import write_json_atomic
from srdata.paired import pair
from srdata.reader import open_db, same_database
from srdata.schedule import PatchSchedule

from . import checkpoint, ddp, gan
from .config import AMP_DTYPES, TrainConfig, loader_workers, resolve_amp
from .kernels import check_cuda_graphs, compile_net, resolve_compile, set_kernels
from .models import build_model, load_weights
from .runfolder import Logger, check_fresh_out, run_lock
from .stepper import Stepper, total_steps
from .timing import DataTimer, loader_efficiency, timed_fetches
from .validate import ValSet, evaluate, split_ids


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says what to do."""


def patch_schedule(cfg: TrainConfig) -> PatchSchedule | None:
    """``--patch-schedule`` as the loader takes it; None for one fixed ``--patch``."""
    if cfg.patch_schedule is None:
        return None
    return PatchSchedule.parse(cfg.patch_schedule, cfg.batch_size, cfg.batch_schedule)


def check_validation_lr(cfg: TrainConfig) -> None:
    """Where validation's LR comes from must be said once: paired databases bring theirs
    (--lr-db for a held-out split, --val-lr-db for --val-db), or the degradation makes it."""
    if cfg.val_lr_db and not cfg.val_db:
        raise ValueError("--val-lr-db is the LR of --val-db; give the validation HR database "
                         "with --val-db too")
    if cfg.val_lr_db and cfg.val_degradation is not None:
        raise ValueError("--val-degradation makes LR from HR, but --val-lr-db brings its own "
                         "LR images; drop one of them")
    if cfg.lr_db and not cfg.val_db and cfg.val_degradation not in (None, "nn"):
        raise ValueError("--val-degradation makes LR from HR, but with --lr-db validation "
                         "uses the paired LR images; drop --val-degradation")
    if cfg.lr_db and cfg.val_db and not cfg.val_lr_db and cfg.val_degradation is None:
        raise ValueError("--val-db has no LR images of its own here: give them with "
                         "--val-lr-db (e.g. Set5's LRbicx4), or make them with "
                         "--val-degradation bicubic")


def data_identities(db, val_db=None, lr_db=None) -> dict:
    """The identities of the run's open databases, which a move or copy keeps and a repack
    changes (``PackedDB.identity``, ``BasicSRDB.identity``)."""
    return {key: d.identity if d is not None else None
            for key, d in (("db", db), ("val_db", val_db), ("lr_db", lr_db))}


def train(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns the last validation scores and counters."""
    d, device = ddp.setup(cfg.device)
    try:
        with run_lock(Path(cfg.out), d.main):
            trainer = Trainer(cfg, d, device)
            try:
                return trainer.run()
            except Exception:
                trainer.undo_start()
                raise
    finally:
        ddp.teardown(d)


# What a run writes in --out (checkpoints, config, metrics, validation grids, TensorBoard
# events): a fresh run refuses a folder holding any of them rather than replace or append
# to another run's files.
# fewer validation images than this: a warning that the scores are noise
FEW_VAL = 8
FIRST_LOG = 10  # steps into a run: its first train record


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
        # the GAN stage's discriminator and VGG19 first: a missing file before any data
        parts = gan.build_stage(cfg, device) if cfg.stage == "gan" else None
        db = open_db(cfg.db)
        if cfg.lr_db and cfg.degradation != "nn":  # the loader says so in its own words
            raise ValueError(f"--degradation {cfg.degradation} makes LR from HR, but --lr-db "
                             "brings its own LR; drop --degradation (or --lr-db)")
        check_validation_lr(cfg)
        train_ids, val_ids = split_ids(len(db), 0.0 if cfg.val_db else cfg.val_split,
                                       cfg.seed)
        self.schedule = patch_schedule(cfg)
        self.loader = srdata.make_loader(
            db, cfg.loader, cfg.batch_size, cfg.patch, cfg.scale, seed=cfg.seed,
            sample_ratio=cfg.sample_ratio, rank=d.rank, world_size=d.world_size,
            device=device, dtype=AMP_DTYPES[self.amp], channels_last=cfg.channels_last,
            workers=loader_workers(cfg.workers), ids=train_ids, lr_db=cfg.lr_db,
            patch_schedule=self.schedule, degradation=cfg.degradation,
            # the GAN stage sharpens its L1/perceptual target itself: D sees the plain HR
            usm="lr" if cfg.usm and parts is not None else cfg.usm, augment=cfg.augment)
        self.val = None
        vdb = open_db(cfg.val_db) if cfg.val_db else None
        # the validation images' LR: paired with --val-db, the training pairs' held-out
        # part, or (None) made from HR by the degradation
        val_lr = (pair(vdb, open_db(cfg.val_lr_db), cfg.scale)
                  if cfg.val_lr_db else None if vdb is not None else self.loader.lr)
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
            self.val = ValSet(vdb, ids, val_patch, cfg.scale, cfg.val_images, lr=val_lr,
                              degradation=cfg.val_degradation or cfg.degradation)
            held = len(self.val.hr)
            if held < FEW_VAL:
                warnings.warn(
                    f"validation scores {held} image(s) only"
                    + ("" if cfg.val_db else f" (--val-split {cfg.val_split} of "
                       f"{len(db):,} images)")
                    + ", so its PSNR is noisy and best.pt follows the noise; give --val-db "
                    "or a larger --val-split", stacklevel=2)
        self.train_images = len(train_ids)
        starts = [e for e, _ in self.schedule.stages] if self.schedule else [0]
        fewest = min(self.loader.batches_in(e) for e in starts)
        if fewest < cfg.accum:
            raise ValueError(f"--accum {cfg.accum} is more than the {fewest} "
                             "batches of an epoch; lower --accum or --batch-size")
        model = build_model(cfg.model, cfg.scale, cfg.num_feat, cfg.num_block, cfg.num_grow_ch)
        if cfg.init_weights and state is None:
            load_weights(model, cfg.init_weights)
        elif cfg.stage == "gan" and state is None:
            warnings.warn("--stage gan starts from random generator weights; Real-ESRGAN's "
                          "second stage fine-tunes stage 1's: give --init-weights "
                          "(e.g. runs/esrnet/best.pt, or RealESRNet_x4plus.pth)", stacklevel=2)
        fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
        model = model.to(device, memory_format=fmt)
        net = model
        if d.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        net = compile_net(model, net, cfg.compile, cfg.cuda_graphs)
        self.model = model
        self.total_steps = total_steps(cfg.epochs, cfg.accum, self.loader.batches_in)
        self.step_fn = (Stepper(cfg, model, net, device, self.amp, self.total_steps)
                        if parts is None else gan.build_gan_stepper(
                            cfg, parts, model, net, device, self.amp, self.total_steps, d))
        self.step, self.best, self.stale = 0, -math.inf, 0
        self.in_epoch, self.step_batch = False, 0  # the loader position of the last step
        self.saved = {}  # checkpoint name -> the step it holds; every one has finite weights
        self.log = Logger(self.out, d.main, cfg.tensorboard, console=cfg.progress)
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
        if gan.nonfinite_weights(state):
            # written by an srtrain without the guard
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
            if not same_database(saved.get(key), self.data_ids[key]):
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
        bad = gan.nonfinite_weights(state)  # generator, EMA and discriminator
        if bad:  # never replace a good checkpoint with weights that upscale to black
            raise TrainingError(
                f"the weights became non-finite (NaN or inf in {bad[0]}) by step {self.step}, "
                f"so {name} was not written; {self._good_state()}. Lower --lr, or try --amp "
                "bf16 or --amp off")
        checkpoint.save(self.out / name, state)
        self.saved[name] = self.step

    def undo_start(self) -> None:
        """A fresh run that failed before its first step (a loader that cannot start): remove
        the files it wrote, so that the same command in --out is not refused afterwards.
        check_fresh_out found none of them there, and OUT/.lock kept other runs out since."""
        if not self.d.main or self.cfg.resume or self.step or self.saved:
            return
        with suppress(OSError, ValueError):  # the failure being raised is the one to report
            self.log.close()
        tb = self.out / "tb"
        written = [self.out / "config.json", self.out / "metrics.jsonl",
                   *tb.glob("events.out.tfevents.*")]
        for path in written:
            with suppress(FileNotFoundError):
                path.unlink()
        with suppress(OSError):  # not empty: not only ours
            tb.rmdir()

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
        self.log(self.start_record())
        # the first loss early (it also times the start: compile, workers), then every
        # --log-every steps
        self.first_log = self.step + min(FIRST_LOG, cfg.log_every)
        result, t0 = {}, time.perf_counter()
        try:
            for epoch in range(self.loader.epoch, cfg.epochs):
                self.loader.set_epoch(epoch)
                self.log_stage(epoch)
                self.train_epoch(epoch)
                result = self.validate(epoch)
                self.log({"event": "epoch", "epoch": epoch, "epochs": cfg.epochs,
                          "step": self.step, **self.epoch_stats(), **result})
                # after validation: the best score and patience count belong to the state
                self._save("last.pt")
                if self.stop_early():
                    break
        except KeyboardInterrupt:
            self._save("last.pt")
            self.log({"event": "interrupted", "step": self.step})
            raise
        else:
            end = {"step": self.step, "epoch": self.loader.epoch, "best_psnr": self.best,
                   "seconds": time.perf_counter() - t0, **result}
            self.log({"event": "end", **end})
            return end
        finally:
            self.log.close()

    def start_record(self) -> dict:
        """The run in one record: what trains on what, where, and how long an epoch is
        (the terminal's summary; ``resumed`` where it continues a checkpoint)."""
        cfg, loader = self.cfg, self.loader
        record = {"event": "start", "stage": cfg.stage, "model": cfg.model, "scale": cfg.scale,
                  "params": sum(p.numel() for p in self.model.parameters()),
                  "device": str(self.device), "amp": self.amp, "compile": cfg.compile,
                  "cuda_graphs": bool(cfg.cuda_graphs), "db": cfg.db,
                  "train_images": self.train_images,
                  "val_images": len(self.val.hr) if self.val is not None else 0,
                  "degradation": cfg.degradation, "paired": bool(cfg.lr_db),
                  "loader": cfg.loader, "workers": loader.workers,
                  "epochs": cfg.epochs, "steps_per_epoch": len(loader) // cfg.accum,
                  "batch_size": cfg.batch_size, "patch": cfg.patch,
                  "patch_schedule": cfg.patch_schedule, "out": str(self.out)}
        if self.step:
            record["resumed"] = {"epoch": loader.epoch, "step": self.step,
                                 "batch": loader.batch}
        return record

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
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True, leave=False,
                   # None: no bar where stderr is no terminal (a log file keeps the
                   # epoch lines, not a bar's redraws)
                   disable=None if self.d.main and cfg.progress else True)
        window = {"terms": {}, "n": 0, "images": 0, "t0": time.perf_counter()}
        self.in_epoch, self.step_batch = True, self.loader.batch
        self.epoch_sums = {"loss": 0.0, "n": 0, "images": 0, "seconds": 0.0, "wait": 0.0}
        for lr, hr in timed_fetches(self.loader, 0, timer):
            loss, stepped = self.step_fn(lr, hr)
            # Stepper's L1 loss, or GANStepper's terms by name ("loss": the generator's)
            terms, sums = (loss if isinstance(loss, dict) else {"loss": loss}), window["terms"]
            for name, value in terms.items():
                sums[name] = sums.get(name, 0) + value
            window["n"] += 1
            window["images"] += hr.shape[0]
            bar.update()
            if not stepped:
                continue
            self.step += 1
            self.step_batch = self.loader.batch
            if self.step % cfg.log_every == 0 or self.step == self.first_log:
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
        """Read the window's loss terms (the one host sync), log them, stop on a non-finite
        one."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - window["t0"]
        names = list(window["terms"])
        means = ddp.mean(self.d, torch.stack([window["terms"][k] for k in names]) / window["n"])
        terms = dict(zip(names, means.tolist()))
        loss = terms.pop("loss")
        wait = timer.collect()
        for name, value in {"loss": loss, **terms}.items():
            if not math.isfinite(value):
                what = "the loss" if name == "loss" else f"the loss term {name}"
                raise TrainingError(
                    f"{what} became {value} by step {self.step}; {self._good_state()}. "
                    "Lower --lr, or try --amp bf16 or --amp off")
        record = {"event": "train", "step": self.step, "epoch": epoch, "loss": loss, **terms,
                  "lr": self.step_fn.sched.get_last_lr()[0],
                  "img_per_s": window["images"] * self.d.world_size / seconds,
                  "data_wait_ms": 1000 * wait / window["n"],
                  "data_wait_pct": 100 * wait / seconds, "time": time.time()}
        if self.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log(record)
        sums = self.epoch_sums
        sums["loss"] += loss * window["n"]
        for key, value in (("n", window["n"]), ("images", window["images"]),
                           ("seconds", seconds), ("wait", wait)):
            sums[key] += value
        window.update(terms={}, n=0, images=0, t0=time.perf_counter())
        return {"loss": f"{loss:.4f}", "img/s": f"{record['img_per_s']:.0f}",
                "wait": f"{record['data_wait_pct']:.0f}%"}

    def epoch_stats(self) -> dict:
        """The epoch's mean loss, img/s and data wait (the part this process trained)."""
        s = self.epoch_sums
        if not s["n"]:
            return {}
        return {"loss": s["loss"] / s["n"], "seconds": s["seconds"],
                "img_per_s": s["images"] * self.d.world_size / s["seconds"],
                "data_wait_pct": 100 * s["wait"] / s["seconds"]}

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
            self.log({"event": "early_stop", "step": self.step, "best_psnr": self.best,
                      "patience": self.cfg.early_stop})
        return stop

    # -- loader efficiency -------------------------------------------------------------
    def profile(self, steps: int = 20, warmup: int = 5) -> dict:
        """img/s fed by the loader and on synthetic data, for the same step on copies of the
        model and optimizer (the run itself is untouched)."""
        return loader_efficiency(self.cfg, self.model, self.device, self.amp, steps, warmup)
