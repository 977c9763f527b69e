"""One loader interface, two implementations (``torch`` and ``dali``).

Both iterate ``(lr, hr)`` pairs on the device as NCHW tensors in channels_last memory
format, either float in [0, 1] (the dtype the caller asks for) or uint8. ``lr`` is by
default the nearest-neighbour downscale of ``hr`` by ``scale``: ``lr[y, x] = hr[y*s + s//2,
x*s + s//2]`` (what DALI's INTERP_NN resize computes), so no blur or ringing is baked into
the inputs; ``degradation="bicubic"`` / ``"realesrgan"`` make it as real LR images are made
(``srdata.degrade``), with every random parameter drawn by the sampler.
With a paired LR database (``lr_db``) ``lr`` is instead that database's crop.

Progress is counted in batches handed to the caller: ``state_dict()`` taken after k batches
of epoch e resumes, through ``load_state_dict()``, at batch k of epoch e, and after a full
epoch at batch 0 of epoch e + 1.

The patch side (and batch size) may change at an epoch boundary: by a ``patch_schedule``
(``srdata.schedule.PatchSchedule``) the loader follows on its own, or by hand with
``set_epoch(e, patch_size=..., batch_size=...)``. A loader switched by hand resumes by
switching to the saved epoch's patch before ``load_state_dict()``.
"""
from __future__ import annotations

import os

import torch

from ._proc import main_script_problem
from .sampler import DEGRADATIONS, RowParams, Sampler
from .schedule import PatchSchedule

LOADERS = ("dali", "torch")


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
        self.degradation, self.usm = degradation, usm  # how LR is made; USM-sharpened targets
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
        _check_patch(patch_size, self.scale)
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
        """The LR of batch ``b`` of ``epoch`` (uint8 NCHW HR on the device -> uint8 LR),
        made on the device after the batch arrived (the torch loader's way; DALI makes
        bicubic and Real-ESRGAN LR in its graph)."""
        from .degrade import make_lr
        params = None
        if self.degradation == "realesrgan":
            first = b * self.sampler.batch_size
            params = self._row_params(epoch, first, first + len(hr))
        return make_lr(hr, self.scale, self.degradation, params)

    def _target(self, hr: torch.Tensor) -> torch.Tensor:
        """The uint8 NCHW HR batch -> the output target, USM-sharpened if asked for."""
        if self.usm:
            from .degrade import usm_sharpen
            hr = usm_sharpen(hr.float().div_(255)).mul_(255).round_().to(torch.uint8)
        return self._output(hr)

    def _output(self, t: torch.Tensor) -> torch.Tensor:
        """An NCHW uint8 view on the device -> the output dtype and memory format."""
        if self.dtype != torch.uint8:
            t = t.to(self.dtype).div_(255)  # .to keeps channels_last strides
        return t.contiguous(memory_format=torch.channels_last if self.channels_last
                            else torch.contiguous_format)


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def make_loader(db, loader: str = "dali", batch_size: int = 32, patch_size: int = 256,
                scale: int = 4, seed: int = 0, sample_ratio: float = 1.0, rank: int = 0,
                world_size: int = 1, device=None, dtype: torch.dtype = torch.float32,
                channels_last: bool = True, augment: bool = True, drop_last: bool = True,
                workers: int | None = None, roi_decode: bool = True,
                ids=None, lr_db=None, patch_schedule=None, degradation: str = "nn",
                usm: bool = False, dali_threads: int | None = None,
                hw_decoder_load: float | None = None, decoder_hints: dict | None = None
                ) -> Loader:
    """An iterable of ``(lr, hr)`` batches from the database ``db`` (a path or an open one).

    ``workers``: CPU processes reading the database (torch: DataLoader workers; dali:
    external-source workers); default all cores but one. ``roi_decode`` (dali only, default
    on): decode just the patch's region of each JPEG; 1.7x the full decode on the CPU
    (benchmarks/results/cpu-2core-2026-11-26) and as fast or faster with ``mixed`` decode on
    an H100 (+1% to +40%, benchmarks/results/h100-2026-11-27-session2). ``ids``:
    draw from these images only (e.g. the training part of a train/validation split).
    ``lr_db``: paired training (a path or an open database): ``lr`` is the crop of this
    database's image of the same name (see ``srdata.paired``) instead of a downscale of
    ``hr``; crops start on multiples of ``scale``, flips apply to both.
    ``patch_schedule``: progressive patch sizes, a ``PatchSchedule`` or its text
    (``"128:0,256:10"``: 128 px patches from epoch 0, 256 from epoch 10, in batches of
    ``batch_size``); it replaces ``patch_size``. See ``srdata.schedule``.
    ``degradation``: how ``lr`` is made from ``hr``: ``"nn"`` (nearest neighbour, the
    fastest), ``"bicubic"`` (MATLAB ``imresize``, as DIV2K's LR) or ``"realesrgan"``
    (Real-ESRGAN's second-order degradation, every parameter drawn by the sampler per row;
    see ``srdata.degrade``). ``usm``: USM-sharpen the ``hr`` targets (Real-ESRGAN's
    ``gt_usm``).
    DALI tuning: ``dali_threads`` (the pipeline's CPU threads; default ``workers``), and for
    GPU decode ``hw_decoder_load`` (the share of JPEGs sent to the hardware decoder; default
    1.0, not DALI's 0.65, as measured on an H100) and ``decoder_hints`` (the decoders'
    ``device_memory_padding``, ``host_memory_padding``, ``preallocate_width_hint``,
    ``preallocate_height_hint``, ``hybrid_huffman_threshold``; DALI's defaults, which the
    H100 run found as fast as hints sized to the images).
    """
    from .reader import open_db
    if loader not in LOADERS:
        raise ValueError(f"got loader={loader!r}, expected one of {', '.join(LOADERS)}")
    problem = main_script_problem() if loader == "dali" or workers != 0 else None
    if problem:
        raise ValueError("the loader's worker processes are spawned and re-import the main "
                         f"script from its file, but {problem}: save the script to a file and "
                         "run `python script.py`, or pass "
                         + ("workers=0" if loader == "torch" else "loader='torch', workers=0"))
    if degradation not in DEGRADATIONS:
        raise ValueError(f"got degradation={degradation!r}, expected one of "
                         f"{', '.join(DEGRADATIONS)}")
    if lr_db is not None and degradation != "nn":
        raise ValueError(f"got lr_db and degradation={degradation!r}: a paired database "
                         "brings its own LR; leave degradation at 'nn' (or drop lr_db)")
    if scale not in (2, 3, 4):
        raise ValueError(f"got scale={scale}, expected 2, 3 or 4")
    if patch_schedule is not None:
        if not isinstance(patch_schedule, PatchSchedule):
            patch_schedule = PatchSchedule.parse(patch_schedule, batch_size)
        patch_schedule.check(scale)
        patch_size, batch_size = patch_schedule(0)
    _check_patch(patch_size, scale)
    if dtype not in (torch.uint8, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"got dtype={dtype}, expected uint8, float32, float16 or bfloat16")
    db = open_db(db) if isinstance(db, (str, os.PathLike)) else db
    lr = None
    if lr_db is not None:
        from .paired import pair
        lr = pair(db, open_db(lr_db) if isinstance(lr_db, (str, os.PathLike)) else lr_db,
                  scale)
    sampler = Sampler(db.heights, db.widths, batch_size, patch_size, seed=seed,
                      sample_ratio=sample_ratio, rank=rank, world_size=world_size,
                      augment=augment, drop_last=drop_last, ids=ids,
                      align=1 if lr is None else scale)
    if patch_schedule is not None:  # every stage's sampler, so a bad stage fails now
        for e, _ in patch_schedule.stages:
            sampler.resized(*patch_schedule(e))
    device = resolve_device(device)
    if workers is None:
        workers = max(1, len(os.sched_getaffinity(0)) - 1)
    if loader == "torch":
        given = [k for k, v in (("dali_threads", dali_threads), ("decoder_hints", decoder_hints),
                                ("hw_decoder_load", hw_decoder_load)) if v is not None]
        if given:
            raise ValueError(f"got {', '.join(given)} with loader='torch': they tune DALI; "
                             "drop them or use loader='dali'")
        from .torch_loader import TorchLoader
        return TorchLoader(db, sampler, scale, device, dtype, channels_last, workers, lr=lr,
                           degradation=degradation, usm=usm, schedule=patch_schedule)
    from .dali_loader import DaliLoader
    return DaliLoader(db, sampler, scale, device, dtype, channels_last, workers, roi_decode,
                      lr=lr, degradation=degradation, usm=usm, schedule=patch_schedule,
                      threads=dali_threads, hw_decoder_load=hw_decoder_load,
                      decoder_hints=decoder_hints)


def _check_patch(patch_size: int, scale: int) -> None:
    if patch_size % scale:
        below = patch_size - patch_size % scale
        raise ValueError(f"patch size {patch_size} is not divisible by scale {scale}; use "
                         f"{below} or {below + scale}")
