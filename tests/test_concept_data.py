"""Tests for ti_flax.data.concept_mix: global batches drawn over several concepts, by weight."""

import numpy as np
import pytest

from ti_flax.data import concept_mix as concept_data, batches as data
from ti_flax.errors import UserError


def concept_part(first_value, n, repeats=2, first_template=0, t=3, flip_p=0.5):
    """A concept whose image i is filled with first_value + i and whose template ids are
    first_template, first_template + 1, ...: batches show which concept and image each row is."""
    images = np.stack([np.full((2, 2, 3), first_value + i, np.uint8) for i in range(n)])
    templates = np.arange(first_template, first_template + t * 2, dtype=np.int32).reshape(t, 2)
    return data.TrainData(images, templates, repeats, flip_p, seed=0, global_batch_size=1)


def mix(sizes=(3, 30), weights=(1.0, 1.0), seed=0, g=4, repeats=2):
    parts = [concept_part(100 * c, n, repeats, first_template=100 * c) for c, n in enumerate(sizes)]
    return concept_data.ConceptMix(parts, weights, [f"<c{c}>" for c in range(len(sizes))], seed, g)


@pytest.mark.parametrize("total, weights, want", [
    (10, [1, 1], [5, 5]),
    (11, [1, 1], [6, 5]),  # a tie goes to the earlier concept
    (12, [1, 2, 3], [2, 4, 6]),
    (7, [1, 1, 1], [3, 2, 2]),
    (100, [0.5, 0.25, 0.25], [50, 25, 25]),
])
def test_apportion_is_exact(total, weights, want):
    got = concept_data.apportion(total, weights)
    assert got.tolist() == want and got.sum() == total


def test_each_row_is_its_concepts_image_and_prompt():
    m = mix()
    for step in range(20):
        batch = m.global_batch(step)
        for pixels, ids, concept in zip(batch.pixel_values, batch.input_ids, batch.concept_ids):
            value = int(pixels[0, 0, 0])
            assert value // 100 == concept  # the image belongs to the example's concept
            assert ids[0] // 100 == concept  # and so does its template
            assert value % 100 < (3, 30)[concept]


def test_equal_weights_show_a_small_concept_as_often_as_a_large_one():
    m = mix(sizes=(3, 30), weights=(1, 1))
    concepts = np.concatenate([m.global_batch(s).concept_ids for s in range(m.steps_per_epoch * 3)])
    counts = np.bincount(concepts, minlength=2)
    assert counts[0] == counts[1]  # exactly, every epoch
    # Within the small concept, each of its 3 images is shown about equally often.
    small = np.concatenate([m.global_batch(s).pixel_values[m.global_batch(s).concept_ids == 0][:, 0, 0, 0]
                            for s in range(m.steps_per_epoch)])
    per_image = np.bincount(small, minlength=3)
    assert per_image.max() - per_image.min() <= 1


def test_weights_hold_over_many_steps():
    m = mix(sizes=(4, 5, 6), weights=(1, 2, 5), g=8, repeats=3)
    steps = 200
    concepts = np.concatenate([m.global_batch(s).concept_ids for s in range(steps)])
    share = np.bincount(concepts, minlength=3) / len(concepts)
    np.testing.assert_allclose(share, [1 / 8, 2 / 8, 5 / 8], atol=0.01)


def test_a_step_is_a_function_of_seed_and_step_only():
    a = mix(seed=3)
    uninterrupted = [a.global_batch(s) for s in range(25)]
    for s in (0, 7, 16, 24):  # a fresh object: nothing but the step is carried over
        got, want = mix(seed=3).global_batch(s), uninterrupted[s]
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)
    other = mix(seed=4)
    assert any(not np.array_equal(other.global_batch(s).pixel_values, uninterrupted[s].pixel_values)
               for s in range(25))


@pytest.mark.parametrize("procs, devs", [(1, 1), (1, 4), (2, 2)])
def test_local_shares_concatenate_to_global(procs, devs):
    m = mix(g=8)
    for s in (0, 3, 11):
        shares = [m.local_batch(s, p, procs, devs) for p in range(procs)]
        assert shares[0].concept_ids.shape == (devs, 8 // (procs * devs))
        for field in m.global_batch(s)._fields:
            if getattr(shares[0], field) is None:  # time_ids: SDXL only
                continue
            whole = np.concatenate([getattr(x, field).reshape(-1, *getattr(x, field).shape[2:]) for x in shares])
            np.testing.assert_array_equal(whole, getattr(m.global_batch(s), field))


@pytest.mark.parametrize("procs, devs", [(1, 1), (2, 2)])
def test_each_example_carries_its_images_time_ids(procs, devs):
    # SDXL: each concept's images keep their own size and crop ids in the mix; image i of
    # concept c (pixel value 100 c + i) has time ids starting with that value.
    parts = []
    for c, n in enumerate((3, 5)):
        part = concept_part(100 * c, n, first_template=100 * c)
        values = 100 * c + np.arange(n, dtype=np.float32)
        time_ids = np.stack([values, values + 0.5, values * 2, -values, np.full(n, 16.0), np.full(n, 16.0)], axis=1)
        parts.append(data.TrainData(part.images, part.template_ids, 2, 0.5, 0, 1, time_ids=time_ids))
    m = concept_data.ConceptMix(parts, (1.0, 1.0), ["<c0>", "<c1>"], 0, 4)
    n = len(m.images)
    mean = np.arange(n * 2, dtype=np.float32).reshape(n, 2, 1, 1, 1)
    for s in range(8):
        for p in range(procs):
            share = m.local_batch(s, p, procs, devs)
            values = share.pixel_values[..., 0, 0, 0].astype(np.float32)
            assert share.time_ids.shape == values.shape + (6,)
            np.testing.assert_array_equal(share.time_ids[..., 0], values)
            np.testing.assert_array_equal(share.time_ids[..., 3], -values)
            cached = m.local_batch(s, p, procs, devs, data.LatentViews(mean, -mean))
            np.testing.assert_array_equal(cached.time_ids, share.time_ids)


def test_latent_views_show_the_same_examples():
    m = mix()
    n = len(m.images)
    mean = np.arange(n * 2, dtype=np.float32).reshape(n, 2, 1, 1, 1)
    views = data.LatentViews(mean, -mean)
    for s in range(6):
        images, flips, ids, example_ids, concepts = m.examples(s, 0, m.global_batch_size)
        batch = m.global_batch(s, views)
        np.testing.assert_array_equal(batch.latent_mean[:, 0, 0, 0], images * 2 + flips)
        np.testing.assert_array_equal(batch.concept_ids, concepts)
        np.testing.assert_array_equal(batch.input_ids, m.global_batch(s).input_ids)


def test_a_concept_with_no_share_of_an_epoch_is_refused():
    with pytest.raises(UserError, match="<c1> gets no example"):
        mix(sizes=(3, 3), weights=(1000, 1), g=4, repeats=1)


def test_a_batch_larger_than_every_concepts_slots_is_refused():
    with pytest.raises(UserError, match="global batch size 64 is larger"):
        mix(sizes=(3, 3), g=64, repeats=1)
