"""``srtrain``: train a super-resolution model from a packed database, or apply one.

    srtrain --db DB --loader dali [--model esrgan] [--scale 4] [--batch-size 32] ...
    srtrain --stage gan --init-weights RUN/best.pt --db DB ...   (Real-ESRGAN's stage 2)
    srtrain upscale --ckpt OUT/best.pt INPUT OUTPUT
    srtrain export --ckpt OUT/best.pt net_g.pth     (weights for BasicSR / Real-ESRGAN)
        [--discriminator net_d.pth]                  (and a GAN run's discriminator)
    srtrain demo [--out runs/demo]      (the whole pipeline on sample photos, in minutes)
    torchrun --nproc-per-node N -m srtrain --db DB ...     (many GPUs)

The options BATCH_SIZE, TARGET_SIZE (HR patch), NUM_EPOCHS and SAMPLE_RATIO can also come
from environment variables of those names, as in the scripts users already run.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import click
import torch

from srdata import DBError
from srdata.sampler import AUGMENTS, DEGRADATIONS
from srdata.schedule import BATCH_SCHEDULES, MAX_BATCH_GROWTH, PatchSchedule

from .config import AMPS, COMPILES, SCHEDULES, STAGES, TrainConfig
from .console import end_summary
from .demo import EPOCHS as DEMO_EPOCHS, IMAGES as DEMO_IMAGES, resolve_loader
from .exports import FORMATS
from .models import MODELS
from .upscale import MAX_PIXELS

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


class Finite(click.FloatRange):
    """A FloatRange that also refuses NaN (which passes every comparison) and inf."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value} is not a finite number", param, ctx)
        return rv


# Upper bounds of the numeric options, far above any run's value and below what overflows
# or never ends: Adam with an LR of 1e38 overflows float32 in its first step, a billion
# epochs take as long to plan, a billion features to allocate
MAX_LR, MAX_WEIGHT_DECAY = 1.0, 1.0
MAX_EPOCHS, MAX_WORKERS, MAX_SEED = 100_000, 1024, 2**32 - 1
MAX_FEAT, MAX_BLOCKS = 1024, 256
MAX_LOSS_WEIGHT = 1e6

# --stage gan: train_realesrgan_x4plus.yml's settings for the options a run neither gives
# nor inherits (--resume) from its settings
GAN_DEFAULTS = {"lr": 1e-4, "schedule": "constant", "degradation": "realesrgan", "usm": True}
# the options only --stage gan reads
GAN_OPTIONS = ("pixel_weight", "perceptual_weight", "gan_weight", "vgg_weights", "d_num_feat")


@click.group(invoke_without_command=True, context_settings=CONTEXT)
@click.option("--db", type=click.Path(), help="Training database (srdata pack, or BasicSR LMDB).")
@click.option("--out", default="runs/sr", type=click.Path(file_okay=False),
              help="Run folder: checkpoints, metrics.jsonl, sample grids.")
@click.option("--loader", default="auto", type=click.Choice(["auto", "dali", "torch"]),
              help="auto: DALI when installed (on the GPU, else its CPU mode), else torch; "
                   "the run records which.")
@click.option("--model", default="esrgan", type=click.Choice(list(MODELS)),
              help="esrgan 64/23/32, light 32/12/16, fast 32/8/16 (RRDBNet feat/blocks/grow), "
                   "rrdbnet (set the sizes), srcnn.")
@click.option("--num-feat", type=click.IntRange(1, MAX_FEAT), help="--model rrdbnet only.")
@click.option("--num-block", type=click.IntRange(1, MAX_BLOCKS),
              help="--model rrdbnet only.")
@click.option("--num-grow-ch", type=click.IntRange(1, MAX_FEAT), help="--model rrdbnet only.")
@click.option("--scale", default=4, type=click.Choice(["2", "3", "4"]))
@click.option("--batch-size", default=32, type=click.IntRange(min=1), envvar="BATCH_SIZE",
              show_envvar=True, help="Per GPU.")
@click.option("--patch", default=256, type=click.IntRange(min=8), envvar="TARGET_SIZE",
              show_envvar=True, help="HR patch side; divisible by --scale.")
@click.option("--patch-schedule", metavar="PATCH:EPOCH,...",
              help="Progressive patches, e.g. 128:0,192:10,256:20 (128 px from epoch 0, 192 "
                   "from 10, 256 from 20); validation uses the last. Replaces --patch.")
@click.option("--batch-schedule", default="keep", type=click.Choice(BATCH_SCHEDULES),
              help="With --patch-schedule: keep the images per step, or keep the pixels "
                   "(--batch-size at the last patch, x (last/patch)^2 for smaller ones, at "
                   f"most x{MAX_BATCH_GROWTH}).")
@click.option("--epochs", default=30, type=click.IntRange(1, MAX_EPOCHS),
              envvar="NUM_EPOCHS", show_envvar=True)
@click.option("--sample-ratio", default=1.0, type=Finite(0, 1, min_open=True),
              envvar="SAMPLE_RATIO", show_envvar=True,
              help="Fraction of the database drawn afresh each epoch.")
@click.option("--lr", default=2e-4, type=Finite(0, MAX_LR, min_open=True),
              help="Peak learning rate  [--stage gan: 1e-4]")
@click.option("--weight-decay", default=0.0, type=Finite(0, MAX_WEIGHT_DECAY))
@click.option("--schedule", default="onecycle", type=click.Choice(SCHEDULES),
              help="LR per optimizer step; cosine_restarts: BasicSR's 4 equal cosine periods "
                   "down to 1e-7. Adam's betas stay 0.9/0.99 in all.  [--stage gan: "
                   "constant]")
@click.option("--accum", default=1, type=click.IntRange(min=1),
              help="Batches per optimizer step (gradient accumulation).")
@click.option("--amp", default="auto", type=click.Choice(AMPS),
              help="auto: bf16 where the GPU has it, else fp16 (with a GradScaler); off on CPU.")
@click.option("--channels-last/--no-channels-last", default=True)
@click.option("--compile", "compile_", type=click.Choice(COMPILES), default="auto",
              is_flag=False, flag_value="model", show_default=True,
              help="torch.compile each of the model's repeated blocks ('blocks': RRDBNet's "
                   "one block compiled once for all of them, in seconds), the whole model "
                   "(--compile alone; minutes), or nothing. auto: blocks on one GPU (esrgan "
                   "1.5x faster on an H100), off on the CPU and under torchrun.")
@click.option("--ema", default=0.999, type=Finite(0, 1, max_open=True),
              help="Decay of the exponential moving average of the weights that validation, "
                   "export and upscale use (warmed up over the first ~9k steps); 0: none.")
@click.option("--cudnn-benchmark/--no-cudnn-benchmark", default=True,
              help="CUDA: let cuDNN time its convolution algorithms once per shape.")
@click.option("--tf32/--no-tf32", default=True,
              help="CUDA, fp32 math (--amp off): convolutions and matmuls on TF32 tensor cores.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="CUDA, with --compile: replay the compiled step's kernels as CUDA graphs "
                   "(torch.compile's reduce-overhead mode): far fewer launches for the GPU to "
                   "wait on. One GPU, --accum 1.  [default: on with compiled blocks there]")
@click.option("--lr-db", type=click.Path(),
              help="Paired LR database (srdata pack or BasicSR LMDB, e.g. "
                   "DIV2K_train_LR_bicubic_X4_sub.lmdb): train and validate on its images, "
                   "matched to --db's by name, instead of downscaling --db.")
@click.option("--degradation", default="nn", type=click.Choice(DEGRADATIONS),
              help="How LR is made from HR: nn (pick every --scale-th pixel, the fastest), "
                   "bicubic (MATLAB imresize, as DIV2K's LR), realesrgan (Real-ESRGAN's "
                   "second-order blur/resize/noise/JPEG, parameters drawn per sample)  "
                   "[--stage gan: realesrgan]")
@click.option("--val-degradation", type=click.Choice(DEGRADATIONS),
              help="LR of the validation crops (fixed parameters per image)  "
                   "[default: --degradation]")
@click.option("--usm/--no-usm", default=False,
              help="USM-sharpen the HR first (Real-ESRGAN's gt_usm, BasicSR's USMSharp): "
                   "the LR is made from the sharpened HR, and the model trains against it "
                   "(--stage gan: its pixel and perceptual losses; the discriminator sees "
                   "the plain HR).  [--stage gan: --usm]")
@click.option("--augment", default="all", type=click.Choice(AUGMENTS),
              help="Flips of each training patch: all 8 symmetries of the square, hflip "
                   "(left-right only, half the patches; Real-ESRGAN's x4plus), or none.")
@click.option("--stage", default="l1", type=click.Choice(STAGES),
              help="l1: the model alone against L1 (Real-ESRNet, stage 1); gan: Real-ESRGAN's "
                   "stage 2, from --init-weights, against a U-Net discriminator with pixel, "
                   "perceptual and GAN losses (changes the defaults marked --stage gan).")
@click.option("--pixel-weight", default=1.0, type=Finite(0, MAX_LOSS_WEIGHT),
              help="--stage gan: weight of the L1 loss (0 turns a loss off, as for each "
                   "weight).")
@click.option("--perceptual-weight", default=1.0, type=Finite(0, MAX_LOSS_WEIGHT),
              help="--stage gan: weight of the VGG19 perceptual loss.")
@click.option("--gan-weight", default=0.1, type=Finite(0, MAX_LOSS_WEIGHT),
              help="--stage gan: weight of the generator's GAN loss (0: no discriminator).")
@click.option("--vgg-weights", type=click.Path(dir_okay=False), metavar="PATH",
              help="--stage gan: VGG19's ImageNet weights (vgg19-dcbb9e9d.pth)  [default: "
                   "found in torchvision's cache or experiments/pretrained_models]")
@click.option("--d-num-feat", default=64, type=click.IntRange(1, MAX_FEAT),
              help="--stage gan: the discriminator's width.")
@click.option("--val-db", type=click.Path(), help="Validate on this database.")
@click.option("--val-lr-db", type=click.Path(),
              help="The LR images of --val-db, matched by name (e.g. Set5's LRbicx4): "
                   "validate on them instead of downscaling --val-db.")
@click.option("--val-split", default=0.02, type=Finite(0, 1, max_open=True),
              help="Without --val-db: hold out this fraction of --db for validation.")
@click.option("--val-images", default=32, type=click.IntRange(min=1),
              help="Validate on at most this many images (centre crops of --patch).")
@click.option("--val-every", default=1, type=click.IntRange(min=1), help="Epochs.")
@click.option("--early-stop", type=click.IntRange(min=1), metavar="PATIENCE",
              help="Stop after this many validations without a better PSNR.")
@click.option("--save-every", default=0, type=click.IntRange(min=0),
              help="Also write last.pt every N optimizer steps (0: at epoch ends only).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last.pt, with the run's own settings "
                   "(OUT/config.json) for every option not given; a larger --epochs trains "
                   "longer, the LR schedule re-planned over the new total.")
@click.option("--seed", default=0, type=click.IntRange(0, MAX_SEED))
@click.option("--init-weights", type=click.Path(exists=True, dir_okay=False),
              help="Start from these weights (ours, or BasicSR/Real-ESRGAN params[_ema]).")
@click.option("--device", help="cuda, cuda:1 or cpu  [default: cuda if present]")
@click.option("--workers", type=click.IntRange(0, MAX_WORKERS),
              help="CPU workers for the loader  [default: all cores but one]")
@click.option("--log-every", default=50, type=click.IntRange(min=1), help="Steps.")
@click.option("--profile-loader", is_flag=True,
              help="First measure loader efficiency: img/s fed by the loader / img/s on "
                   "synthetic data.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--tensorboard", is_flag=True,
              help="Also write TensorBoard events to OUT/tb (needs srpipe[tensorboard]).")
@click.version_option(package_name="srpipe")
@click.pass_context
def main(ctx, db, compile_, quiet, scale, **opts):
    """Train a super-resolution model on the database --db (a sub-command does other things).

    Progress goes to the terminal and OUT/metrics.jsonl; OUT/last.pt is written every epoch,
    OUT/best.pt at each best validation PSNR."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    # "warning: ..." on one line, as the errors are, not Python's file:line and source line
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    if ctx.invoked_subcommand is not None:
        return
    inherited = set()
    if opts["resume"]:
        db, compile_, quiet, scale, inherited = _saved_settings(ctx, opts, db, compile_,
                                                                quiet, scale)
    _stage_options(ctx, opts, inherited)
    if db is None:
        raise click.UsageError("--db is required to train (or name a sub-command: upscale, "
                               "export, demo)")
    _patch_schedule(ctx, opts)
    _device(opts["device"])
    opts["loader"] = resolve_loader(opts["loader"])
    cfg = TrainConfig(db=db, compile=compile_, progress=not quiet, scale=int(scale), **opts)
    _check(cfg)
    _check_out(cfg.out)
    from .train import TrainingError, train
    last = _stamp(Path(cfg.out) / "last.pt")
    try:
        result = train(cfg)
    except (ValueError, DBError, TrainingError, ImportError) as e:
        raise click.ClickException(str(e)) from None
    except torch.OutOfMemoryError:
        raise click.ClickException(
            f"the GPU ran out of memory with --batch-size {cfg.batch_size} --patch "
            f"{cfg.patch}; try --batch-size {max(1, cfg.batch_size // 2)} --accum "
            f"{cfg.accum * 2} (the same effective batch) or a smaller --patch") from None
    except (OSError, RuntimeError) as e:
        # the loader's other workers may be dying too: their SIGCHLD handlers (PyTorch's,
        # the DALI loader's) must not interrupt the message with another traceback
        if hasattr(signal, "SIGCHLD"):
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        message = _failure(e, cfg.out)
        if message is None:
            raise  # a bug: keep its traceback
        raise click.ClickException(message) from None
    except KeyboardInterrupt:
        click.echo(f"\n{_interrupted(cfg.out, last)}", err=True)
        sys.exit(130)
    click.echo(end_summary(result, cfg.out))


# the command's parameters whose TrainConfig field has another name
_PARAM_FIELDS = {"compile_": "compile"}
# what a resumed run does not take from the run's settings: how this command reports, and
# the machine's own choices (the saved ones may be another machine's: compile resolved for
# a GPU, its worker count), which take this machine's defaults
_NOT_INHERITED = {"out", "resume", "quiet", "profile_loader", "device", "workers",
                  "compile_", "cuda_graphs", "cudnn_benchmark", "tf32", "init_weights"}


def _saved_settings(ctx, opts: dict, db, compile_, quiet, scale):
    """--resume: every option left out of the command line that decides what the run
    computes takes the run's value from OUT/config.json, so `srtrain --out RUN --resume`
    continues a run however it was started; an option given on the line is compared with
    the checkpoint as before. Returns db, compile_, quiet and scale (main's own
    parameters) and the names of the options taken; updates ``opts`` in place."""
    path = Path(opts["out"]) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:  # nothing to read: the trainer says what is missing
        return db, compile_, quiet, scale, set()
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot read the run's settings in {path} ({e}); give "
                                   "every option of the run on the command line") from None
    if not isinstance(saved, dict):
        raise click.ClickException(f"{path} is not a run's settings (a JSON object expected)")
    mine = {"db": db, "compile_": compile_, "quiet": quiet, "scale": scale}
    taken = set()
    for param in ctx.command.params:
        name = param.name
        if name in _NOT_INHERITED or name not in {*opts, *mine}:
            continue
        if _given(ctx, name):
            continue  # the user's word
        field = _PARAM_FIELDS.get(name, name)
        if field not in saved:
            continue  # a setting newer than the run: its default
        value = str(saved[field]) if name == "scale" else saved[field]
        (mine if name in mine else opts)[name] = value
        taken.add(name)
    return mine["db"], mine["compile_"], mine["quiet"], mine["scale"], taken


def _given(ctx, name: str) -> bool:
    """Whether the command line (or an environment variable) set the option ``name``."""
    return ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)


def _stage_options(ctx, opts: dict, inherited: set) -> None:
    """--stage gan: GAN_DEFAULTS for the options neither given nor ``inherited`` from the
    run's settings (--resume); --stage l1: no option that only the GAN stage reads."""
    if opts["stage"] == "gan":
        for name, value in GAN_DEFAULTS.items():
            if not _given(ctx, name) and name not in inherited:
                opts[name] = value
        return
    given = [f"--{n.replace('_', '-')}" for n in GAN_OPTIONS if _given(ctx, n)]
    if given:
        them = "it" if len(given) == 1 else "them"
        raise click.UsageError(f"{', '.join(given)}: only --stage gan reads {them}; add "
                               f"--stage gan or drop {them}")


def _stamp(path: Path) -> tuple | None:
    """What tells one version of ``path`` from another (a checkpoint is replaced by a
    rename: a new inode); None if there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _interrupted(out: str, before: tuple | None) -> str:
    """What a Ctrl-C left: ``before``, the ``_stamp`` of OUT/last.pt when the run began."""
    last = Path(out) / "last.pt"
    now = _stamp(last)
    if now is None:
        return (f"interrupted before the first checkpoint: there is nothing in {out} to "
                "resume; run it again to start over")
    if now != before:
        return f"interrupted: saved {last}; continue with --resume"
    return f"interrupted before a new checkpoint: {last} is as it was; continue with --resume"


def _patch_schedule(ctx, opts: dict) -> None:
    """--patch-schedule in its canonical form, and --patch its final patch."""
    if opts["patch_schedule"] is None:
        return
    try:
        sched = PatchSchedule.parse(opts["patch_schedule"], opts["batch_size"],
                                    opts["batch_schedule"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--patch-schedule") from None
    given = ctx.get_parameter_source("patch") != click.core.ParameterSource.DEFAULT
    if given and opts["patch"] != sched.final:
        raise click.BadParameter(f"got --patch {opts['patch']} with a --patch-schedule ending "
                                 f"at {sched.final}; leave --patch out (the schedule's last "
                                 "patch is the validation size)", param_hint="--patch")
    opts["patch"], opts["patch_schedule"] = sched.final, sched.text


def _check_schedule(cfg: TrainConfig, shortest: int | None = None) -> None:
    if cfg.patch_schedule is None:
        return
    try:
        PatchSchedule.parse(cfg.patch_schedule, cfg.batch_size).check(cfg.scale, shortest,
                                                                      cfg.epochs)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--patch-schedule") from None


def _check(cfg: TrainConfig) -> None:
    """The mistakes we can name before any work starts."""
    from srdata.reader import open_db
    from .models import build_model
    _check_schedule(cfg)
    if cfg.patch % cfg.scale:
        lo = cfg.patch - cfg.patch % cfg.scale
        raise click.BadParameter(f"{cfg.patch} is not divisible by --scale {cfg.scale}; "
                                 f"use {lo} or {lo + cfg.scale}", param_hint="--patch")
    try:
        build_model(cfg.model, cfg.scale, cfg.num_feat, cfg.num_block, cfg.num_grow_ch)
        db = open_db(cfg.db)
    except ValueError as e:  # DBError is a ValueError
        raise click.UsageError(str(e)) from None
    short = min(min(h, w) for h, w in zip(db.heights, db.widths))
    _check_schedule(cfg, short)
    if short < cfg.patch:
        raise click.BadParameter(f"{cfg.patch} is larger than the smallest image of "
                                 f"{cfg.db} ({short} px short side); use --patch "
                                 f"{short - short % cfg.scale} or less, or pack with "
                                 f"--min-size {cfg.patch}", param_hint="--patch")


def _device(name: str | None) -> torch.device:
    """--device as torch.device, or one line naming what is wrong with it."""
    from srdata.loader import parse_device
    try:
        return parse_device(name)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None


def _check_out(out: str) -> None:
    """--out must be a folder we can write, or one we can make."""
    p = Path(out).absolute()
    while not p.exists():  # also False for a path under a file
        p = p.parent
    if not p.is_dir():
        raise click.BadParameter(f"{p} is a file, so {out} cannot be a folder; choose "
                                 "another --out", param_hint="--out")
    if not os.access(p, os.W_OK | os.X_OK):
        raise click.BadParameter(f"cannot write in {p} (read-only or not permitted); "
                                 "choose another --out", param_hint="--out")


# The loaders' workers hand batches over in /dev/shm; when it is full, torch says so (a
# failed allocation, or a worker's bus error) and a DALI worker dies of SIGBUS
SHM_FULL = re.compile(r"unable to allocate shared memory|out of shared memory|"
                      r"killed by signal: Bus error")


def _failure(e: Exception, out: str) -> str | None:
    """One line for a failed read or write, or a dead loader worker; None for anything else
    (a bug, whose traceback is wanted)."""
    shm = _shm_full(e)
    if shm is not None:
        return (f"the data loader ran out of shared memory ({shm}): give /dev/shm more room "
                f"(Docker: `docker run --shm-size=8g`) or lower --workers or --batch-size, "
                f"then {_then(Path(out))}")
    dead = _dead_worker(e)
    if dead is not None:
        return (f"a data loader worker process died ({_first_line(dead)}); the system may have "
                "run out of memory (see `dmesg`): lower --workers or --batch-size, then "
                "continue with --resume")
    if any("Workers initialization failed" in str(x) for x in _chain(e)):
        # DALI's pool: a source worker process ended before it said it was ready
        return ("DALI's worker processes did not start: one ended while starting (the "
                "system may be out of memory, see `dmesg`); lower --workers, or use --loader "
                f"torch, then {_then(Path(out))}")
    e = _write_error(e)
    if e is None:
        return None
    if e.errno in DISK_FULL:
        return f"{_write_failure(e, out, '--out')}, then {_then(Path(out))}"
    if e.errno in NOT_WRITABLE:
        return _write_failure(e, out, "--out")
    return f"{e.filename}: {e.strerror}" if e.filename else str(e)


def _shm_full(e: BaseException) -> str | None:
    """The line saying that the loader's shared memory ran out, with how full /dev/shm is;
    None if no exception in ``e``'s chain says so (torch's line is deep in the worker's
    traceback it forwards)."""
    m = next((m for c in _chain(e) for m in [SHM_FULL.search(str(c))] if m), None)
    if m is None:
        return None
    from srdata._proc import shm_space
    said = m.string[m.string.rfind("\n", 0, m.start()) + 1:].splitlines()[0]
    said = said.strip().split(". ")[0].rstrip(".")  # torch's own advice follows: ours
    return said if "/dev/shm has" in said else f"{said}; {shm_space()}"  # DALI's says it


def _then(out: Path) -> str:
    """How to go on after a failure: from the last checkpoint, or, without one, over again
    (a fresh run refuses a folder holding a run's files: srtrain.runfolder.check_fresh_out)."""
    if (out / "last.pt").exists():
        return "continue with --resume"
    from .runfolder import run_files
    left = run_files(out)
    if not left:
        return "start again"
    return f"start again with another --out (or move {', '.join(left)} out of {out})"


# A failed write's errors, which _failure also finds under another exception: a full disk
# (free some space), a folder that cannot be written (choose another)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
WRITE_ERRNOS = DISK_FULL + NOT_WRITABLE


def _write_error(e: BaseException) -> OSError | None:
    """``e`` if it is an OSError, else a failed write's OSError that ``e`` was raised from
    or while handling: a disk that fills during torch.save raises ENOSPC inside its zip
    writer, whose cleanup then fails with a RuntimeError ("unexpected pos") hiding it. Only
    write errors: a bug raised while handling, say, a FileNotFoundError keeps its
    traceback."""
    if isinstance(e, OSError):
        return e
    return next((c for c in _chain(e) if isinstance(c, OSError) and c.errno in WRITE_ERRNOS),
                None)


def _write_failure(e: OSError, dst: str, what: str = "OUTPUT") -> str:
    """One line for a failed write to ``dst``, the argument ``what`` (a sub-command's
    OUTPUT, or --out; the trainer's _failure words a full disk and a read-only folder
    with it)."""
    from srdata.format import NotOurFile
    if isinstance(e, NotOurFile):  # a link or folder in the way: its line says what to do
        return str(e)
    where = e.filename or dst
    if e.errno in (errno.EEXIST, errno.ENOTDIR):  # making a folder where a file is
        return f"cannot make the folder {where}: a file is in the way; choose another {what}"
    if e.errno in DISK_FULL:
        return f"no space left on the device to write {where}; free some space"
    if e.errno in NOT_WRITABLE:
        return f"cannot write {where}: {e.strerror}; choose another {what}"
    return f"cannot write {where}: {e.strerror or e}"


def _output_failure(e: Exception, dst: str) -> click.ClickException | None:
    """A sub-command's one line for a failed write of OUTPUT; None when ``e`` is none (a
    bug, whose traceback is wanted). torch.save's zip writer hides a full disk under a
    RuntimeError of its own ("unexpected pos")."""
    w = _write_error(e)
    return None if w is None else click.ClickException(_write_failure(w, dst))


def _chain(e: BaseException | None, depth: int = 0):
    """``e`` and the exceptions it was raised from or while handling, depth first."""
    if e is None or depth > 8:
        return
    yield e
    yield from _chain(e.__cause__, depth + 1)
    yield from _chain(e.__context__, depth + 1)


def _dead_worker(e: BaseException | None) -> BaseException | None:
    """The exception saying that a loader worker died: ``e``, or one it was raised from or
    while handling (PyTorch's SIGCHLD handler raises wherever the main thread is, e.g. in
    the middle of torch.save, whose cleanup then fails with an error of its own)."""
    return next((c for c in _chain(e) if _is_dead_worker(c)), None)


def _is_dead_worker(e: BaseException) -> bool:
    from srdata._proc import WorkerDied
    if isinstance(e, (WorkerDied, ConnectionError)):
        return True  # ConnectionError: the pipe to a worker broke (the only sockets we use)
    # torch: "DataLoader worker (pid(s) N) exited unexpectedly" or "... is killed by signal";
    # DALI's pool: "Worker data receiving interrupted" when one of its processes is gone
    return isinstance(e, RuntimeError) and bool(
        re.search(r"DataLoader worker \(pid.*(exited unexpectedly|killed by signal)", str(e))
        or "Worker data receiving interrupted" in str(e))


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0].rstrip(".") if lines else "") or type(e).__name__


@main.command("upscale")
@click.option("--ckpt", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A checkpoint written by srtrain (last.pt or best.pt).")
@click.argument("src", metavar="INPUT", type=click.Path(exists=True))
@click.argument("dst", metavar="OUTPUT", type=click.Path())
@click.option("--tile", default=256, type=click.IntRange(min=0),
              help="Largest input piece in LR pixels, --overlap margins included (bounds memory; "
                   "0: the whole image at once).")
@click.option("--overlap", default=16, type=click.IntRange(min=0))
@click.option("--device", help="cuda or cpu  [default: cuda if present]")
@click.option("--ema/--no-ema", default=True, help="Use the EMA weights when the run kept them.")
@click.option("--overwrite", is_flag=True,
              help="Replace output files that already exist (never an input or a "
                   "checkpoint).")
@click.option("--max-pixels", default=MAX_PIXELS, type=click.IntRange(min=0),
              help="Refuse an image larger than this (width x height, read from its header "
                   "before decoding: a small file can declare a huge image); 0: no limit.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def upscale_cmd(ckpt, src, dst, tile, overlap, device, ema, overwrite, max_pixels, quiet):
    """Upscale the image or folder INPUT into OUTPUT with a trained model (fp16 on a GPU)."""
    from . import checkpoint, upscale
    device = _device(device)
    try:
        model = checkpoint.load_model(ckpt, ema=ema).to(device)
        r = upscale.upscale_path(model, src, dst, tile=tile, overlap=overlap, device=device,
                                 progress=not quiet, overwrite=overwrite,
                                 max_pixels=max_pixels, protect=[ckpt])
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except torch.OutOfMemoryError:
        raise click.ClickException(f"the device ran out of memory with --tile {tile}; try "
                                   f"--tile {max(2 * overlap + 2, tile // 2 if tile else 256)}") from None
    except (OSError, RuntimeError) as e:  # images written before it are whole (atomically)
        failure = _output_failure(e, dst)
        if failure is None:
            raise
        raise failure from None
    for s in r["skipped"]:
        click.echo(f"skipped {s['path']}: {s['reason']}", err=True)
    click.echo(f"wrote {len(r['written'])} image(s) to {dst} in {r['seconds']:.1f} s")
    if not r["written"]:
        sys.exit(1)


@main.command("export")
@click.option("--ckpt", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A checkpoint written by srtrain (last.pt or best.pt).")
@click.argument("dst", metavar="OUTPUT", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS),
              help="pth: BasicSR's {\"params\", \"params_ema\"} file. safetensors: one flat "
                   "state dict of the EMA weights (the raw ones if the run kept no EMA), as "
                   "traiNNer-redux saves and chaiNNer/ComfyUI read. onnx: the model with those "
                   "weights, fp32, input \"input\" (N,3,H,W RGB in 0..1), output "
                   "\"output\", any batch, height and width; runs whatever the model's shape "
                   "(needs pip install -e \".[onnx]\"). Not given: safetensors or onnx when "
                   "OUTPUT ends in .safetensors or .onnx, else pth.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing OUTPUT (and --discriminator file).")
@click.option("--discriminator", type=click.Path(), metavar="PATH",
              help="Also write the discriminator of a --stage gan run as BasicSR's "
                   '{"params": ...} .pth (as RealESRGAN_x4plus_netD.pth), whatever --format.')
def export_cmd(ckpt, dst, fmt, overwrite, discriminator):
    """Write the checkpoint's weights for other tools: by default as BasicSR / Real-ESRGAN
    read them, OUTPUT.pth holding {"params": ..., "params_ema": ...} (params_ema when the
    run kept an EMA); see --format for safetensors and ONNX."""
    from . import checkpoint
    try:
        facts = checkpoint.export(ckpt, dst, overwrite=overwrite, discriminator=discriminator,
                                  fmt=fmt)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except (OSError, RuntimeError) as e:  # written atomically: OUTPUT holds what it held
        failure = _output_failure(e, dst)
        if failure is None:
            raise
        raise failure from None
    what = f"--model {facts['model']} x{facts['scale']}"
    if facts["format"] == "onnx":
        from .exports import ONNX_OPSET
        click.echo(f"wrote {what} with its {facts['keys'][0]} weights as ONNX (opset "
                   f"{ONNX_OPSET}, input \"input\", output \"output\", any batch and size) "
                   f"to {dst}")
    else:
        each = " each" if len(facts["keys"]) > 1 else ""
        click.echo(f"wrote {' and '.join(facts['keys'])} ({facts['tensors']} tensors{each}) of "
                   f"{what} as {facts['format']} to {dst}")
    if discriminator is not None:
        click.echo(f"wrote the discriminator's params ({facts['d_tensors']} tensors) to "
                   f"{discriminator}")
    if facts["format"] != "onnx" and (facts["model"] == "srcnn" or facts["scale"] == 3):
        click.echo("note: BasicSR and Real-ESRGAN have no network for this model and scale "
                   "(only RRDBNet x2 and x4); srtrain upscale and --init-weights read it",
                   err=True)
    if facts["spandrel"]:
        click.echo(f"note: {facts['spandrel']}", err=True)


@main.command("demo")
@click.option("--out", default="runs/demo", type=click.Path(file_okay=False),
              help="Demo folder: crops, databases, the run and report.txt.")
@click.option("--loader", default="auto", type=click.Choice(["auto", "dali", "torch"]),
              help="auto: DALI when installed (GPU, else its CPU mode), else torch.")
@click.option("--epochs", default=DEMO_EPOCHS, type=click.IntRange(1, MAX_EPOCHS),
              help="About 3 s each on a 2-core CPU.")
@click.option("--images", default=DEMO_IMAGES, type=click.IntRange(min=1),
              help="Training crops to cut from the sample photos.")
@click.option("--degradation", default="nn", type=click.Choice(DEGRADATIONS),
              help="How the LR of training and validation is made (see srtrain --help).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; just the report.")
def demo_cmd(out, loader, epochs, images, degradation, overwrite, quiet):
    """Cut sample photos into crops, pack, train and validate: the whole pipeline in a few
    minutes with no network. Writes OUT/report.txt and prints it."""
    from .demo import report, run_demo
    from .train import TrainingError
    try:
        facts = run_demo(out, loader, epochs, images, overwrite, progress=not quiet,
                         degradation=degradation)
    except (ValueError, TrainingError, ImportError) as e:  # DemoError, PackError, DBError
        raise click.ClickException(str(e)) from None
    except (OSError, RuntimeError) as e:  # a read-only --out, a full disk: not a bug
        w = _write_error(e)
        if w is None or _dead_worker(e) is not None:  # a broken pipe to a loader worker
            raise
        raise click.ClickException(_write_failure(w, out, "--out")) from None
    except KeyboardInterrupt:
        click.echo("\ninterrupted; run again with --overwrite to start over", err=True)
        sys.exit(130)
    click.echo(report(facts))


if __name__ == "__main__":
    main()
