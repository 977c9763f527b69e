"""Validation: fixed (LR, HR) pairs, PSNR and SSIM on Y against the bicubic baseline.

``psnr``/``ssim`` are on Y (as papers report); ``psnr_rgb`` is over R, G, B, as BasicSR's
training logs report it; each has its ``_bicubic`` baseline.

The pairs are centre crops of held-out images (``--val-split``) or of ``--val-db``, with LR
made once by the training degradation (or ``--val-degradation``), so the scores measure what
the model learnt (with a paired ``--lr-db``: that database's crops, on the LR grid). A
Real-ESRGAN validation LR draws its parameters from a generator seeded by the image's id
alone, so the same image gets the same LR in every epoch and every run. Metrics follow
BasicSR's conventions (see ``srtrain.metrics``), so they compare with published numbers for
the same degradation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from srdata import degrade
from srdata.degrade_params import sample_params

from . import metrics


VAL_SEED = 0x7A1  # validation LR's Real-ESRGAN parameters: (VAL_SEED, image id)


def make_lr(hr: torch.Tensor, ids, scale: int, degradation: str) -> torch.Tensor:
    """The validation LR (uint8 NCHW) of uint8 NCHW crops of images ``ids``."""
    params = None
    if degradation == "realesrgan":  # each image's own draw, the same in every epoch and run
        drawn = [sample_params(np.random.default_rng([VAL_SEED, int(i)]), 1)
                 for i in ids]
        params = {k: np.concatenate([d[k] for d in drawn]) for k in drawn[0]}
    return degrade.make_lr(hr, scale, degradation, params).contiguous()


def split_ids(n: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids): a seeded random ``val_split`` fraction held out."""
    if not 0 <= val_split < 1:
        raise ValueError(f"got val_split={val_split}, expected 0 <= split < 1")
    n_val = 0 if val_split == 0 else max(1, round(n * val_split))
    if n - n_val < 1:
        raise ValueError(f"the database has {n} image(s): none left to train on after "
                         f"holding out {n_val} for validation; lower --val-split")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class ValSet:
    """Up to ``count`` (LR, HR) pairs, uint8 NCHW on the CPU, with their bicubic scores."""

    def __init__(self, db, ids, patch: int, scale: int, count: int, lr=None,
                 degradation: str = "nn"):
        crops, lr_crops, kept = [], [], []
        for i in list(ids)[:count]:
            img = db.image(int(i))
            h, w = img.shape[:2]
            if min(h, w) < patch:
                continue  # too small for a patch: the sampler never trains on it either
            y, x = (h - patch) // 2, (w - patch) // 2
            if lr is not None:  # paired: the crop on the LR grid, its LR cut from ``lr``
                y, x, p = y - y % scale, x - x % scale, patch // scale
                lr_crops.append(lr.image(int(i))[y // scale:y // scale + p,
                                                 x // scale:x // scale + p])
            crops.append(img[y:y + patch, x:x + patch])
            kept.append(int(i))
        if not crops:
            raise ValueError(f"no validation image of {db.path} is at least {patch} px; "
                             "use a smaller --patch or another --val-db")
        self.hr = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
        if lr is None:
            self.lr = make_lr(self.hr, kept, scale, degradation)
        else:
            self.lr = torch.from_numpy(np.stack(lr_crops)).permute(0, 3, 1, 2).contiguous()
        self.scale = scale
        bic = metrics.bicubic(self.lr.float() / 255, scale)
        hr = self.hr.float() / 255
        self.baseline = {"psnr_bicubic": float(metrics.psnr_y(bic, hr, scale).mean()),
                         "ssim_bicubic": float(metrics.ssim_y(bic, hr, scale).mean()),
                         "psnr_rgb_bicubic": float(metrics.psnr_rgb(bic, hr, scale).mean())}

    def __len__(self) -> int:
        return len(self.hr)


@torch.inference_mode()
def evaluate(model, val: ValSet, batch_size: int, device: torch.device, amp_dtype,
             channels_last: bool, grid: Path | None = None) -> dict:
    """PSNR and SSIM of ``model`` on ``val`` (and the bicubic baseline); optionally a grid."""
    was_training = model.training
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    srs = []
    for i in range(0, len(val), batch_size):
        lr = (val.lr[i:i + batch_size].to(device).float() / 255).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            srs.append(model(lr).float().clamp_(0, 1).cpu())
    model.train(was_training)
    sr, hr = torch.cat(srs), val.hr.float() / 255
    result = {"psnr": float(metrics.psnr_y(sr, hr, val.scale).mean()),
              "ssim": float(metrics.ssim_y(sr, hr, val.scale).mean()),
              "psnr_rgb": float(metrics.psnr_rgb(sr, hr, val.scale).mean()), **val.baseline}
    if grid is not None:
        lr = val.lr.float() / 255
        metrics.save_grid(grid, lr, metrics.bicubic(lr, val.scale), sr, hr)
    return result
