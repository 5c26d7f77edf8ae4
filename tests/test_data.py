"""Tests for ti_flax.data.batches: the batch types and the seeded batch iterator."""

import numpy as np
import pytest

from ti_flax.data import batches as data
from ti_flax.errors import UserError

def make_train_data(n=5, res=4, repeats=3, flip_p=0.5, seed=0, g=3, t=4):
    # Each image is a distinct horizontal ramp, so flips and identities are visible.
    ramp = np.arange(res, dtype=np.uint8)[None, :, None]
    images = np.stack([np.broadcast_to(ramp + 10 * i, (res, res, 3)) for i in range(n)])
    template_ids = np.arange(t * 2, dtype=np.int32).reshape(t, 2)
    return data.TrainData(images, template_ids, repeats, flip_p, seed, g)


def image_index(d, pixels):
    """Recovers which stored image (possibly flipped) each row of pixels is."""
    out = []
    for p in pixels:
        hits = [i for i, im in enumerate(d.images) if (p == im).all() or (p == im[:, ::-1]).all()]
        assert len(hits) == 1
        out.append(hits[0])
    return np.array(out)


def assert_batches_equal(a, b):
    a, b = ({k: v for k, v in (x if isinstance(x, dict) else x._asdict()).items() if v is not None} for x in (a, b))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# ---- the iterator -------------------------------------------------------------------------


def test_same_seed_same_batches_different_seed_different():
    a, b, c = make_train_data(seed=7), make_train_data(seed=7), make_train_data(seed=8)
    for s in range(12):
        assert_batches_equal(a.global_batch(s), b.global_batch(s))
    differs = [
        not np.array_equal(a.global_batch(s).pixel_values, c.global_batch(s).pixel_values)
        for s in range(12)
    ]
    assert any(differs)


def test_resume_equals_uninterrupted():
    d = make_train_data(seed=3)
    it = d.batches(0)
    uninterrupted = [next(it) for _ in range(17)]
    for s in (0, 4, 5, 11, 16):  # fresh objects: nothing but the step is carried over
        assert_batches_equal(make_train_data(seed=3).local_batch(s, 0, 1, 1), uninterrupted[s])
    resumed = make_train_data(seed=3).batches(9)
    for s in range(9, 17):
        assert_batches_equal(next(resumed), uninterrupted[s])


def test_global_batch_shapes_and_example_ids():
    d = make_train_data(g=3, res=4, t=4)
    b = d.global_batch(2)
    assert b.pixel_values.shape == (3, 4, 4, 3) and b.pixel_values.dtype == np.uint8
    assert b.input_ids.shape == (3, 2) and b.input_ids.dtype == np.int32
    np.testing.assert_array_equal(b.example_ids, [6, 7, 8])
    assert d.steps_per_epoch == (5 * 3) // 3


@pytest.mark.parametrize("procs,devs", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 2), (8, 1)])
def test_local_shares_concatenate_to_global(procs, devs):
    d = make_train_data(n=4, repeats=6, g=8)
    for s in (0, 3, 5):
        shares = [d.local_batch(s, p, procs, devs) for p in range(procs)]
        per_dev = 8 // (procs * devs)
        for share in shares:
            assert share.pixel_values.shape == (devs, per_dev, 4, 4, 3)
            assert share.pixel_values.dtype == np.uint8
            assert share.input_ids.shape == (devs, per_dev, 2)
            assert share.input_ids.dtype == np.int32
            assert share.example_ids.shape == (devs, per_dev)
        flat = [{k: v.reshape(-1, *v.shape[2:]) for k, v in x._asdict().items() if v is not None} for x in shares]
        whole = {k: np.concatenate([x[k] for x in flat]) for k in flat[0]}
        assert_batches_equal(whole, d.global_batch(s))


@pytest.mark.parametrize("procs,devs", [(1, 1), (1, 4), (2, 2)])
def test_each_example_carries_its_images_time_ids(procs, devs):
    # SDXL: every example's size and crop conditioning is that of the image it shows, in each
    # process's and device's share, for pixel and cached-latent batches alike.
    base = make_train_data(n=5, repeats=4, g=4)
    time_ids = np.arange(5 * 6, dtype=np.float32).reshape(5, 6) * 7 + 0.5
    d = data.TrainData(base.images, base.template_ids, 4, 0.5, 0, 4, time_ids=time_ids)
    mean = np.arange(5 * 2, dtype=np.float32).reshape(5, 2, 1, 1, 1)  # view [image, flip] holds 2 * image + flip
    latents = data.LatentViews(mean, -mean)
    for s in range(6):
        for p in range(procs):
            share = d.local_batch(s, p, procs, devs)
            assert share.time_ids.shape == (devs, 4 // (procs * devs), 6) and share.time_ids.dtype == np.float32
            shown = image_index(d, share.pixel_values.reshape(-1, 4, 4, 3))
            np.testing.assert_array_equal(share.time_ids.reshape(-1, 6), time_ids[shown])
            cached = d.local_batch(s, p, procs, devs, latents)
            shown = cached.latent_mean.reshape(-1).astype(int) // 2
            np.testing.assert_array_equal(cached.time_ids.reshape(-1, 6), time_ids[shown])
    assert base.global_batch(0).time_ids is None  # SD 1.x / 2.x batches carry none


def test_local_batch_rejects_indivisible_split():
    d = make_train_data(n=4, repeats=6, g=8)
    with pytest.raises(ValueError):
        d.local_batch(0, 0, 3, 1)
    with pytest.raises(ValueError):
        d.local_batch(0, 0, 2, 3)
    with pytest.raises(ValueError):
        d.local_batch(0, 2, 2, 1)


def test_every_slot_visited_once_per_epoch():
    d = make_train_data(n=5, repeats=3, g=5)  # 15 slots, 3 steps, nothing dropped
    for epoch in range(3):
        steps = range(epoch * d.steps_per_epoch, (epoch + 1) * d.steps_per_epoch)
        idx = np.concatenate([image_index(d, d.global_batch(s).pixel_values) for s in steps])
        np.testing.assert_array_equal(np.bincount(idx, minlength=5), [3] * 5)


def test_epochs_are_reshuffled():
    d = make_train_data(n=5, repeats=3, g=5)
    orders = [tuple(d.epoch_plan(e)[0]) for e in range(4)]
    assert len(set(orders)) > 1


def test_templates_are_drawn_from_all():
    d = make_train_data(n=5, repeats=20, g=5, t=4)
    ids = np.concatenate([d.global_batch(s).input_ids[:, 0] for s in range(20)])
    assert set(ids.tolist()) == {0, 2, 4, 6}


@pytest.mark.parametrize("flip_p,flipped", [(0.0, False), (1.0, True)])
def test_flip_probability_extremes(flip_p, flipped):
    d = make_train_data(flip_p=flip_p)
    for s in range(10):
        b = d.global_batch(s)
        image_idx, _, _ = d.epoch_plan(s // d.steps_per_epoch)
        pos = (s % d.steps_per_epoch) * d.global_batch_size
        for row, i in zip(b.pixel_values, image_idx[pos : pos + d.global_batch_size]):
            expected = d.images[i][:, ::-1] if flipped else d.images[i]
            np.testing.assert_array_equal(row, expected)


def test_flip_half_the_time():
    d = make_train_data(n=5, repeats=200, flip_p=0.5)
    _, flips, _ = d.epoch_plan(0)
    assert 0.4 < flips.mean() < 0.6


def test_batch_larger_than_epoch_is_user_error():
    with pytest.raises(UserError, match="larger than images x repeats"):
        make_train_data(n=2, repeats=1, g=3)


def test_stored_images_are_not_mutated_by_flips():
    d = make_train_data(flip_p=1.0)
    before = d.images.copy()
    for s in range(6):
        d.global_batch(s)
    np.testing.assert_array_equal(d.images, before)
