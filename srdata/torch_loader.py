"""``loader="torch"``: a plain PyTorch DataLoader over the sampler's rows.

Each worker opens the database lazily (see ``srdata.reader``), decodes with OpenCV, and cuts
the HR patch the row describes; batches travel as uint8 NHWC in pinned memory and the LR is
made on the device (picked, bicubic, or Real-ESRGAN's degradation, as Real-ESRGAN does in
its training step; with ``usm``, of the sharpened HR) (paired databases: the LR patch is
cut from the LR database in the worker too). It is the baseline DALI is measured against,
and a fallback that needs nothing beyond PyTorch. Workers are spawned, as DALI's are: a
script that builds a loader needs the usual ``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import weakref

import cv2
from torch.utils.data import DataLoader, Dataset

from . import format as fmt
from ._proc import WorkerDied
from .handoff import Handoff
from .loader_base import Loader
from .sampler import ID, crop_and_flip, lr_row

PATCH = 6  # the column _RowBatches appends to a sampler row


class PatchDataset(Dataset):
    """Indexed by a sampler row, not an integer: the row says which image and how to cut.

    The batch sampler appends the patch side to each row (``row[PATCH]``): the persistent
    workers hold copies of this dataset, and a patch schedule changes the side per epoch.
    The database reaches them through a file (``srdata.handoff``): in the start pipe its
    index made the workers start one after another."""

    def __init__(self, db):
        self._db = Handoff(db)

    def __getitem__(self, row):
        return crop_and_flip(self._db.get().image(int(row[ID])), row, row[PATCH])


class PairedPatchDataset(Dataset):
    """A row -> (LR patch, HR patch): the same crop, on each database's own grid."""

    def __init__(self, db, lr, scale: int):
        self._dbs, self.scale = Handoff((db, lr)), scale  # see PatchDataset

    def __getitem__(self, row):
        (db, lr), i, patch = self._dbs.get(), int(row[ID]), row[PATCH]
        hr = crop_and_flip(db.image(i), row, patch)
        lr = crop_and_flip(lr.image(i), lr_row(row, self.scale), patch // self.scale)
        return lr, hr


class _RowBatches:
    """The DataLoader's batch sampler: the loader's current epoch, from its current batch."""

    def __init__(self, loader: "TorchLoader"):
        # A weak reference: a cycle loader -> DataLoader -> sampler -> loader would leave
        # the workers to the garbage collector, which finalises their queues first, and
        # every discarded loader would then wait 5 s for its workers to time out.
        self._loader = weakref.ref(loader)

    def __iter__(self):
        lo = self._loader()
        batches, patch = lo.sampler.batches(lo.epoch, lo.batch), lo.sampler.patch
        del lo  # this generator lives in the DataLoader's iterator: it must not hold the loader
        for rows in batches:
            yield [(*r, patch) for r in rows.tolist()]

    def __len__(self):
        return len(self._loader().sampler)


def _worker_init(_):
    cv2.setNumThreads(1)  # one image per worker at a time; more threads only contend


class TorchLoader(Loader):
    def __init__(self, db, sampler, scale, device, dtype, channels_last, workers: int,
                 lr=None, degradation: str = "nn", usm: bool = False, schedule=None):
        super().__init__(db, sampler, scale, device, dtype, channels_last, lr, degradation,
                         usm, schedule)
        self.workers = workers
        dataset = PatchDataset(db) if lr is None else PairedPatchDataset(db, lr, scale)
        self._dl = DataLoader(
            dataset, batch_sampler=_RowBatches(self),
            num_workers=workers, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
            worker_init_fn=_worker_init if workers else None,
            # Spawned, not forked: a forked worker inherits the parent's OpenCV thread pool
            # without its threads, and cv2.setNumThreads then waits on them forever (any
            # script that resized one large image before building the loader hung).
            multiprocessing_context="spawn" if workers else None)

    def _batches(self, epoch, start):
        try:
            for b, hr in enumerate(self._dl, start):
                if self.lr is not None:  # paired: (lr, hr) from the two databases
                    lr, hr = (t.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
                              for t in hr)
                    yield self._output(lr), self._target(hr)
                    continue
                hr = hr.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
                sharp = self._sharpen(hr)  # with USM, the LR is made from the sharpened HR
                lr = self._degrade(hr if sharp is None else sharp, epoch, b)
                yield self._output(lr), self._target(hr, sharp)
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
