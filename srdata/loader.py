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

``make_loader`` builds one; what the two share is ``srdata.loader_base.Loader``.
"""
from __future__ import annotations

import os

import torch

from ._proc import main_script_problem
from .loader_base import DaliTuning, Loader, check_patch
from .sampler import DEGRADATIONS, Sampler
from .schedule import PatchSchedule

LOADERS = ("dali", "torch")


def parse_device(device) -> torch.device:
    """``device`` (a name such as ``"cuda:1"``, a torch.device, or None: cuda if there is
    a GPU, else cpu) as a torch.device, checked without starting CUDA: ValueError for a
    name torch does not know or a CUDA device that is not there."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"got device {str(device)!r}, expected cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"got device {str(device)!r}, but no CUDA GPU is visible to "
                             "torch here; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"got device {str(device)!r}, but only {count} CUDA GPU(s) are "
                             f"visible (cuda:0 to cuda:{count - 1})")
    return parsed


def resolve_device(device) -> torch.device:
    """``parse_device``, with a CUDA device's index filled in (the current one)."""
    device = parse_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def make_loader(db, loader: str = "dali", batch_size: int = 32, patch_size: int = 256,
                scale: int = 4, seed: int = 0, sample_ratio: float = 1.0, rank: int = 0,
                world_size: int = 1, device=None, dtype: torch.dtype = torch.float32,
                channels_last: bool = True, augment: bool | str = True, drop_last: bool = True,
                workers: int | None = None, ids=None, lr_db=None, patch_schedule=None,
                degradation: str = "nn", usm: bool | str = False,
                dali: DaliTuning | None = None) -> Loader:
    """An iterable of ``(lr, hr)`` batches from the database ``db`` (a path or an open one).

    ``augment``: the flips drawn per patch (``srdata.sampler``): ``"all"`` (or True), the
    eight symmetries of the square; ``"hflip"``, left-right flips only (Real-ESRGAN's
    x4plus); ``"none"`` (or False).
    ``workers``: CPU processes reading the database (torch: DataLoader workers; dali:
    external-source workers); default all cores but one. ``ids``:
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
    see ``srdata.degrade``). ``usm``: USM-sharpen the HR (Real-ESRGAN's ``gt_usm``): ``hr``
    is the sharpened HR, and ``lr`` is made from it; ``"lr"``: ``lr`` is made from the
    sharpened HR and ``hr`` is the plain one (Real-ESRGAN's GAN stage sharpens the target
    of its pixel and perceptual losses and shows the discriminator the plain HR).
    ``dali``: how the DALI loader runs (``srdata.loader_base.DaliTuning``: ROI decode, its
    CPU threads, the GPU decoders' knobs, how a batch is handed over); refused with torch.
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
    if usm not in (False, True, "lr"):
        raise ValueError(f"got usm={usm!r}, expected False, True or 'lr'")
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
    check_patch(patch_size, scale)
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
        if dali is not None:
            raise ValueError(f"got dali={dali} with loader='torch': it tunes DALI; drop it "
                             "or use loader='dali'")
        # Each implementation is imported when asked for: a torch run never pays for
        # DALI's import (~0.6 s)
        from .torch_loader import TorchLoader
        return TorchLoader(db, sampler, scale, device, dtype, channels_last, workers, lr=lr,
                           degradation=degradation, usm=usm, schedule=patch_schedule)
    from .dali_loader import DaliLoader
    return DaliLoader(db, sampler, scale, device, dtype, channels_last, workers, lr=lr,
                      degradation=degradation, usm=usm, schedule=patch_schedule,
                      tuning=dali or DaliTuning())
