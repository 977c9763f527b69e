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
    """The batch callback of the external source; picklable, and stateless per batch.

    One DALI epoch that never ends: run ``info.iteration`` goes on from ``skip`` rows (a
    resumed run's already-seen batches) into sampler epoch ``first_epoch`` and on through
    the epochs after it, each run ``per_run`` training batches, the last of an epoch shorter.
    Without an end, DALI has the next epoch's first runs ready when the last one is
    handed out, as mid-epoch (an end and reset left the pipeline empty: a stall of a
    whole run at each epoch's start). Raw records are
    cut here, at no cost; encoded ones go whole to the decoder with the crops as arguments.
    ``realesrgan_scale``: also hand over the rows' Real-ESRGAN degradation inputs
    (``dali_degrade.dali_inputs`` of the sampler's parameters, in ``INPUTS`` order) for LR
    at this scale; 0: none. Only then do the workers import torch (for the sinc kernels).

    Whole batches, one array per output, not samples: DALI's main thread unpacks and
    feeds every sample of every output of a per-sample source in Python, time the GPU
    waits under a CUDA-graph step. Batches cut the host's time per fetch from 3.8 to
    1.3 ms (32 JPEGs) and from 16.3 to 7.4 ms (Real-ESRGAN's 20 more inputs) on the CI
    VM (benchmarks/fetch_host.py, results/cpu2-2026-11-28).
    """

    def __init__(self, db, sampler, first_epoch: int, skip: int, padded_len: int,
                 realesrgan_scale: int = 0, per_run: int = 1):
        self._shared = Handoff((db, sampler))  # their arrays grow with the database
        self.first_epoch, self.skip, self.padded_len = first_epoch, skip, padded_len
        self.per_run = per_run
        self.realesrgan_scale = realesrgan_scale
        self._epoch, self._rows, self._params = None, None, None
        # DALI starts the worker processes from the thread that builds the pipeline: this one
        self._parent, self._pid = os.getpid(), os.getpid()
        self._by_main_thread = threading.current_thread() is threading.main_thread()

    @property
    def db(self):
        return self._shared.get()[0]

    @property
    def sampler(self):
        return self._shared.get()[1]

    def _batch(self, info) -> np.ndarray:
        """The indices into its epoch's plan of this run's rows (``self._rows``, read for
        that epoch); a short last training batch is padded with the epoch's last row."""
        if self._pid != os.getpid():  # first call in a worker process
            self._pid = os.getpid()
            die_with_parent(self._parent, self._by_main_thread)
        size = self.sampler.batch_size * self.per_run
        left = -(-(self.padded_len - self.skip) // size)  # runs left in the first epoch
        if info.iteration < left:
            epoch, j = self.first_epoch, self.skip + info.iteration * size
        else:
            later, run = divmod(info.iteration - left, -(-self.padded_len // size))
            epoch, j = self.first_epoch + 1 + later, run * size
        if self._epoch != epoch:
            self._epoch, self._rows = epoch, self.sampler.plan(epoch)
            self._params = RowParams(self.sampler, epoch)
        # the epoch's last run may be shorter: DALI takes any batch up to its batch_size
        return np.minimum(np.arange(j, min(j + size, self.padded_len)), len(self._rows) - 1)

    def _degradation_inputs(self, idx: np.ndarray) -> tuple:
        """The rows' Real-ESRGAN inputs, or nothing without that degradation."""
        if not self.realesrgan_scale:
            return ()
        from .dali_degrade import dali_inputs
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        patch = self.sampler.patch
        inputs = dali_inputs(self._params.rows(lo, hi), patch, patch, self.realesrgan_scale)
        return tuple(np.ascontiguousarray(a[idx - lo]) for a in inputs.values())

    def __call__(self, info):
        idx = self._batch(info)
        rows, db, patch = self._rows[idx], self.db, self.sampler.patch
        extra = self._degradation_inputs(idx)
        if db.codec == "raw":
            # a tuple even alone: DALI 2.4's workers cannot send a bare array as a batch
            return (_cut(db, rows, rows[:, ID], patch), *extra)
        return (*_records(db, rows[:, ID], rows), _flags(rows), *extra)


def _flags(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows[:, HFLIP:TRANSPOSE + 1], np.int32)


def _cut(db, rows, ids, size: int) -> np.ndarray:
    """The raw records ``ids`` cut and flipped as ``rows`` say: one (n, size, size, C)
    array."""
    out = None
    for k, (row, i) in enumerate(zip(rows, ids)):
        patch = crop_and_flip(db.image(int(i)), row, size)
        if out is None:
            out = np.empty((len(rows), *patch.shape), np.uint8)
        out[k] = patch
    return out


def _records(db, ids, rows) -> tuple:
    """The encoded records ``ids``, their headers checked against the index, and where to
    cut them: ``(records, where)``, ``where`` an (n, 3) int32 array of each record's
    length and the crop's top and left (``rows``).

    ``records`` is one (n, longest) array, each record zero-padded (the graph cuts it to
    its length): one array costs DALI's main thread the same at any batch size, a list of
    n arrays about 20 us more per record. Where padding would more than double the bytes (one
    large image among small ones), a list of the records as they are."""
    values = [db.read(int(i)) for i in ids]
    for i, value in zip(ids, values):
        _check_header(db, int(i), value)
    lengths = np.array([len(v) for v in values], np.int32)
    where = np.stack([lengths, rows[:, Y], rows[:, X]], axis=1).astype(np.int32)
    if lengths.max() * len(values) > 2 * lengths.sum():
        return [np.frombuffer(v, np.uint8) for v in values], where
    padded = np.zeros((len(values), lengths.max()), np.uint8)
    for k, v in enumerate(values):
        padded[k, :len(v)] = np.frombuffer(v, np.uint8)
    return padded, where


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
    """PatchSource for paired databases: per side (HR, then LR) the cut patches of raw
    records, or encoded records and where to cut them (``_records``); then the flips,
    shared by both."""

    def __init__(self, db, lr, sampler, scale: int, first_epoch: int, skip: int,
                 padded_len: int, per_run: int = 1):
        super().__init__(db, sampler, first_epoch, skip, padded_len, per_run=per_run)
        self._lr, self.scale = Handoff(lr), scale

    @property
    def lr(self):
        return self._lr.get()

    def __call__(self, info):
        idx = self._batch(info)  # first: it reads the epoch's plan into self._rows
        rows, patch = self._rows[idx], self.sampler.patch
        lr_rows = np.stack([lr_row(r, self.scale) for r in rows])
        out = []
        for db, ids, r, size in ((self.db, rows[:, ID], rows, patch),
                                 (self.lr.db, self.lr.ids[rows[:, ID]], lr_rows,
                                  patch // self.scale)):
            if db.codec == "raw":
                out.append(_cut(db, r, ids, size))
            else:
                out += _records(db, ids, r)
        return (*out, _flags(rows))
