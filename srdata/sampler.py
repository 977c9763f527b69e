"""The one place training randomness is decided: which image, where to crop, which flips.

Both loaders consume the rows of ``Sampler.plan(epoch)``, so ``loader="torch"`` and
``loader="dali"`` see the same samples in the same order. A row is::

    (image id, crop y, crop x, horizontal flip, vertical flip, transpose)

with the crop the HR patch's top-left corner. Augmentations are applied in that order:
flip left-right, flip top-bottom, then transpose (swap H and W). ``augment``: ``"all"``
(or True), the three bits drawn, so the eight symmetries of the square (flips and
90-degree rotations) are equally likely; ``"hflip"``, the left-right flip only, half the
rows (BasicSR's ``use_hflip: True, use_rot: False``, as Real-ESRGAN's x4plus trains);
``"none"`` (or False). The bits are drawn in every case, so the crops do not depend on it.
With ``align=scale`` (paired HR and LR databases) crops start on multiples of the scale:
``lr_row`` gives the LR crop that the HR crop is exactly ``scale`` times.

An epoch draws a fresh random ``sample_ratio`` fraction of the database (all of it at 1.0),
in random order. Row j's crop and flips depend only on ``(seed, epoch, j)``, not on the
number of ranks. Ranks take interleaved rows ``j = rank, rank + world_size, ...`` of an equal
share, so every rank runs the same number of batches:

- ``drop_last=True`` (training): each rank's share is cut to whole batches; at most
  ``world_size * batch_size - 1`` drawn samples go unused each epoch (a different few each
  epoch, since the order is reshuffled).
- ``drop_last=False`` (evaluation): the drawn samples are wrapped around to fill every
  rank's share equally, and each rank's last batch may be short.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from .degrade_params import sample_params

ID, Y, X, HFLIP, VFLIP, TRANSPOSE = range(6)
AUGMENTS = ("all", "hflip", "none")
DEGRADATIONS = ("nn", "bicubic", "realesrgan")
# Degradation parameters come from their own generator, (seed, epoch, PARAM_STREAM, block),
# so drawing them leaves the crop and flip draws as they were; rows are drawn in blocks of
# PARAM_BLOCK so that row j's parameters do not depend on the epoch's length or the ranks.
PARAM_STREAM, PARAM_BLOCK = 1, 256


def _augment(augment) -> str:
    """``augment`` as one of AUGMENTS (True and False: "all" and "none")."""
    if isinstance(augment, (bool, np.bool_)):
        return "all" if augment else "none"
    if augment not in AUGMENTS:
        raise ValueError(f"got augment={augment!r}, expected one of {', '.join(AUGMENTS)}")
    return augment


def _image_ids(ids) -> np.ndarray:
    """``ids`` as int64, refusing what a cast would silently turn into other images: a
    boolean mask (True, False -> 1, 0) and fractions (2.7 -> 2)."""
    arr = np.asarray(ids)
    if arr.size and arr.dtype.kind not in "iu":
        hint = " (a boolean mask: pass np.flatnonzero(mask))" if arr.dtype.kind == "b" else ""
        raise ValueError(f"got ids of dtype {arr.dtype}{hint}, expected integer image ids")
    return arr.astype(np.int64)


class Sampler:
    def __init__(self, heights, widths, batch_size: int, patch: int, seed: int = 0,
                 sample_ratio: float = 1.0, rank: int = 0, world_size: int = 1,
                 augment: bool | str = True, drop_last: bool = True, ids=None,
                 align: int = 1):
        self.heights = np.asarray(heights, np.int64)
        self.widths = np.asarray(widths, np.int64)
        # the images this sampler draws from: all, or a subset (a held-out validation split)
        self.ids = np.arange(len(self.heights)) if ids is None else _image_ids(ids)
        n = len(self.ids)
        if n == 0:
            raise ValueError("the database holds no images")
        if self.ids.min() < 0 or self.ids.max() >= len(self.heights):
            raise ValueError(f"got image ids up to {self.ids.max()}, expected ids below "
                             f"{len(self.heights)}")
        if batch_size < 1 or patch < 1:
            raise ValueError(f"got batch_size={batch_size}, patch={patch}, expected >= 1")
        if not 0 < sample_ratio <= 1:
            raise ValueError(f"got sample_ratio={sample_ratio}, expected 0 < ratio <= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"got rank={rank}, world_size={world_size}, expected "
                             "0 <= rank < world_size")
        small = self.ids[np.minimum(self.heights, self.widths)[self.ids] < patch]
        if small.size:
            i = int(small[0])
            raise ValueError(f"patch {patch} is larger than image {i} "
                             f"({self.widths[i]}x{self.heights[i]} px) and {small.size - 1} "
                             f"other(s); use a smaller patch or pack with --min-size {patch}")
        if align < 1 or patch % align:
            raise ValueError(f"got align={align}, patch={patch}, expected the patch to be a "
                             "multiple of align >= 1")
        self.batch_size, self.patch, self.seed = batch_size, patch, seed
        # paired data: crops start on multiples of align (the scale), so the HR crop is
        # exactly the LR crop at (y/scale, x/scale) blown up; 1 draws every position
        self.align = align
        self.rank, self.world_size = rank, world_size
        self.augment, self.drop_last = _augment(augment), drop_last
        self.sample_ratio = sample_ratio
        self.draw = max(1, round(sample_ratio * n))
        if drop_last:
            self.per_rank = self.draw // world_size // batch_size * batch_size
            if self.per_rank == 0:
                raise ValueError(f"an epoch draws {self.draw} samples, fewer than batch_size "
                                 f"{batch_size} x world_size {world_size}; lower the batch "
                                 "size or raise sample_ratio")
        else:
            self.per_rank = math.ceil(self.draw / world_size)

    def __len__(self) -> int:
        """Batches per epoch on each rank."""
        return math.ceil(self.per_rank / self.batch_size)

    def plan(self, epoch: int) -> np.ndarray:
        """This rank's rows for ``epoch``: an int64 array of shape (samples, 6)."""
        rng = np.random.default_rng([self.seed, epoch])
        ids = self.ids[rng.permutation(len(self.ids))[: self.draw]]
        rows = np.zeros((self.draw, 6), np.int64)
        rows[:, ID] = ids
        # (r * positions) truncated, times align: at align=1 the same draws as ever
        a = self.align
        rows[:, Y] = (rng.random(self.draw) * ((self.heights[ids] - self.patch) // a + 1)
                      ).astype(np.int64) * a
        rows[:, X] = (rng.random(self.draw) * ((self.widths[ids] - self.patch) // a + 1)
                      ).astype(np.int64) * a
        flips = rng.integers(0, 2, (self.draw, 3))
        if self.augment == "all":
            rows[:, HFLIP:] = flips
        elif self.augment == "hflip":
            rows[:, HFLIP] = flips[:, 0]
        total = self.per_rank * self.world_size
        rows = np.resize(rows, (total, 6)) if total > self.draw else rows[:total]
        return rows[self.rank::self.world_size]

    def degradation_params(self, epoch: int, start: int = 0, stop: int | None = None) -> dict:
        """Real-ESRGAN degradation parameters of this rank's rows ``start:stop`` of
        ``epoch`` (indices into ``plan(epoch)``): ``{name: array}`` as
        ``srdata.degrade_params.sample_params``. Row j's parameters depend only on
        ``(seed, epoch, j)``: the same on every number of ranks, after a resume, and in both
        loaders. Only the blocks of PARAM_BLOCK rows that hold the asked rows are drawn."""
        j = self.rank + np.arange(self.per_rank)[start:stop] * self.world_size  # global rows
        blocks = np.unique(j // PARAM_BLOCK)
        if not len(blocks):
            raise ValueError(f"got rows {start}:{stop}, expected some of 0:{self.per_rank}")
        drawn = [sample_params(np.random.default_rng([self.seed, epoch, PARAM_STREAM, int(b)]),
                               PARAM_BLOCK) for b in blocks]
        at = np.searchsorted(blocks, j // PARAM_BLOCK) * PARAM_BLOCK + j % PARAM_BLOCK
        return {k: np.concatenate([d[k] for d in drawn])[at] for k in drawn[0]}

    def resized(self, patch: int, batch_size: int) -> "Sampler":
        """This sampler for another stage of a patch schedule: the same seed, images, ranks
        and draws per epoch, cropped to ``patch`` in batches of ``batch_size``. Each
        epoch's rows still depend only on (seed, epoch, rank) and that epoch's stage."""
        if (patch, batch_size) == (self.patch, self.batch_size):
            return self
        return Sampler(self.heights, self.widths, batch_size, patch, seed=self.seed,
                       sample_ratio=self.sample_ratio, rank=self.rank,
                       world_size=self.world_size, augment=self.augment,
                       drop_last=self.drop_last, ids=self.ids, align=self.align)

    def batches(self, epoch: int, start: int = 0):
        """Yield this rank's batches of rows for ``epoch``, from batch ``start`` on."""
        rows = self.plan(epoch)
        for b in range(start, len(self)):
            yield rows[b * self.batch_size:(b + 1) * self.batch_size]


class RowParams:
    """A sampler's Real-ESRGAN parameters for one epoch, drawn a chunk of PARAM_BLOCK rows
    at a time as rows are asked for (an epoch's worth at once would cost seconds)."""

    def __init__(self, sampler: Sampler, epoch: int):
        self.sampler, self.epoch = sampler, epoch
        self._chunk, self._params = None, None

    def rows(self, start: int, stop: int) -> dict:
        c = start // PARAM_BLOCK
        if (stop - 1) // PARAM_BLOCK != c:  # spans two chunks: rare, draw directly
            return self.sampler.degradation_params(self.epoch, start, stop)
        if self._chunk != c:
            self._chunk = c
            self._params = self.sampler.degradation_params(
                self.epoch, c * PARAM_BLOCK, (c + 1) * PARAM_BLOCK)
        o = c * PARAM_BLOCK
        return {k: v[start - o:stop - o] for k, v in self._params.items()}


_FLIP_CODES = {(True, False): 1, (False, True): 0, (True, True): -1}  # cv2.flip's codes


def crop_and_flip(img: np.ndarray, row, patch: int) -> np.ndarray:
    """The HR patch a plan row describes, as a contiguous HxWxC array (the reference):
    ``img[y:y+patch, x:x+patch]``, mirrored left-right (``HFLIP``), then upside down
    (``VFLIP``), then transposed (``TRANSPOSE``)."""
    y, x = int(row[Y]), int(row[X])
    hr = img[y:y + patch, x:x + patch]
    # OpenCV, not a copy of numpy's reversed or transposed view: numpy copies those 3-byte
    # pixels one element at a time, 0.21 ms for a 256² patch against cv2's 0.006-0.019,
    # on every sample the torch loader cuts
    code = _FLIP_CODES.get((bool(row[HFLIP]), bool(row[VFLIP])))
    hr = np.ascontiguousarray(hr) if code is None else cv2.flip(hr, code)
    return cv2.transpose(hr) if row[TRANSPOSE] else hr


def lr_row(row, scale: int) -> np.ndarray:
    """The LR crop of a paired row (``align=scale``): the HR crop's corner divided by
    ``scale``, the same flips; cut it with ``crop_and_flip(lr, ..., patch // scale)``."""
    assert row[Y] % scale == 0 and row[X] % scale == 0, "rows of a Sampler with align=scale"
    lr = np.array(row, np.int64)
    lr[Y], lr[X] = row[Y] // scale, row[X] // scale
    return lr


def nn_downscale(hr, scale: int):
    """``lr[y, x] = hr[y*s + s//2, x*s + s//2]`` on the last two spatial axes given (HWC
    numpy or NCHW torch); the same pixels DALI's INTERP_NN resize picks."""
    o = scale // 2
    if isinstance(hr, np.ndarray):
        return hr[o::scale, o::scale]
    return hr[..., o::scale, o::scale]
