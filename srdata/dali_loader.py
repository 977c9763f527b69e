"""``loader="dali"``: decode, crop, flip and downscale on the GPU with NVIDIA DALI.

Python worker processes (DALI's parallel external source) read each batch's encoded bytes
from LMDB and hand over the sampler's crops and flips; everything after that runs in DALI:
``mixed`` decode on a GPU (``cpu`` without one, ``device_id=None``, the same graph CI
tests), slice, flips, transpose and the downscale: nearest neighbour, MATLAB bicubic or
Real-ESRGAN's degradation (``srdata.dali_degrade``, the parameters from the source's
sampler). With a paired LR
database the source hands over both records and the graph decodes and cuts both, no resize.
"""
from __future__ import annotations

import logging
import signal
import tempfile
import time
import warnings
from contextlib import contextmanager

import numpy as np
import torch

from . import dali_degrade as dd
from . import format as fmt
from ._proc import WorkerDied, killed, raise_when_a_worker_dies, shm_space
from .dali_source import PairedSource, PatchSource
from .loader_base import DaliTuning, Loader
from .sampler import ID

try:
    from nvidia.dali import fn, pipeline_def, types
except ImportError:  # reported when a DALI loader is asked for, not at import
    fn = pipeline_def = types = None

MISSING_DALI = ("NVIDIA DALI is not installed: `pip install '.[dali]'` (nvidia-dali-cuda120) "
                "in the srpipe checkout, or use loader='torch' (--loader torch)")


# Tuning of the GPU (``mixed``) decoders, for library users and the GPU suite to measure.
# All JPEGs to the hardware decoder: on an H100 with 16 cores, DALI's default 0.65 leaves a
# third to CPU Huffman decoding and made 7,511 img/s against 11,230 at 1.0 (same call,
# benchmarks/results/h100-2026-11-27-2); GPUs without one ignore it.
HW_DECODER_LOAD = 1.0


def decoder_args(gpu: bool, hw_decoder_load: float | None, hints: dict | None) -> dict:
    """The decoders' tuning arguments: for ``mixed`` decode only (the CPU decoder has no
    hardware share to set and no device buffers to size)."""
    if not gpu:
        return {}
    return dict(hints or {}, hw_decoder_load=HW_DECODER_LOAD if hw_decoder_load is None
                else hw_decoder_load)


def _decode_patch(data, where, flags, size: int, gpu: bool, roi: bool, dec: dict):
    """An encoded record, zero-padded -> its ``size``-px patch (only that region decoded
    with ``roi``), flipped and transposed as ``flags`` say; ``where``: the record's length,
    then the patch's top and left (dali_source._records)."""
    data = fn.slice(data, start=[0], shape=where[0:1], axes=[0])
    anchor, shape = where[1:3], np.array([size, size], np.int32)
    device = "mixed" if gpu else "cpu"
    if roi:
        img = fn.decoders.image_slice(data, anchor, shape, axis_names="HW", device=device,
                                      output_type=types.RGB, **dec)
    else:
        img = fn.decoders.image(data, device=device, output_type=types.RGB, **dec)
        img = fn.slice(img, anchor, shape, axis_names="HW")
    img = fn.flip(img, horizontal=flags[0], vertical=flags[1])
    if flags[2] == 1:
        img = fn.transpose(img, perm=[1, 0, 2], transpose_layout=False)
    return img


def _source(source, workers: int, dtypes: list, **more):
    """The parallel external source of ``source`` (srdata.dali_source), its outputs. The
    sources make whole batches, each in one worker process: as many batches ahead as there
    are workers keeps them all busy."""
    return fn.external_source(source=source, num_outputs=len(dtypes), batch=True,
                              batch_info=True, parallel=True, prefetch_queue_depth=workers,
                              dtype=dtypes, **more)


def _paired_pipeline(source, hr_raw, lr_raw, patch, scale, gpu, roi, workers, dec):
    """Both patches decoded and cut in the graph (raw ones arrive cut); no downscale."""
    sides = ((hr_raw, patch), (lr_raw, patch // scale))
    # per side a cut patch, or an encoded record and where to cut it; then the shared flips
    dtypes = [t for raw, _ in sides
              for t in ((types.UINT8,) if raw else (types.UINT8, types.INT32))]
    dtypes.append(types.INT32)

    @pipeline_def(enable_conditionals=True, py_num_workers=workers, py_start_method="spawn")
    def paired_pipeline():
        outs = list(_source(source, workers, dtypes))
        flags = outs.pop()
        patches = []
        for raw, size in sides:
            if raw:  # cut and flipped by the source already
                data = outs.pop(0)
                patches.append(data.gpu() if gpu else data)
                continue
            data, where = outs.pop(0), outs.pop(0)
            patches.append(_decode_patch(data, where, flags, size, gpu, roi, dec))
        hr, lr = patches
        return lr, hr

    return paired_pipeline


_DALI_TYPES = {np.float32: types.FLOAT, np.int32: types.INT32, np.bool_: types.BOOL} \
    if types else {}


def _sr_pipeline(source, raw, patch, scale, gpu, roi, workers, dec, degradation="nn",
                 usm=False):
    # realesrgan: the source also hands over each row's parameters (dali_degrade.INPUTS)
    names = list(dd.INPUTS) if degradation == "realesrgan" else []
    extra = [_DALI_TYPES[dd.INPUTS[k]] for k in names]

    @pipeline_def(enable_conditionals=True, py_num_workers=workers, py_start_method="spawn")
    def sr_pipeline():
        if raw:  # cut and flipped by the source already
            data, *params = _source(source, workers, [types.UINT8, *extra],
                                    layout=["HWC"] + [""] * len(names))
            hr = data.gpu() if gpu else data
        else:
            data, where, flags, *params = _source(
                source, workers, [types.UINT8, types.INT32, types.INT32, *extra])
            hr = _decode_patch(data, where, flags, patch, gpu, roi, dec)
        # with usm the LR is made from the sharpened HR; the plain HR goes back, to be
        # sharpened on the device as the torch loader's is (Loader._target)
        if degradation == "bicubic":
            lr = dd.bicubic_downscale(hr, patch, scale, usm)
        elif names:
            lr = dd.degrade(fn.reshape(hr, layout="HWC"), dict(zip(names, params)), usm)
        else:
            lr = dd.nn_downscale(hr, patch, scale, usm)
        return lr, hr

    return sr_pipeline


class DaliLoader(Loader):
    def __init__(self, db, sampler, scale, device, dtype, channels_last, workers: int,
                 lr=None, degradation: str = "nn", usm: bool = False, schedule=None,
                 tuning: DaliTuning = DaliTuning()):
        if pipeline_def is None:
            raise ImportError(MISSING_DALI)
        super().__init__(db, sampler, scale, device, dtype, channels_last, lr, degradation,
                         usm, schedule)
        self.workers, self.roi_decode = max(1, workers), tuning.roi_decode
        self.threads = tuning.threads or self.workers  # DALI's CPU threads; workers read LMDB
        self.dec = decoder_args(device.type == "cuda", tuning.hw_decoder_load,
                                tuning.decoder_hints)
        self.outputs, self.tuning = tuning.outputs, tuning
        self._pipe, self._pipe_at = None, None  # the pipeline and the (epoch, batch) it is at
        self._watching = False
        self._pipe_sampler = None  # the sampler (patch, batch size) the pipeline was built for
        # Real-ESRGAN's noise is drawn by DALI's generators, whose state is the pipeline's:
        # a resume restores it from a checkpoint of the pipeline (DALI's own), which also
        # holds where the source stood, so the source is built as it was then
        self._rng = lr is None and degradation == "realesrgan"
        self._origin = None  # (first epoch, rows skipped) the source was built with
        self._pos = None  # the (epoch, batch) the pipeline's next output is
        self._restore = None  # a loaded state's pipeline checkpoint, for the next build
        self.per_run = 1  # training batches per run of the pipeline (DaliTuning.per_run)

    def _build(self, epoch: int, start: int):
        s, gpu = self.sampler, self.device.type == "cuda"
        # a loaded state's checkpoint, or the old pipeline's where it stands (an iteration
        # broken off and started again)
        r, self._restore, rng = self._restore or self._snapshot(), None, {}
        self._pipe = None  # a stage switch: let the old pipeline and its workers go first
        first, skip, padded = epoch, start * s.batch_size, len(s) * s.batch_size
        # DALI's checkpoint is taken between runs: one batch a run keeps every batch a
        # place to resume from with the same noise
        self.per_run = 1 if self._rng else min(
            self.tuning.per_run(s.batch_size, self.device.type == "cuda"), len(s))
        if self._rng:
            rng["enable_checkpointing"] = True
            if r is not None and r["at"] == [epoch, start] and \
                    r["sampler"] == [s.patch, s.batch_size]:
                first, skip = r["first_epoch"], r["skip"]
                rng["checkpoint"] = r["checkpoint"]
        if self.lr is None:
            real = self.degradation == "realesrgan"
            source = PatchSource(self.db, s, first, skip, padded, self.scale if real else 0,
                                 self.per_run)
            build = _sr_pipeline(source, self.db.codec == "raw", s.patch, self.scale, gpu,
                                 self.roi_decode, self.workers, self.dec, self.degradation,
                                 self.usm)
        else:
            source = PairedSource(self.db, self.lr, s, self.scale, epoch, skip, padded,
                                  self.per_run)
            build = _paired_pipeline(source, self.db.codec == "raw", self.lr.codec == "raw",
                                     s.patch, self.scale, gpu, self.roi_decode, self.workers,
                                     self.dec)
        args = dict(batch_size=s.batch_size * self.per_run, num_threads=self.threads,
                    device_id=self.device.index if gpu else None, prefetch_queue_depth=2,
                    seed=s.seed)
        try:
            with _conversion_failures() as failed:
                pipe = build(**args, **rng)
            pipe.build()
        except TypeError as e:
            if not failed:
                raise
            raise OSError(failed[0].errno, f"{failed[0].strerror} (DALI writes the pipeline's "
                          "converted code there; set TMPDIR to a folder with room)",
                          failed[0].filename or tempfile.gettempdir()) from e
        except RuntimeError as e:
            if not rng or "checkpoint" not in str(e).lower():
                raise
            # a DALI build whose operators cannot all be checkpointed (checked on the CPU
            # only): train on, with a resume exact but for the noise, as before
            warnings.warn(f"DALI cannot checkpoint this pipeline ({str(e).splitlines()[0]}); "
                          "a resumed run's Real-ESRGAN noise will differ from an "
                          "uninterrupted run's", stacklevel=2)
            self._rng = False
            return self._build(epoch, start)  # the source too as without a checkpoint
        self._pipe, self._pipe_sampler = pipe, s
        self._origin, self._pos = (first, skip), (epoch, start)
        if not self._watching:
            raise_when_a_worker_dies(self, _dead_worker)
            self._watching = True

    def _batches(self, epoch, start):
        if (self._pipe is None or self._pipe_at != (epoch, start)
                or self._pipe_sampler is not self.sampler):
            # first use, a jump (resume, set_epoch, break), or a new patch schedule stage
            self._build(epoch, start)
        self._pipe_at = None  # mid-epoch until the epoch is drained
        s, pipe = self.sampler, self._pipe
        # "stream": DALI's outputs are ordered on the stream the step runs on, not waited
        # for by this thread (DALI's dynamic executor, the default for our pipelines)
        stream = (torch.cuda.current_stream(self.device)
                  if self.outputs == "stream" and self.device.type == "cuda" else None)
        size, k = s.batch_size, self.per_run
        for b in range(start, len(s), k):  # a run: batches b to b + k - 1, or to the end
            try:
                lr, hr = pipe.run(stream)
            except Exception as e:  # DALI raises several types; name the bad record
                raise self._explain(epoch, b, e) from e
            n = min(k * size, s.per_rank - b * size)  # rows past the epoch's end: padding
            self._pos = (epoch, min(b + k, len(s)))
            lr, hr = self._to_torch(lr, n), self._target(self._to_torch(hr, n, output=False))
            for i in range(0, n, size):  # views, in the output's memory format
                yield lr[i:i + size], hr[i:i + size]
        # the source goes on into the next epoch (dali_source.PatchSource): no reset
        self._pipe_at = self._pos = (epoch + 1, 0)

    def _snapshot(self) -> dict | None:
        """The pipeline's checkpoint and what its source was built with, when it stands at
        (epoch, batch) for this sampler; None when it does not, or draws nothing random."""
        s = self.sampler
        if not (self._rng and self._pipe is not None and self._pipe_sampler is s
                and self._pos == (self.epoch, self.batch)):
            return None
        return {"checkpoint": self._pipe.checkpoint(), "at": [self.epoch, self.batch],
                "sampler": [s.patch, s.batch_size], "first_epoch": self._origin[0],
                "skip": self._origin[1]}

    def state_dict(self) -> dict:
        state = super().state_dict()
        snap = self._snapshot()
        if snap is not None:
            state["dali"] = snap
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._restore = state.get("dali") if self._rng else None
        self._pipe_at = None  # the next iteration builds the pipeline, from it if it fits

    def _to_torch(self, tl, n: int, output: bool = True) -> torch.Tensor:
        t = tl.as_tensor()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray
            out = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            # DALI's own buffer, valid until its next run: a float output or a sharpened
            # target is converted from it right away; uint8 is copied out of it here
            out = torch.from_numpy(np.asarray(t))[:n]
            if self.dtype == torch.uint8:
                out = out.clone()
        out = out[:n].permute(0, 3, 1, 2)
        return self._output(out) if output else out

    def _explain(self, epoch, b, err):
        """DALI cannot say which sample failed: re-read the records of this batch and the
        ones prefetched behind it on the CPU. A dead worker says why itself: DALI can see
        its pipe close ("Worker data receiving interrupted") before SIGCHLD says so."""
        for _ in range(10):
            dead = _dead_worker(self)
            if dead:
                return WorkerDied(dead)
            time.sleep(0.1)  # its exit code can lag the closed pipe
        s = self.sampler
        rows = s.plan(epoch)[b * s.batch_size:(b + 3 * self.per_run) * s.batch_size]
        for row in rows:
            try:
                self.db.image(int(row[ID]))
                if self.lr is not None:
                    self.lr.image(int(row[ID]))
            except fmt.DBError as e:
                return fmt.DBError(f"{e}; run `srdata verify {self.db.path}` to list every bad "
                                   "record")
        return RuntimeError(f"DALI pipeline failed on batch {b} of epoch {epoch} of "
                            f"{self.db.path}: {err}")


@contextmanager
def _conversion_failures():
    """The OSErrors that made DALI's AutoGraph give up converting the pipeline's ``if``
    statements (it writes the converted code to TMPDIR; a full one fails). AutoGraph only
    logs them, runs the code unconverted, and the first ``if`` on a DataNode then fails with
    a TypeError about enabling conditionals that hides the cause; the warning is held back
    here, for the build's error to name the cause in one line."""
    failed = []

    def keep(record: logging.LogRecord) -> bool:
        cause = record.args[-1] if isinstance(record.args, tuple) and record.args else None
        if str(record.msg).startswith("AutoGraph could not transform") and \
                isinstance(cause, OSError):
            failed.append(cause)
            return False
        return True
    root = logging.getLogger()  # AutoGraph logs with logging.warning
    root.addFilter(keep)
    try:
        yield failed
    finally:
        root.removeFilter(keep)


def _dead_worker(loader: DaliLoader) -> str | None:
    """A message when a source worker of the loader's current pipeline was killed (DALI
    keeps them in its pool's processes; another DALI version may not: then no message)."""
    pipe = loader._pipe
    pool = getattr(getattr(pipe, "_py_pool", None), "pool", None)
    for proc in getattr(pool, "_processes", ()):
        how = killed(proc.exitcode)
        if how:
            # a write to a full /dev/shm, where the workers put their batches
            why = (f": out of shared memory ({shm_space()})"
                   if proc.exitcode == -signal.SIGBUS else "")
            return f"DALI worker process {proc.pid} was {how}{why}"
    return None
