import numpy as np
import pytest
import torch

from srdata.sampler import (HFLIP, ID, TRANSPOSE, VFLIP, X, Y, Sampler, crop_and_flip,
                            nn_downscale)

H = np.array([100, 120, 64, 80, 90, 200, 70, 66, 150, 99])
W = np.array([130, 64, 64, 100, 90, 100, 70, 300, 150, 101])


def sampler(**kw):
    return Sampler(H, W, **({"batch_size": 2, "patch": 64, "seed": 1} | kw))


def test_same_seed_same_plan_other_epoch_or_seed_differs():
    a = sampler().plan(0)
    assert np.array_equal(a, sampler().plan(0))
    assert not np.array_equal(a, sampler().plan(1))
    assert not np.array_equal(a, sampler(seed=2).plan(0))


def test_epoch_is_a_permutation_and_crops_fit():
    rows = sampler(drop_last=False).plan(3)
    assert sorted(rows[:, ID]) == list(range(len(H)))
    ids = rows[:, ID]
    assert (rows[:, Y] >= 0).all() and (rows[:, Y] + 64 <= H[ids]).all()
    assert (rows[:, X] >= 0).all() and (rows[:, X] + 64 <= W[ids]).all()
    assert set(np.unique(rows[:, HFLIP:])) == {0, 1}


def test_crops_cover_the_whole_range():
    # one 65 px image: both crop offsets, 0 and 1, must come up
    s = Sampler([65], [65], batch_size=1, patch=64)
    seen = {(int(r[Y]), int(r[X])) for e in range(40) for r in s.plan(e)}
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_no_augment_means_no_flips():
    assert (sampler(augment=False).plan(0)[:, HFLIP:] == 0).all()
    assert np.array_equal(sampler(augment="none").plan(0), sampler(augment=False).plan(0))


def test_hflip_draws_left_right_flips_only_and_the_same_crops():
    s = Sampler(np.full(400, 90), np.full(400, 90), batch_size=4, patch=64, seed=1,
                augment="hflip")
    rows, every = s.plan(0), Sampler(np.full(400, 90), np.full(400, 90), 4, 64, seed=1).plan(0)
    assert (rows[:, VFLIP] == 0).all() and (rows[:, TRANSPOSE] == 0).all()  # never rotated
    assert 0.4 < rows[:, HFLIP].mean() < 0.6
    assert np.array_equal(rows[:, HFLIP], every[:, HFLIP])  # the same draws, fewer kinds
    assert np.array_equal(rows[:, :HFLIP], every[:, :HFLIP])  # and the same crops
    assert s.resized(32, 2).augment == "hflip"
    assert sampler(augment=True).augment == "all" and sampler(augment=np.False_).augment == "none"
    with pytest.raises(ValueError, match="got augment='rot', expected one of all, hflip, none"):
        sampler(augment="rot")


def test_sample_ratio_draws_a_fresh_subset_each_epoch():
    s = sampler(sample_ratio=0.5, batch_size=1)
    assert s.draw == 5 and len(s) == 5
    a, b = s.plan(0)[:, ID], s.plan(1)[:, ID]
    assert len(set(a)) == 5 and set(a) != set(b)


def test_ranks_get_disjoint_equal_slices_of_the_same_rows():
    whole = sampler(batch_size=1).plan(2)
    parts = [sampler(batch_size=2, rank=r, world_size=3) for r in range(3)]
    plans = [p.plan(2) for p in parts]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == 1  # 10 // 3 // 2 * 2 = 2
    ids = np.concatenate([p[:, ID] for p in plans])
    assert len(set(ids)) == len(ids) == 6
    for r, p in enumerate(plans):  # a row's crop does not depend on the number of ranks
        assert np.array_equal(p, whole[r::3][:2])


def test_drop_last_false_wraps_so_every_rank_runs_the_same_batches():
    parts = [sampler(batch_size=4, rank=r, world_size=3, drop_last=False) for r in range(3)]
    assert [len(p) for p in parts] == [1, 1, 1]
    assert [p.per_rank for p in parts] == [4, 4, 4]
    ids = np.concatenate([p.plan(0)[:, ID] for p in parts])
    assert set(ids) == set(range(10))  # all drawn samples are seen; two are seen twice
    last = list(sampler(batch_size=4, drop_last=False).batches(0))[-1]
    assert len(last) == 2


def test_drop_last_true_keeps_whole_batches():
    s = sampler(batch_size=4)
    assert len(s) == 2 and all(len(b) == 4 for b in s.batches(0))


def test_batches_resume_from_a_batch():
    s = sampler()
    full = list(s.batches(1))
    assert all(np.array_equal(a, b) for a, b in zip(full[2:], s.batches(1, start=2)))


@pytest.mark.parametrize("kw, match", [
    ({"batch_size": 0}, "batch_size"),
    ({"sample_ratio": 0}, "sample_ratio"),
    ({"sample_ratio": 1.5}, "sample_ratio"),
    ({"rank": 2, "world_size": 2}, "rank"),
    ({"patch": 65}, "patch 65 is larger than image 1 .*--min-size 65"),
    ({"batch_size": 6, "world_size": 2}, "fewer than batch_size"),
])
def test_bad_arguments_say_what_to_change(kw, match):
    with pytest.raises(ValueError, match=match):
        sampler(**kw)


def test_crop_and_flip_order_is_hflip_vflip_transpose():
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    row = np.array([0, 1, 2, 1, 1, 1])
    expect = img[1:3, 2:4][:, ::-1][::-1].transpose(1, 0, 2)
    got = crop_and_flip(img, row, 2)
    assert got.flags.c_contiguous and np.array_equal(got, expect)


@pytest.mark.parametrize("flips", [(h, v, t) for h in (0, 1) for v in (0, 1) for t in (0, 1)])
def test_crop_and_flip_is_numpys_flips_of_the_crop(flips):
    """OpenCV does the flips for speed: the patch is exactly numpy's, for every combination,
    an odd patch and a crop at the image's edge."""
    img = np.random.default_rng(1).integers(0, 256, (23, 19, 3), dtype=np.uint8)
    for (y, x), patch in (((2, 3), 7), ((16, 12), 7), ((0, 0), 19)):
        ref = img[y:y + patch, x:x + patch]
        ref = ref[:, ::-1] if flips[0] else ref
        ref = ref[::-1] if flips[1] else ref
        ref = ref.transpose(1, 0, 2) if flips[2] else ref
        got = crop_and_flip(img, np.array([0, y, x, *flips]), patch)
        assert got.flags.c_contiguous and got.shape == (patch, patch, 3)
        assert np.array_equal(got, ref)


@pytest.mark.parametrize("s", [2, 3, 4])
def test_nn_downscale_picks_the_centre_pixel(s):
    hr = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    lr = nn_downscale(hr, s)
    assert lr.shape == (12 // s, 12 // s, 3)
    assert lr[1, 2, 0] == hr[1 * s + s // 2, 2 * s + s // 2, 0]
    t = torch.from_numpy(hr).permute(2, 0, 1)[None]
    assert np.array_equal(nn_downscale(t, s)[0].permute(1, 2, 0).numpy(), lr)


def test_ids_restrict_the_draw_to_a_subset():
    s = sampler(ids=[0, 3, 4, 8], batch_size=1, drop_last=False)
    assert len(s) == 4 and sorted(s.plan(0)[:, ID]) == [0, 3, 4, 8]
    assert Sampler([10, 100], [10, 100], batch_size=1, patch=64, ids=[1]).draw == 1
    with pytest.raises(ValueError, match="ids up to 10"):
        sampler(ids=[10])
    # a cast would read a mask's True/False as images 1 and 0, and 2.7 as image 2
    with pytest.raises(ValueError, match="dtype bool .a boolean mask: pass np.flatnonzero"):
        sampler(ids=np.arange(10) < 8)
    with pytest.raises(ValueError, match="got ids of dtype float64, expected integer"):
        sampler(ids=[0.9, 2.7])
    assert list(sampler(ids=np.array([2, 5], np.uint32), drop_last=False).ids) == [2, 5]
