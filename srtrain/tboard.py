"""TensorBoard: the run's metrics.jsonl records and validation grids as TensorBoard events.

Opt-in (``--tensorboard``), written under ``OUT/tb``; view with ``tensorboard --logdir OUT``.
metrics.jsonl stays the record of the run; this is a view of the same numbers.
"""
from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from .upscale import read_rgb

# record key -> TensorBoard tag, per event; PSNR/SSIM are on Y unless the tag says rgb
TAGS = {
    "train": {"loss": "train/loss_l1", "lr": "train/lr", "img_per_s": "train/img_per_s",
              "data_wait_pct": "train/data_wait_pct", "data_wait_ms": "train/data_wait_ms",
              "gpu_mem_gb": "train/gpu_mem_gb",
              # --stage gan's terms (srtrain.gan), under Real-ESRGAN's names
              **{k: f"train/{k}" for k in ("l_g_pix", "l_g_percep", "l_g_gan", "l_d_real",
                                           "l_d_fake", "out_d_real", "out_d_fake")}},
    "val": {"psnr": "val/psnr_y", "ssim": "val/ssim_y", "psnr_rgb": "val/psnr_rgb",
            "psnr_bicubic": "val/psnr_y_bicubic", "ssim_bicubic": "val/ssim_y_bicubic",
            "psnr_rgb_bicubic": "val/psnr_rgb_bicubic"},
}


def summary_writer_class():
    """torch's SummaryWriter; ImportError saying what to install when tensorboard is not."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"--tensorboard needs the tensorboard package ({e}); install it "
                          "with `pip install 'srpipe[tensorboard]'` or drop --tensorboard")
    return SummaryWriter


class TensorBoard:
    """Scalars of the train and val records, and grid images, at their optimizer step.

    The events are written by the writer's own thread; a write that fails there (a full
    disk, a folder that cannot be written) is raised again here, in the training loop, as
    one OSError naming the file, so the thread's traceback is not printed as well."""

    def __init__(self, out: Path):
        self.dir = Path(out) / "tb"
        cls, self.writer = summary_writer_class(), None
        quiet_handed_over_errors()
        try:
            with _named(self.dir):  # the first event is written at once
                self.writer = cls(log_dir=str(self.dir))
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise ValueError(f"cannot write TensorBoard events in {self.dir} ({e.strerror}); "
                             "make it writable, or drop --tensorboard") from None

    def record(self, record: dict) -> None:
        with _named(self.dir):
            for key, tag in TAGS.get(record.get("event"), {}).items():
                if key in record:
                    self.writer.add_scalar(_tag(tag, record), record[key], record["step"])
            self.writer.flush()

    def image(self, tag: str, png: Path, step: int) -> None:
        rgb = read_rgb(png)
        if rgb is not None:
            with _named(self.dir):
                self.writer.add_image(tag, rgb, step, dataformats="HWC")
                self.writer.flush()

    def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            with _named(self.dir):
                writer.close()


def _tag(tag: str, record: dict) -> str:
    """A GAN stage's ``loss`` is the generator's total, not an L1 loss: tagged as
    Real-ESRGAN would name it."""
    if tag == "train/loss_l1" and any(k.startswith("l_g_") for k in record):
        return "train/l_g_total"
    return tag


@contextmanager
def _named(folder: Path):
    """The event writer's OSError raised again with a str file name (tensorboard's are
    bytes), or the events folder when it names none."""
    try:
        yield
    except OSError as e:
        if e.errno is None:
            raise
        name = os.fsdecode(e.filename) if e.filename is not None else str(folder)
        raise OSError(e.errno, e.strerror, name) from None


def quiet_handed_over_errors() -> None:
    """Print no traceback for an exception a thread kept for its owner to raise (tensorboard's
    writer thread stores it in ``thread.exception``, then raises it to end): the owner's
    next call raises it, and that is where it is reported. Other threads' are printed."""
    previous = threading.excepthook
    if getattr(previous, "quiet_handed_over", False):
        return

    def hook(args):
        if getattr(args.thread, "exception", None) is args.exc_value and \
                isinstance(args.exc_value, Exception):
            return
        previous(args)
    hook.quiet_handed_over = True
    threading.excepthook = hook
