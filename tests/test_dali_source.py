"""srdata.dali_source: what the DALI loader's source hands over per batch, called directly
(the loader parity tests check the pipeline that consumes it)."""
import numpy as np
import pytest

from srdata.dali_source import PairedSource, PatchSource
from srdata.reader import open_db
from srdata.sampler import HFLIP, ID, TRANSPOSE, X, Y, Sampler, crop_and_flip

types = pytest.importorskip("nvidia.dali.types", reason="BatchInfo is DALI's")


def sampler_of(db, batch=4, patch=64, drop_last=False):
    return Sampler(db.heights, db.widths, batch, patch, seed=3, drop_last=drop_last)


def runs(source, n):
    """The source's first ``n`` runs: its one DALI epoch goes on through the sampler's."""
    return [source(types.BatchInfo(it, 0)) for it in range(n)]


def test_raw_batches_are_one_array_of_cut_patches_the_last_one_padded(packed):
    db = open_db(packed("raw"))
    s = sampler_of(db)  # 10 images, batches of 4: 4, 4, 2 rows padded to 4
    got = runs(PatchSource(db, s, 0, 0, len(s) * 4), 4)
    rows = np.concatenate([s.plan(0)[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9]], s.plan(1)[:4]])
    assert [len(b) for b in got] == [1, 1, 1, 1]  # one output: the patches, no inputs
    assert all(b[0].shape == (4, 64, 64, 3) and b[0].dtype == np.uint8 for b in got)
    want = np.stack([crop_and_flip(db.image(int(r[ID])), r, 64) for r in rows])
    np.testing.assert_array_equal(np.concatenate([b[0] for b in got]), want)


def test_encoded_batches_are_padded_records_where_to_cut_and_flags(packed):
    db = open_db(packed("jpeg"))
    s = sampler_of(db)
    records, where, flags = PatchSource(db, s, 0, 0, len(s) * 4)(types.BatchInfo(2, 0))
    rows = s.plan(0)[[8, 9, 9, 9]]
    want = [db.read(int(r[ID])) for r in rows]
    assert records.shape == (4, max(map(len, want))) and records.dtype == np.uint8
    assert where.dtype == flags.dtype == np.int32
    np.testing.assert_array_equal(where[:, 0], [len(v) for v in want])
    assert [bytes(r[:n]) for r, n in zip(records, where[:, 0])] == want
    assert not any(r[n:].any() for r, n in zip(records, where[:, 0]))  # zeros after
    np.testing.assert_array_equal(where[:, 1:], rows[:, [Y, X]])
    np.testing.assert_array_equal(flags, rows[:, HFLIP:TRANSPOSE + 1])


def test_records_of_very_different_lengths_go_unpadded(tmp_path):
    """One large record among small ones would pad the whole batch to its length."""
    import cv2

    from srdata.dali_source import _records
    from srdata.pack import PackConfig, pack
    (tmp_path / "im").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "im" / "big.png"), noise)  # ~480 KB: noise does not compress
    cv2.imwrite(str(tmp_path / "im" / "small.png"), np.zeros((64, 64, 3), np.uint8))
    pack(tmp_path / "im", tmp_path / "db", PackConfig(fit="none", codec="png", min_size=16,
                                                      workers=1), progress=False)
    db = open_db(tmp_path / "db")
    big, small = (0, 1) if db.widths[0] == 400 else (1, 0)
    rows = np.zeros((3, 6), np.int64)
    records, where = _records(db, [big, small, small], rows)
    assert isinstance(records, list)
    assert [bytes(r) for r in records] == [db.read(big), db.read(small), db.read(small)]
    np.testing.assert_array_equal(where[:, 0], [len(bytes(r)) for r in records])
    padded, where = _records(db, [small, small], rows[:2])
    assert padded.shape == (2, len(db.read(small)))


def test_skipped_rows_apply_to_the_first_epoch_only(packed):
    """A resumed run's source starts after the batches it saw, and goes on into the next
    epochs from their first rows."""
    db = open_db(packed("jpeg"))
    s = sampler_of(db, drop_last=True)  # 2 batches of 4
    got = runs(PatchSource(db, s, 5, 4, len(s) * 4), 4)
    want = [s.plan(5)[4:8], s.plan(6)[0:4], s.plan(6)[4:8], s.plan(7)[0:4]]
    for (_, where, _), rows in zip(got, want):
        np.testing.assert_array_equal(where[:, 1:], rows[:, [Y, X]])


def test_runs_of_several_batches_end_with_the_epoch(packed):
    """per_run=2 over 3 batches an epoch: 8 rows, then the epoch's last 4 (its last batch
    padded), then the next epoch's first 8; resumed after one batch, 8 rows to its end."""
    db = open_db(packed("jpeg"))
    s = sampler_of(db)  # 10 images: rows 0-9 and two padding rows
    pad = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9]
    cases = (((0, 0), [s.plan(0)[pad[:8]], s.plan(0)[pad[8:]], s.plan(1)[pad[:8]]]),
             ((3, 4), [s.plan(3)[pad[4:]], s.plan(4)[pad[:8]], s.plan(4)[pad[8:]]]))
    for (first, skip), want in cases:
        got = runs(PatchSource(db, s, first, skip, len(s) * 4, per_run=2), 3)
        for (_, where, flags), rows in zip(got, want):
            np.testing.assert_array_equal(where[:, 1:], rows[:, [Y, X]])
            np.testing.assert_array_equal(flags, rows[:, HFLIP:TRANSPOSE + 1])


def test_realesrgan_inputs_are_one_array_each_the_rows_own(packed):
    from srdata.dali_degrade import INPUTS, dali_inputs
    from srdata.sampler import RowParams
    db = open_db(packed("raw"))
    s = sampler_of(db)
    out = PatchSource(db, s, 0, 0, len(s) * 4, realesrgan_scale=4)(types.BatchInfo(2, 0))
    assert len(out) == 1 + len(INPUTS)
    each = [dali_inputs(RowParams(s, 0).rows(j, j + 1), 64, 64, 4) for j in (8, 9, 9, 9)]
    for got, name in zip(out[1:], INPUTS):
        assert got.dtype == INPUTS[name] and len(got) == 4, name
        np.testing.assert_array_equal(got, np.concatenate([e[name] for e in each]), name)


def test_paired_batches_cut_both_sides_at_the_same_place(packed):
    """A raw LR database of the HR one at 1x (the same records, scale 1): both sides' cuts
    are the same pixels."""
    from srdata.paired import LRSource
    db = open_db(packed("raw"))
    s = Sampler(db.heights, db.widths, 4, 64, seed=3, drop_last=False, align=1)
    lr = LRSource(db, np.arange(len(db.heights)))
    hr, low, flags = PairedSource(db, lr, s, 1, 0, 0, len(s) * 4)(types.BatchInfo(1, 0))
    rows = s.plan(0)[4:8]
    np.testing.assert_array_equal(hr, low)
    np.testing.assert_array_equal(hr[0], crop_and_flip(db.image(int(rows[0, ID])), rows[0], 64))
    np.testing.assert_array_equal(flags, rows[:, HFLIP:TRANSPOSE + 1])
