"""Paired training data: an HR (GT) database and an LR (LQ) database of the same images.

As BasicSR's ``PairedImageDataset`` reads ``DIV2K_train_HR_sub.lmdb`` with
``DIV2K_train_LR_bicubic_X4_sub.lmdb``: the LR image of each HR image is the record with the
same name, and HR = LR x scale in both sides. The name is a BasicSR LMDB's key, or an srpipe
record's source path without its extension (``a/0001.png`` -> ``a/0001``); an LR name may
also carry DIV2K's ``x{scale}`` suffix (``0001x4`` pairs with ``0001``).

Everything is checked once, at open, so a bad pair is named before training starts; the
crops themselves are decided by the sampler (``align=scale``: HR crops on the LR grid).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import format as fmt


def record_names(db) -> list[str]:
    """The name each image of ``db`` is paired by."""
    from .basicsr import BasicSRDB
    # From the index's columns: a Record per image costs seconds at a million images.
    if isinstance(db, BasicSRDB):
        return [k.decode() for k in db.records.keys.tolist()]
    return [os.path.splitext(p)[0] for p in db.records.paths]


class LRSource:
    """The LR database seen through the HR ids: ``read(i)`` / ``image(i)`` are the LR image
    of HR image ``i``. Picklable, as the databases are (loader workers get a copy)."""

    def __init__(self, db, ids: np.ndarray):
        self.db, self.ids = db, np.asarray(ids, np.int64)
        self.path: Path = db.path
        self.codec: str = db.codec

    def read(self, i: int) -> bytes:
        return self.db.read(int(self.ids[i]))

    def image(self, i: int) -> np.ndarray:
        return self.db.image(int(self.ids[i]))


def pair(hr, lr, scale: int) -> LRSource:
    """Match the LR database ``lr`` to the HR database ``hr`` by name and check every size;
    DBError names the first image that has no partner or the wrong size."""
    hr_names, lr_names = record_names(hr), record_names(lr)
    index = {name: i for i, name in enumerate(lr_names)}
    if len(index) != len(lr_names):
        dup = next(n for i, n in enumerate(lr_names) if index[n] != i)
        raise fmt.DBError(f"LR database {lr.path} holds the name {dup!r} twice; pair by "
                          "unique names")
    ids = np.empty(len(hr_names), np.int64)
    for i, name in enumerate(hr_names):
        j = index.get(name, index.get(f"{name}x{scale}"))
        if j is None:
            raise fmt.DBError(f"HR image {name!r} of {hr.path} has no LR image in {lr.path} "
                              f"(looked for {name!r} and {name + f'x{scale}'!r}); the two "
                              "databases must hold the same images under the same names")
        ids[i] = j
    counts = np.bincount(ids, minlength=len(lr_names))
    if (counts > 1).any():  # HR names "0001" and "0001x4" both found LR "0001x4"
        twice = lr_names[int(np.flatnonzero(counts > 1)[0])]
        raise fmt.DBError(f"LR image {twice!r} of {lr.path} pairs with two HR images of "
                          f"{hr.path}; pair by unique names")
    if (counts == 0).any():
        extra = lr_names[int(np.flatnonzero(counts == 0)[0])]
        raise fmt.DBError(f"LR image {extra!r} of {lr.path} has no HR image in {hr.path} "
                          f"({len(lr_names)} LR images, {len(hr_names)} HR); the two "
                          "databases must hold the same images under the same names")
    bad = np.flatnonzero((hr.heights != lr.heights[ids] * scale)
                         | (hr.widths != lr.widths[ids] * scale))
    if bad.size:
        i = int(bad[0])
        j = int(ids[i])
        raise fmt.DBError(
            f"image {hr_names[i]!r}: HR {hr.widths[i]}x{hr.heights[i]} px in {hr.path} is not "
            f"{scale} x its LR {lr.widths[j]}x{lr.heights[j]} px in {lr.path} ({bad.size} "
            f"pair(s) differ); pair databases made for --scale {scale}")
    return LRSource(lr, ids)
