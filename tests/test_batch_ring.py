import multiprocessing.reduction
import os

import numpy as np
import pytest
import torch

import srdata
from srdata import PackedDB
from srdata.batch_ring import BatchRing, Slots, check_room
from srdata.sampler import ID, crop_and_flip
from srdata.torch_loader import PatchDataset


class Event:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def synchronize(self):
        self.log.append(self.name)


def test_a_slot_is_handed_out_again_only_after_its_copy_was_waited_for():
    slots, log = Slots(in_flight=3), []
    assert slots.count == 5 and [slots.slot(k) for k in range(7)] == [0, 1, 2, 3, 4, 0, 1]
    for k in range(4):  # fetch k: wait, then the batch's copy is queued
        slots.wait()
        slots.read(Event(k, log))
    # before fetch 4 (which hands out batch 7, slot 2 = batch 2's), batch 2's copy is done
    slots.wait()
    assert log == [0, 1, 2]
    slots.read(None)  # a CPU batch: nothing to wait for
    slots.wait(0)  # a new iteration: every copy
    assert log == [0, 1, 2, 3]


def test_ring_views_lay_shapes_one_after_another():
    ring = BatchRing(3, 100)
    a, b = ring.views(1, [(2, 3, 4), (10,)])
    a.fill_(7)
    b.fill_(9)
    assert ring.memory[1, :24].eq(7).all() and ring.memory[1, 24:34].eq(9).all()
    assert ring.arrays(1, [(24,)])[0].tolist() == [7] * 24
    with pytest.raises(ValueError, match="101 bytes; a slot holds 100"):
        ring.views(0, [(101,)])


def test_a_ring_travels_to_a_worker_as_a_handle_not_its_bytes(packed):
    ring = BatchRing(8, 1 << 20)  # 8 MiB
    payload = bytes(multiprocessing.reduction.ForkingPickler.dumps(
        PatchDataset(PackedDB(packed("raw")), ring)))
    assert len(payload) < 2000


def test_a_ring_larger_than_dev_shm_is_refused_in_one_line(monkeypatch):
    real = os.statvfs("/dev/shm")

    class Small:
        f_frsize, f_bsize, f_blocks, f_bavail = 4096, 4096, 4096, 256  # 1 of 16 MiB free
    monkeypatch.setattr(os, "statvfs", lambda p: Small if p == "/dev/shm" else real)
    with pytest.raises(OSError) as e:
        check_room(64 << 20)
    message = str(e.value)
    assert "\n" not in message
    assert "need 64 MiB of shared memory and /dev/shm has 1 of 16 MiB free" in message
    assert "lower --workers or the batch size" in message


def _reference(db, sampler, epoch):
    return [np.stack([crop_and_flip(db.image(int(r[ID])), r, sampler.patch) for r in rows])
            for rows in sampler.batches(epoch)]


@pytest.mark.parametrize("workers", [0, 2])
def test_kept_batches_are_not_overwritten_by_the_workers(packed, workers):
    """uint8 channels_last HR is the ring's own layout: an output that viewed the ring would
    change under the caller as the workers reuse its slot."""
    path = packed("raw")
    lo = srdata.make_loader(path, "torch", batch_size=2, patch_size=32, scale=4, seed=3,
                            dtype=torch.uint8, channels_last=True, workers=workers,
                            device="cpu", drop_last=False)
    assert len(lo) == 5 and lo._slots.count == 4 * workers + 2
    db = PackedDB(path)
    for epoch in range(2):
        kept = list(lo)  # every batch held at once, as a caller may
        want = _reference(db, lo.sampler, epoch)
        assert len(kept) == len(want)
        for (lr, hr), ref in zip(kept, want):
            assert hr.is_contiguous(memory_format=torch.channels_last)
            np.testing.assert_array_equal(hr.permute(0, 2, 3, 1).numpy(), ref)
            np.testing.assert_array_equal(lr.permute(0, 2, 3, 1).numpy(), ref[:, 2::4, 2::4])


def test_a_larger_batch_set_by_hand_gets_a_larger_ring(packed):
    path = packed("raw")
    lo = srdata.make_loader(path, "torch", batch_size=2, patch_size=32, scale=4, seed=3,
                            dtype=torch.uint8, workers=1, device="cpu")
    small = lo._ring.slot_bytes
    assert small == 2 * 32 * 32 * 3
    next(iter(lo))
    lo.set_epoch(1, patch_size=48, batch_size=4)
    got = list(lo)
    assert lo._ring.slot_bytes == 4 * 48 * 48 * 3
    want = _reference(PackedDB(path), lo.sampler, 1)
    for (_, hr), ref in zip(got, want, strict=True):
        np.testing.assert_array_equal(hr.permute(0, 2, 3, 1).numpy(), ref)


def test_a_patch_schedule_sizes_the_ring_for_its_largest_stage(packed):
    from srdata.schedule import PatchSchedule
    schedule = PatchSchedule.parse("32:0,48:2", batch_size=2, batch="pixels")
    lo = srdata.make_loader(packed("raw"), "torch", batch_size=2, patch_size=48, scale=4,
                            workers=0, device="cpu", patch_schedule=schedule)
    sizes = [lo.schedule(e) for e in (0, 2)]
    assert sizes == [(32, 4), (48, 2)] and lo.sampler.patch == 32
    assert lo._ring.slot_bytes == 2 * 48 * 48 * 3  # the later stage's, larger than the first
