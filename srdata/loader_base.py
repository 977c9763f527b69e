"""The base class of the two loaders (``srdata.torch_loader``, ``srdata.dali_loader``): the
sampler, the position in the epoch, the patch schedule and the output format they share.

``srdata.loader`` documents the interface and builds a loader (``make_loader``); this module
imports neither implementation, so the imports run one way: factory -> implementations ->
base.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampler import RowParams, Sampler
from .schedule import PatchSchedule

# How the DALI loader hands a batch over on a GPU: synchronised with the host (DALI's
# default), or on the current CUDA stream. Here, not in srdata.dali_loader, so that tools
# can name the choices without importing DALI.
DALI_OUTPUTS = ("host", "stream")
# Samples one DALI pipeline run makes by default on a GPU (DaliTuning.batches_per_run): 4
# training batches of 32. A run's Python cost on the host (~1.6 ms on an H200, DALI's own)
# is paid once for all 4; the outputs are copied on the device, not the host. A GPU run
# decides whether more pays (train_throughput.py --dali-per-run 0,1).
RUN_SAMPLES = 128
# The GPU decoders' buffer hints DaliTuning passes on (DALI's own argument names)
DECODER_HINTS = ("device_memory_padding", "host_memory_padding", "preallocate_width_hint",
                 "preallocate_height_hint", "hybrid_huffman_threshold")


@dataclass(frozen=True)
class DaliTuning:
    """How the DALI loader runs, apart from what it yields: knobs for benchmarks and the GPU
    suite, each default the measured best. ``make_loader(..., dali=DaliTuning(...))``.

    ``roi_decode``: decode just the patch's region of each JPEG (within a grey level of the
    full decode); 1.7x the full decode on 2 vCPUs (benchmarks/results/cpu-2core-2026-11-26),
    +1% to +40% with ``mixed`` decode on an H100 (benchmarks/results/h100-2026-11-27-2).
    ``threads``: the pipeline's CPU threads (default: ``workers``). GPU decode only:
    ``hw_decoder_load``, the share of JPEGs sent to the hardware decoder (default 1.0, not
    DALI's 0.65: 11,230 against 7,511 img/s on an H100); ``decoder_hints``, some of
    ``DECODER_HINTS`` (DALI's defaults were as fast as hints sized to the images).
    ``outputs`` (GPU): ``"host"`` takes each batch from DALI synchronised with the host,
    ``"stream"`` on the current CUDA stream, so the thread that launches the step never
    waits for DALI's GPU work (no faster on an H200, 2026-11-28).
    ``batches_per_run``: training batches made by one run of the pipeline, handed out one
    by one (default: ``per_run``). DALI's Python costs about the same per run at any batch
    size, so the host's time per training batch falls with it; a Real-ESRGAN degradation
    drawn by DALI keeps 1, where DALI's checkpoint makes resume exact."""
    roi_decode: bool = True
    threads: int | None = None
    hw_decoder_load: float | None = None
    decoder_hints: dict | None = None
    outputs: str = "host"
    batches_per_run: int | None = None

    def __post_init__(self):
        for name in ("threads", "batches_per_run"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"got DaliTuning({name}={getattr(self, name)}), expected >= 1")
        load = self.hw_decoder_load
        if load is not None and not 0 <= load <= 1:
            raise ValueError(f"got DaliTuning(hw_decoder_load={load}), expected 0 to 1")
        if self.outputs not in DALI_OUTPUTS:
            raise ValueError(f"got DaliTuning(outputs={self.outputs!r}), expected "
                             f"{' or '.join(DALI_OUTPUTS)}")
        unknown = sorted(set(self.decoder_hints or {}) - set(DECODER_HINTS))
        if unknown:
            raise ValueError(f"got DaliTuning(decoder_hints) {', '.join(unknown)}, expected "
                             f"some of {', '.join(DECODER_HINTS)}")

    def per_run(self, batch_size: int, gpu: bool) -> int:
        """Training batches per pipeline run: ``batches_per_run``, or on a GPU as many as
        make ``RUN_SAMPLES`` samples (at least one); on the CPU one, as there the outputs
        are copied out of DALI on the host, and a copy 4 times larger cost more than the
        runs it saved (benchmarks/results/cpu2-2026-12-05)."""
        if self.batches_per_run:
            return self.batches_per_run
        return max(1, RUN_SAMPLES // batch_size) if gpu else 1


class Loader:
    """What both implementations share: the sampler, the position, the output format."""

    def __init__(self, db, sampler: Sampler, scale: int, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, lr=None, degradation: str = "nn",
                 usm: bool = False, schedule: PatchSchedule | None = None):
        self.db, self.sampler, self.scale = db, sampler, scale
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.epoch, self.batch = 0, 0
        self.lr = lr  # paired data: the LR database (srdata.paired.LRSource)
        self.schedule = schedule  # epoch -> (patch, batch size); None: as last set by hand
        # how LR is made; from the USM-sharpened HR (usm), which is the target too unless
        # usm is "lr" (the GAN stage sharpens its own copy of the plain target)
        self.degradation, self.usm = degradation, bool(usm)
        self.sharp_target = self.usm and usm != "lr"
        self._params = None  # realesrgan: RowParams of the epoch under way

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, patch_size: int | None = None,
                  batch_size: int | None = None) -> None:
        """Start ``epoch`` at its first batch (a no-op for the epoch already under way).

        ``patch_size``/``batch_size``: train on these from ``epoch`` on (a loader made with
        a ``patch_schedule`` takes them from it instead)."""
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0
        self._switch(epoch, patch_size, batch_size)

    def batches_in(self, epoch: int) -> int:
        """Batches per rank in ``epoch``, which a patch schedule may change per stage."""
        if self.schedule is None:
            return len(self.sampler)
        return len(self.sampler.resized(*self.schedule(epoch)))

    def _switch(self, epoch: int, patch_size=None, batch_size=None) -> None:
        """Point the sampler at ``epoch``'s patch and batch size (an epoch boundary only)."""
        s = self.sampler
        if self.schedule is not None:
            if patch_size is not None or batch_size is not None:
                raise ValueError("this loader follows its patch_schedule; set_epoch takes no "
                                 "patch_size or batch_size")
            patch_size, batch_size = self.schedule(epoch)
        patch_size, batch_size = patch_size or s.patch, batch_size or s.batch_size
        if (patch_size, batch_size) == (s.patch, s.batch_size):
            return
        if self.batch:
            raise ValueError(f"epoch {self.epoch} is under way (batch {self.batch}); change "
                             "the patch or batch size at an epoch boundary")
        check_patch(patch_size, self.scale)
        self.sampler = s.resized(patch_size, batch_size)

    def state_dict(self) -> dict:
        s = self.sampler
        return {"epoch": self.epoch, "batch": self.batch, "seed": s.seed,
                "batch_size": s.batch_size, "world_size": s.world_size, "rank": s.rank,
                "draw": s.draw, "patch": s.patch}

    def load_state_dict(self, state: dict) -> None:
        if self.schedule is not None:  # the saved epoch's stage
            self.batch = 0
            self._switch(int(state["epoch"]))
        s = self.sampler
        mine = {"seed": s.seed, "batch_size": s.batch_size, "world_size": s.world_size,
                "draw": s.draw}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"loader state was saved with {theirs}, this loader has {mine}; "
                             "resume with the same seed, batch size, sample ratio and GPUs")
        if state.get("patch", s.patch) != s.patch:
            raise ValueError(f"loader state was saved at patch {state['patch']}, this loader "
                             f"has patch {s.patch} in epoch {state['epoch']}; resume with the "
                             "same patch (schedule)")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self):
        start = self.batch
        for pair in self._batches(self.epoch, start):
            self.batch += 1
            yield pair
        self.epoch, self.batch = self.epoch + 1, 0
        self._switch(self.epoch)

    def _batches(self, epoch: int, start: int):
        raise NotImplementedError

    def _row_params(self, epoch: int, start: int, stop: int) -> dict:
        p = self._params
        if p is None or (p.epoch, p.sampler) != (epoch, self.sampler):
            self._params = p = RowParams(self.sampler, epoch)
        return p.rows(start, stop)

    def _degrade(self, hr: torch.Tensor, epoch: int, b: int) -> torch.Tensor:
        """The LR of batch ``b`` of ``epoch`` (NCHW HR on the device, uint8 or the float
        ``_sharpen`` made -> uint8 LR), made on the device after the batch arrived (the
        torch loader's way; DALI makes bicubic and Real-ESRGAN LR in its graph)."""
        from .degrade import make_lr
        params = None
        if self.degradation == "realesrgan":
            first = b * self.sampler.batch_size
            params = self._row_params(epoch, first, first + len(hr))
        return make_lr(hr, self.scale, self.degradation, params)

    def _sharpen(self, hr: torch.Tensor) -> torch.Tensor | None:
        """The uint8 NCHW HR batch USM-sharpened (float in [0, 1], unrounded: what the LR is
        made from, as Real-ESRGAN's ``gt_usm``); None without USM."""
        if not self.usm:
            return None
        from .degrade import usm_sharpen
        return usm_sharpen(hr.float().div_(255))

    def _target(self, hr: torch.Tensor, sharp: torch.Tensor | None = None) -> torch.Tensor:
        """The uint8 NCHW HR batch -> the output target: with USM (not "lr"), the sharpened
        HR (``sharp`` if already made) rounded to grey levels."""
        if self.sharp_target:
            sharp = self._sharpen(hr) if sharp is None else sharp
            hr = (sharp * 255).round_().to(torch.uint8)
        return self._output(hr)

    def _output(self, t: torch.Tensor) -> torch.Tensor:
        """An NCHW uint8 view on the device -> the output dtype and memory format."""
        if self.dtype != torch.uint8:
            t = t.to(self.dtype).div_(255)  # .to keeps channels_last strides
        return t.contiguous(memory_format=torch.channels_last if self.channels_last
                            else torch.contiguous_format)


def check_patch(patch_size: int, scale: int) -> None:
    if patch_size % scale:
        below = patch_size - patch_size % scale
        raise ValueError(f"patch size {patch_size} is not divisible by scale {scale}; use "
                         f"{below} or {below + scale}")
