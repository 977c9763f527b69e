"""Batch buffers in shared memory that the torch loader's workers fill in place.

A DataLoader worker used to stack its samples into a new shared-memory tensor and send its
file descriptor; the main process then mapped it (a page fault per 4 KiB page) and, on a
GPU, copied it once more into pinned memory (the DataLoader's pin thread) before the copy
to the device: about 0.05 ms an image of serial work in the main process, a ceiling near
20,000 img/s for ``raw`` records on the H100 box, however many workers read.

Here the main process allocates every batch buffer once, pins it in place on a GPU
(``cudaHostRegister``), and hands it to the workers when they start. A worker writes each
sample of a batch straight into the batch's slot and sends back only its number; the main
process copies the slot to the device once, with no host copy in between.

A slot is written again only after the device has read it: the loader gives the ring
``in_flight + 2`` slots, where ``in_flight`` is how many batches the DataLoader hands to
workers ahead of the one being fetched, and waits for the copy of the batch before last
before it fetches the next (``Slots``).
"""
from __future__ import annotations

import math
import os
import warnings
import weakref
from collections import deque

import numpy as np
import torch

from ._proc import shm_space


class BatchRing:
    """``slots`` buffers of ``slot_bytes`` bytes in shared memory; picklable (a worker's copy
    maps the same memory)."""

    def __init__(self, slots: int, slot_bytes: int, pin: bool = False):
        self.slots, self.slot_bytes = slots, slot_bytes
        check_room(slots * slot_bytes)
        self.memory = torch.empty((slots, slot_bytes), dtype=torch.uint8).share_memory_()
        self.pinned = pin and _pin(self.memory)
        if self.pinned:  # unregistered before the memory goes: the finalizer holds it
            weakref.finalize(self, _unpin, self.memory)

    def __reduce__(self):
        return _attached, (self.memory, self.slots, self.slot_bytes)

    def views(self, slot: int, shapes) -> list[torch.Tensor]:
        """Slot ``slot`` as one uint8 tensor per shape, laid one after another."""
        out, at = [], 0
        for shape in shapes:
            size = math.prod(shape)
            if at + size > self.slot_bytes:
                raise ValueError(f"got shapes {list(shapes)}, {at + size} bytes; a slot "
                                 f"holds {self.slot_bytes}")
            out.append(self.memory[slot, at:at + size].view(shape))
            at += size
        return out

    def arrays(self, slot: int, shapes) -> list[np.ndarray]:
        """``views`` as numpy arrays, for a worker to write into."""
        return [v.numpy() for v in self.views(slot, shapes)]


def _attached(memory: torch.Tensor, slots: int, slot_bytes: int) -> BatchRing:
    ring = BatchRing.__new__(BatchRing)
    ring.memory, ring.slots, ring.slot_bytes, ring.pinned = memory, slots, slot_bytes, False
    return ring


def check_room(nbytes: int) -> None:
    """Refuse a ring that /dev/shm cannot hold, at once and in one line: shared memory is
    only taken as it is written, and a worker that writes past a full /dev/shm dies of
    SIGBUS mid-epoch."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return  # no /dev/shm (not Linux): torch shares memory another way
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        mib = nbytes / 2**20
        need = f"{mib:.{0 if mib >= 10 else 1}f}"  # as shm_space() writes sizes
        raise OSError(f"the torch loader's batch buffers need {need} MiB of shared memory "
                      f"and {shm_space()}; lower --workers or the batch size, "
                      "or give the machine more (docker run --shm-size=8g)")


def _pin(memory: torch.Tensor) -> bool:
    """Page-lock the ring for asynchronous copies to the GPU; False (and a warning) where
    CUDA refuses, and copies are then synchronous."""
    err = int(torch.cuda.cudart().cudaHostRegister(memory.data_ptr(), memory.numel(),
                                                   1))  # 1: cudaHostRegisterPortable
    if err:
        warnings.warn(f"could not pin the torch loader's batch buffers (CUDA error {err}); "
                      "copies to the GPU will wait for the host", stacklevel=3)
    return not err


def _unpin(memory: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(memory.data_ptr())


class Slots:
    """Which slot each batch of an iteration goes to, and when a slot may be written again.

    ``slot(k)`` of the ``k``-th batch handed to a worker in this iteration; ``read(event)``
    after the device copy of each fetched batch is queued (an event recorded after it, or
    None when the copy is done); ``wait()`` before each fetch. With ``in_flight + 2`` slots,
    the batch a fetch hands out to a worker takes the slot of the batch fetched two before:
    ``wait`` makes sure the device has read it."""

    def __init__(self, in_flight: int):
        self.count = in_flight + 2
        self._reads = deque()

    def slot(self, k: int) -> int:
        return k % self.count

    def read(self, event) -> None:
        self._reads.append(event)

    def wait(self, keep: int = 1) -> None:
        """Wait for all but the last ``keep`` copies (0: all, as before a new iteration)."""
        while len(self._reads) > keep:
            event = self._reads.popleft()
            if event is not None:
                event.synchronize()
