"""The DALI loader's external-source callbacks, in a module that does not import torch.

DALI's parallel external source pickles the callback into spawned worker processes, which
import the module that defines it to unpickle it: keeping these out of
``srdata.dali_loader`` (which imports torch) saves every worker seconds at start.
Imports: numpy, ``.format``, ``.sampler``, ``.handoff`` and ``._proc`` only. The database
and the sampler reach the workers through a file (``srdata.handoff``), not the start pipe.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from . import format as fmt
from ._proc import die_with_parent
from .handoff import Handoff
from .sampler import HFLIP, ID, TRANSPOSE, X, Y, RowParams, crop_and_flip, lr_row


class PatchSource:
    """The per-sample callback of the external source; picklable and stateless per sample.

    Sample ``info.idx_in_epoch`` of DALI epoch ``info.epoch_idx`` is row
    ``idx_in_epoch + skip`` of sampler epoch ``first_epoch + epoch_idx`` (``skip`` rows, a
    resumed run's already-seen batches, apply to the first epoch only). Raw records are cut
    here, at no cost; encoded ones go whole to the decoder with the crop as arguments.
    ``realesrgan_scale``: also hand over the row's Real-ESRGAN degradation inputs
    (``dali_degrade.dali_inputs`` of the sampler's parameters, in ``INPUTS`` order) for LR
    at this scale; 0: none. Only then do the workers import torch (for the sinc kernels).
    """

    def __init__(self, db, sampler, first_epoch: int, skip: int, padded_len: int,
                 realesrgan_scale: int = 0):
        self._shared = Handoff((db, sampler))  # their arrays grow with the database
        self.first_epoch, self.skip, self.padded_len = first_epoch, skip, padded_len
        self.realesrgan_scale = realesrgan_scale
        self._epoch, self._rows, self._params, self._j = None, None, None, 0
        # DALI starts the worker processes from the thread that builds the pipeline: this one
        self._parent, self._pid = os.getpid(), os.getpid()
        self._by_main_thread = threading.current_thread() is threading.main_thread()

    @property
    def db(self):
        return self._shared.get()[0]

    @property
    def sampler(self):
        return self._shared.get()[1]

    def _row(self, info) -> np.ndarray:
        """The sampler's row for this sample (StopIteration past the epoch's end)."""
        if self._pid != os.getpid():  # first call in a worker process
            self._pid = os.getpid()
            die_with_parent(self._parent, self._by_main_thread)
        epoch = self.first_epoch + info.epoch_idx
        j = info.idx_in_epoch + (self.skip if info.epoch_idx == 0 else 0)
        if j >= self.padded_len:
            raise StopIteration
        if self._epoch != epoch:
            self._epoch, self._rows = epoch, self.sampler.plan(epoch)
            self._params = RowParams(self.sampler, epoch)
        self._j = min(j, len(self._rows) - 1)  # a short last batch is padded
        return self._rows[self._j]

    def _degradation_inputs(self) -> tuple:
        """The current row's Real-ESRGAN inputs, or nothing without that degradation."""
        if not self.realesrgan_scale:
            return ()
        from .dali_degrade import dali_inputs
        p = self._params.rows(self._j, self._j + 1)
        patch = self.sampler.patch
        return tuple(np.array(a[0]) for a in  # 0-d arrays: DALI takes no numpy scalars
                     dali_inputs(p, patch, patch, self.realesrgan_scale).values())

    def __call__(self, info):
        row = self._row(info)
        flags = row[HFLIP:TRANSPOSE + 1].astype(np.int32)
        extra = self._degradation_inputs()
        if self.db.codec == "raw":
            patch = crop_and_flip(self.db.image(int(row[ID])), row, self.sampler.patch)
            return (patch, *extra) if extra else patch
        value = self.db.read(int(row[ID]))
        _check_header(self.db, int(row[ID]), value)
        return (np.frombuffer(value, np.uint8), np.array([row[Y], row[X]], np.int32), flags,
                *extra)


def _check_header(db, i: int, value: bytes) -> None:
    """The decoder takes an image's size from its header, and would crop inside whatever
    size that says: check it against the index first (the torch loader checks the decoded
    array, the same test)."""
    shape = fmt.encoded_shape(value, db.codec)
    expected = (int(db.heights[i]), int(db.widths[i]))
    if shape != expected:
        rec = db.records[i]
        found = f"is {shape[0]}x{shape[1]} px" if shape else "has a damaged header"
        raise fmt.DBError(f"{db.path}: key {rec.key} (image {i}, from {rec.path}): the stored "
                          f"{db.codec} {found}, the index says {expected[0]}x{expected[1]}")


class PairedSource(PatchSource):
    """PatchSource for paired databases: per side (HR, then LR) the cut patch of a raw
    record, or an encoded record and its crop anchor; then the flips, shared by both."""

    def __init__(self, db, lr, sampler, scale: int, first_epoch: int, skip: int,
                 padded_len: int):
        super().__init__(db, sampler, first_epoch, skip, padded_len)
        self._lr, self.scale = Handoff(lr), scale

    @property
    def lr(self):
        return self._lr.get()

    def __call__(self, info):
        row = self._row(info)
        i, patch = int(row[ID]), self.sampler.patch
        out = []
        for db, k, r, size in ((self.db, i, row, patch),
                               (self.lr.db, int(self.lr.ids[i]), lr_row(row, self.scale),
                                patch // self.scale)):
            if db.codec == "raw":
                out.append(crop_and_flip(db.image(k), r, size))
            else:
                value = db.read(k)
                _check_header(db, k, value)
                out += [np.frombuffer(value, np.uint8), np.array([r[Y], r[X]], np.int32)]
        return (*out, row[HFLIP:TRANSPOSE + 1].astype(np.int32))
