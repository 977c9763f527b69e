"""What a person reads in the terminal while a run trains: a summary of the run at its start,
one line per epoch that stays on screen, and what to do next at the end.

The trainer logs records (metrics.jsonl); this is a view of the same records, as the
TensorBoard writer is, so the terminal never says something the record does not.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def start_lines(r: dict) -> list[str]:
    """The run in a few lines: what trains, on what data, where, and how long an epoch is."""
    lines = [
        f"srtrain: {r['model']} ({r['params'] / 1e6:.2f} M parameters), x{r['scale']}, "
        f"on {r['device']} ({r['amp']}, compile {r['compile']}"
        + (", CUDA graphs" if r.get("cuda_graphs") else "") + ")",
        f"  data      {r['train_images']:,} training images from {r['db']}; "
        + (f"validation on {_count(r['val_images'], 'image')}" if r["val_images"]
           else "no validation"),
        f"  LR        {r['degradation']}" + (" (paired LR database)" if r.get("paired") else "")
        + f"; loader {r['loader']} with {r['workers']} worker(s)",
        f"  schedule  {r['epochs']} epochs of {r['steps_per_epoch']:,} steps, batch "
        f"{r['batch_size']}, {r['patch']} px patches"
        + (f" ({r['patch_schedule']})" if r.get("patch_schedule") else ""),
        f"  run       {r['out']}"]
    if r.get("resumed"):
        e = r["resumed"]
        lines.append(f"  resumed   from {Path(r['out']) / 'last.pt'}: epoch {e['epoch'] + 1}/"
                     f"{r['epochs']}, step {e['step']:,}"
                     + (f" ({e['batch']} batches into the epoch)" if e["batch"] else ""))
    return lines


def epoch_line(r: dict) -> str:
    """``epoch 3/30  loss 0.0351  val 33.21 dB (+0.67 vs bicubic)  412 img/s  wait 1%``."""
    val = f"  val {r['psnr']:.2f} dB" if r.get("psnr") is not None else ""
    if val and r.get("psnr_bicubic") is not None:
        val += f" ({r['psnr'] - r['psnr_bicubic']:+.2f} vs bicubic)"
    return (f"epoch {r['epoch'] + 1}/{r['epochs']}  loss {r['loss']:.4f}{val}  "
            f"{_rate(r['img_per_s'])} img/s  wait {r['data_wait_pct']:.0f}%  "
            f"({_duration(r['seconds'])})")


class Console:
    """Prints the records a person wants to see, between the progress bars."""

    def __call__(self, record: dict) -> None:
        kind = record.get("event")
        if kind == "start":
            lines = start_lines(record)
        elif kind == "epoch" and "loss" in record:  # not an epoch resumed at its end
            lines = [epoch_line(record)]
        elif kind == "early_stop":
            lines = [f"stopping early: no better validation PSNR in "
                     f"{_count(record['patience'], 'validation')} (best "
                     f"{record['best_psnr']:.2f} dB)"]
        else:
            return
        # around the progress bar, flushed: a pipe or a log file gets each line as it happens
        with tqdm.external_write_mode(file=sys.stderr):
            print("\n".join(lines), file=sys.stderr, flush=True)


def end_summary(result: dict, out: str) -> str:
    """The end of a run: where it got to, its files, and the next commands."""
    run, best = Path(out), result.get("best_psnr")
    files = [n for n in ("best.pt", "last.pt", "metrics.jsonl", "samples/")
             if (run / n.rstrip("/")).exists()]
    ckpt = run / ("best.pt" if (run / "best.pt").exists() else "last.pt")
    epochs = result.get("epoch", 0)
    lines = [f"done: {_count(epochs, 'epoch')}, {result.get('step', 0):,} steps in "
             f"{_duration(result.get('seconds', 0))}"]
    if result.get("psnr") is not None and result.get("psnr_bicubic") is not None:
        gain = result["psnr"] - result["psnr_bicubic"]
        lines.append(f"  validation  PSNR {result['psnr']:.2f} dB, bicubic "
                     f"{result['psnr_bicubic']:.2f} dB ({gain:+.2f}); SSIM "
                     f"{result['ssim']:.4f}; best {best:.2f} dB")
    lines += [f"  run folder  {run}: {', '.join(files)}",
              "next:",
              f"  srtrain upscale --ckpt {ckpt} photo.png photo_x4.png",
              f"  srtrain export --ckpt {ckpt} net_g.pth   "
              "# weights for BasicSR, Real-ESRGAN, chaiNNer",
              f"  srtrain --out {run} --resume --epochs {epochs + 10}   "
              "# train longer"]
    return "\n".join(lines)


def _rate(img_per_s: float) -> str:
    """412, 38.5, 0.48: whole numbers where they are large, else 3 significant digits."""
    return f"{img_per_s:,.0f}" if img_per_s >= 100 else f"{img_per_s:.3g}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
