"""TensorBoard: the run's metrics.jsonl records and validation grids as TensorBoard events.

Opt-in (``--tensorboard``), written under ``OUT/tb``; view with ``tensorboard --logdir OUT``.
metrics.jsonl stays the record of the run; this is a view of the same numbers.
"""
from __future__ import annotations

from pathlib import Path

from .upscale import read_rgb

# record key -> TensorBoard tag, per event; PSNR/SSIM are on Y unless the tag says rgb
TAGS = {
    "train": {"loss": "train/loss_l1", "lr": "train/lr", "img_per_s": "train/img_per_s",
              "data_wait_pct": "train/data_wait_pct", "data_wait_ms": "train/data_wait_ms",
              "gpu_mem_gb": "train/gpu_mem_gb"},
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
    """Scalars of the train and val records, and grid images, at their optimizer step."""

    def __init__(self, out: Path):
        self.writer = summary_writer_class()(log_dir=str(Path(out) / "tb"))

    def record(self, record: dict) -> None:
        for key, tag in TAGS.get(record.get("event"), {}).items():
            if key in record:
                self.writer.add_scalar(tag, record[key], record["step"])
        self.writer.flush()

    def image(self, tag: str, png: Path, step: int) -> None:
        rgb = read_rgb(png)
        if rgb is not None:
            self.writer.add_image(tag, rgb, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
