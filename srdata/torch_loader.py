"""``loader="torch"``: a plain PyTorch DataLoader over the sampler's rows.

Each worker opens the database lazily (see ``srdata.reader``), decodes with OpenCV, and cuts
the HR patch the row describes into its batch's slot of a shared, pinned ring
(``srdata.batch_ring``), which the main process copies to the device as it is; the LR is
made on the device (picked, bicubic, or Real-ESRGAN's degradation, as Real-ESRGAN does in
its training step; with ``usm``, of the sharpened HR) (paired databases: the LR patch is
cut from the LR database in the worker too). It is the baseline DALI is measured against,
and a fallback that needs nothing beyond PyTorch. Workers are spawned, as DALI's are: a
script that builds a loader needs the usual ``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import math
import weakref

import cv2
import torch
from torch.utils.data import DataLoader, Dataset

from . import format as fmt
from ._proc import WorkerDied
from .batch_ring import BatchRing, Slots
from .handoff import Handoff
from .loader_base import Loader
from .sampler import ID, crop_and_flip, lr_row

class PatchDataset(Dataset):
    """Indexed by a whole batch, not an integer: ``(rows, patch, slot)``, the sampler's rows
    (which image and how to cut), the patch side and the ring slot to write the batch to.

    Each sample goes straight into the batch's slot of the shared ring
    (``srdata.batch_ring``); the worker hands back only ``(slot, n)``. The database
    reaches the workers through a file (``srdata.handoff``): in the start pipe its index
    made the workers start one after another."""

    def __init__(self, db, ring: BatchRing | None = None):
        self._db, self.ring = Handoff(db), ring

    def __getitem__(self, batch):
        rows, patch, slot = batch
        db = self._db.get()
        (hr,) = self.ring.arrays(slot, batch_shapes(len(rows), patch))
        for k, row in enumerate(rows):
            hr[k] = crop_and_flip(db.image(int(row[ID])), row, patch)
        return slot, len(rows)


class PairedPatchDataset(Dataset):
    """PatchDataset for paired databases: the same crop on each database's own grid, the
    HR then the LR patches in the slot."""

    def __init__(self, db, lr, scale: int, ring: BatchRing | None = None):
        self._dbs, self.scale, self.ring = Handoff((db, lr)), scale, ring  # see PatchDataset

    def __getitem__(self, batch):
        rows, patch, slot = batch
        db, lr = self._dbs.get()
        hr_out, lr_out = self.ring.arrays(slot, batch_shapes(len(rows), patch, self.scale))
        for k, row in enumerate(rows):
            i = int(row[ID])
            hr_out[k] = crop_and_flip(db.image(i), row, patch)
            lr_out[k] = crop_and_flip(lr.image(i), lr_row(row, self.scale), patch // self.scale)
        return slot, len(rows)


def batch_shapes(n: int, patch: int, paired_scale: int = 0) -> list[tuple]:
    """The NHWC uint8 arrays a batch of ``n`` fills in its slot: HR, then paired LR."""
    shapes = [(n, patch, patch, fmt.CHANNELS)]
    if paired_scale:
        side = patch // paired_scale
        shapes.append((n, side, side, fmt.CHANNELS))
    return shapes


class _RowBatches:
    """The DataLoader's sampler: one item per batch of the loader's current epoch, from its
    current batch, each with its patch side and ring slot."""

    def __init__(self, loader: "TorchLoader"):
        # A weak reference: a cycle loader -> DataLoader -> sampler -> loader would leave
        # the workers to the garbage collector, which finalises their queues first, and
        # every discarded loader would then wait 5 s for its workers to time out.
        self._loader = weakref.ref(loader)

    def __iter__(self):
        lo = self._loader()
        batches, patch = lo.sampler.batches(lo.epoch, lo.batch), lo.sampler.patch
        slots = lo._slots
        del lo  # this generator lives in the DataLoader's iterator: it must not hold the loader
        for k, rows in enumerate(batches):
            yield rows.tolist(), patch, slots.slot(k)

    def __len__(self):
        return len(self._loader().sampler)


PREFETCH = 4  # batches handed to each worker ahead of the one fetched


def _as_is(batch):
    return batch  # (slot, n): nothing to collate


def _worker_init(_):
    cv2.setNumThreads(1)  # one image per worker at a time; more threads only contend


class TorchLoader(Loader):
    def __init__(self, db, sampler, scale, device, dtype, channels_last, workers: int,
                 lr=None, degradation: str = "nn", usm: bool = False, schedule=None):
        super().__init__(db, sampler, scale, device, dtype, channels_last, lr, degradation,
                         usm, schedule)
        self.workers = workers
        self._slots = Slots(PREFETCH * workers)  # each worker is handed PREFETCH batches ahead
        self._dl = self._ring = None
        self._start()

    def _shapes(self, n: int, patch: int) -> list[tuple]:
        return batch_shapes(n, patch, self.scale if self.lr is not None else 0)

    def _slot_bytes(self) -> int:
        """Room for the largest batch of any stage this loader trains on."""
        sizes = [(self.sampler.patch, self.sampler.batch_size)]
        if self.schedule is not None:
            sizes += [self.schedule(epoch) for epoch, _ in self.schedule.stages]
        return max(sum(math.prod(s) for s in self._shapes(b, p)) for p, b in sizes)

    def _start(self) -> None:
        """The ring and the DataLoader whose workers fill it; again when a batch outgrows
        the ring (a patch or batch size set by hand with set_epoch)."""
        self._dl = None  # the old workers end before a new ring takes their memory
        self._ring = BatchRing(self._slots.count, self._slot_bytes(),
                               pin=self.device.type == "cuda")
        workers = self.workers
        dataset = (PatchDataset(self.db, self._ring) if self.lr is None
                   else PairedPatchDataset(self.db, self.lr, self.scale, self._ring))
        self._dl = DataLoader(
            dataset, batch_size=None, sampler=_RowBatches(self), collate_fn=_as_is,
            num_workers=workers, persistent_workers=workers > 0,
            prefetch_factor=PREFETCH if workers else None,
            worker_init_fn=_worker_init if workers else None,
            # Spawned, not forked: a forked worker inherits the parent's OpenCV thread pool
            # without its threads, and cv2.setNumThreads then waits on them forever (any
            # script that resized one large image before building the loader hung).
            multiprocessing_context="spawn" if workers else None)

    def _fetched(self, batches, patch: int) -> list[torch.Tensor]:
        """The next batch's arrays (NHWC uint8), on the device: a GPU's copy straight from
        the ring, a CPU's still in it (``_own``)."""
        self._slots.wait()  # this fetch hands a worker the slot of the batch before last
        slot, n = next(batches)
        views = self._ring.views(slot, self._shapes(n, patch))
        event = None
        if self.device.type == "cuda":
            views = [v.to(self.device, non_blocking=True) for v in views]
            event = torch.cuda.Event()
            event.record()
        self._slots.read(event)
        return views

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        """An output not in the ring: a worker writes its slot again two fetches later."""
        if t.untyped_storage().data_ptr() != self._ring.memory.untyped_storage().data_ptr():
            return t
        return t.clone(memory_format=torch.preserve_format)

    def _batches(self, epoch, start):
        self._slots.wait(0)  # a new iteration hands out slots from 0 again
        if self._ring.slot_bytes < self._slot_bytes():
            self._start()
        patch = self.sampler.patch
        try:
            batches = iter(self._dl)
            for b in range(start, len(self.sampler)):
                arrays = [t.permute(0, 3, 1, 2) for t in self._fetched(batches, patch)]
                if self.lr is not None:  # paired: the LR patch cut from the LR database
                    hr, lr = arrays
                    yield self._own(self._output(lr)), self._own(self._target(hr))
                    continue
                hr = arrays[0]
                sharp = self._sharpen(hr)  # with USM, the LR is made from the sharpened HR
                lr = self._degrade(hr if sharp is None else sharp, epoch, b)
                yield self._own(self._output(lr)), self._own(self._target(hr, sharp))
        except fmt.DBError as e:
            # A worker's error arrives with its traceback folded into the message; the
            # last line is ours and names the database and key.
            raise fmt.DBError(_last_line(str(e)) + f"; run `srdata verify {self.db.path}` "
                              "to list every bad record") from None
        except EOFError as e:
            if "in DataLoader worker process" in str(e):
                raise  # raised by a worker's own code, and re-raised here: not a death
            # A worker killed while it sent a batch leaves half a message in the pipe. If
            # it is not yet reaped, the DataLoader passes the EOFError on rather than
            # saying that a worker died.
            raise WorkerDied("a DataLoader worker exited unexpectedly: its batch broke off "
                             "mid-transfer") from None


def _last_line(message: str) -> str:
    line = message.strip().splitlines()[-1]
    prefix = fmt.DBError.__module__ + ".DBError: "
    return line[len(prefix):] if line.startswith(prefix) else line
