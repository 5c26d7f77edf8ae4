"""--enable_bucket: kohya's aspect-ratio buckets, batches of one bucket each, one compiled step per bucket."""

import collections
import contextlib
import io
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from ti_flax import TrainConfig, train
from ti_flax.training import checkpoint
from ti_flax.data import images as images_lib
from ti_flax.training import losses
from ti_flax.data.buckets import BucketBatches
from ti_flax.data.concept_mix import ConceptMix
from ti_flax.data.batches import Bucketed, LatentViews, TrainData
from ti_flax.errors import UserError
from ti_flax.formats import read_embedding
from ti_flax.training.run import check_buckets

SD15 = images_lib.Bucketing.of(512, 256, 1024, 64, False)


def test_sd15_buckets_are_kohyas():
    # kohya's make_bucket_resolutions(512): for each width w from 256 to 1024 in steps of 64, the
    # tallest height <= 1024 in steps of 64 with w x h <= 512^2, and each transposed; (height, width).
    widths_heights = [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384),
                      (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
    want = {(h, w) for w, h in widths_heights} | {(w, h) for w, h in widths_heights}
    assert set(SD15.buckets) == want
    assert all(h * w <= 512 * 512 and h % 64 == 0 and w % 64 == 0 for h, w in SD15.buckets)


@pytest.mark.parametrize(
    "size, bucket, resized",
    [
        # (height, width) of the image -> its bucket and the size it is resized to, worked by hand.
        # Landscape 4:3 (ratio 1.333): nearest bucket ratio is 576/448 = 1.286 (512/512 = 1, 640/384 =
        # 1.667); wider than it, so the height goes to 448: width 640 x 448/480 = 597.3 -> 597.
        ((480, 640), (448, 576), (448, 597)),
        # Portrait 3:4: the transpose.
        ((640, 480), (576, 448), (597, 448)),
        # Panorama 4:1: bucket 256 x 1024 has its ratio exactly; scaled by 1024/1600 = 0.64.
        ((400, 1600), (256, 1024), (256, 1024)),
        # Square: the 512 square, any size.
        ((300, 300), (512, 512), (512, 512)),
    ],
)
def test_bucket_of_an_image(size, bucket, resized):
    assert images_lib.select_bucket(*size, *SD15) == (bucket, resized)


def test_no_upscale_keeps_a_small_image_its_own_size_cut_to_the_steps(tmp_path):
    # 70 x 100 pixels is below 512^2: never enlarged; the bucket is 70 x 100 rounded down to 64 x 64,
    # and the center crop starts at ((70 - 64) // 2, (100 - 64) // 2) = (3, 18).
    bucketing = images_lib.Bucketing.of(512, 256, 1024, 64, True)
    assert images_lib.select_bucket(70, 100, *bucketing) == ((64, 64), (70, 100))
    pixels = np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "small.png")
    got, ids = images_lib.load_bucketed_image(str(tmp_path / "small.png"), bucketing, Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(got, pixels[3:67, 18:82])
    np.testing.assert_array_equal(ids, [70, 100, 3, 18, 64, 64])
    # A large image is scaled down to about 512^2 first: 2000 x 1000 (ratio 0.5) -> 724 x 362 rounded
    # to the steps as kohya does (width 384 keeps the ratio better than height 704): 768 x 384.
    assert images_lib.select_bucket(2000, 1000, *bucketing) == ((768, 384), (768, 384))


def test_no_upscale_refuses_an_image_smaller_than_a_step(tmp_path):
    Image.new("RGB", (100, 40)).save(tmp_path / "thin.png")
    with pytest.raises(UserError, match="thin.png is 100x40 pixels.*--bucket_reso_steps 64") as err:
        images_lib.load_bucketed_image(str(tmp_path / "thin.png"), images_lib.Bucketing.of(512, 256, 1024, 64, True),
                                       Image.Resampling.BICUBIC)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (900, 1000), (333, 1500)])
def test_sdxl_time_ids_are_diffusers_sdxl_scripts(tmp_path, size):
    # The image is resized to cover its bucket as kohya's BucketManager does (the side that fits to
    # the bucket's, the other scaled and rounded half up), then cropped and conditioned as diffusers'
    # train_text_to_image_sdxl.py does for a target of the bucket's size, written out: CenterCrop
    # with y1 = max(0, int(round((height - target_h) / 2.0))), x1 likewise; time ids = original
    # size + (y1, x1) + target size. The same pixels, and the same ids.
    bucketing = images_lib.Bucketing.of(1024, 512, 2048, 64, False)
    pixels = np.random.default_rng(1).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    got, ids = images_lib.load_bucketed_image(str(tmp_path / "photo.png"), bucketing, Image.Resampling.BICUBIC)
    th, tw = got.shape[:2]
    image = Image.open(tmp_path / "photo.png")
    original_size = (image.height, image.width)
    if image.width / image.height > tw / th:  # the height is the side that fits
        new = (int(image.width * th / image.height + 0.5), th)
    else:
        new = (tw, int(image.height * tw / image.width + 0.5))
    image = image.resize(new, Image.Resampling.BICUBIC)
    y1 = max(0, int(round((image.height - th) / 2.0)))
    x1 = max(0, int(round((image.width - tw) / 2.0)))
    np.testing.assert_array_equal(got, np.asarray(image)[y1:y1 + th, x1:x1 + tw])
    np.testing.assert_array_equal(ids, np.asarray(original_size + (y1, x1) + (th, tw), np.float32))


def bucketed_images(counts, shapes=((8, 16), (16, 16), (16, 8))):
    """A Bucketed of `counts[b]` black images of shape `shapes[b]`, interleaved, each image's first
    row its own index (so a batch's images can be told apart)."""
    order = [b for b, n in enumerate(counts) for _ in range(n)]
    np.random.default_rng(0).shuffle(order)
    items = []
    for i, b in enumerate(order):
        x = np.zeros((*shapes[b], 3), np.uint8)
        x[0, :, 0] = i  # the whole first row: a flip keeps it
        items.append(x)
    return Bucketed.make(items)


def source(images, repeats=2, seed=3, global_batch=4, **kw):
    return BucketBatches(TrainData(images, np.arange(6, dtype=np.int32).reshape(3, 2), repeats, 0.5, seed,
                                   global_batch, **kw), seed, global_batch)


def test_every_image_in_every_epoch_and_one_bucket_per_step():
    images = bucketed_images([5, 1, 2])
    data = source(images, time_ids=np.arange(8 * 6, dtype=np.float32).reshape(8, 6))
    # Bucket slots 10, 2, 4 (x 2 repeats), in batches of 4: ceil = 3 + 1 + 1 steps.
    assert data.steps_per_epoch == 5 and data.epochs_steps(3) == 15
    for epoch in range(2):
        seen = collections.Counter()
        for step in range(epoch * 5, epoch * 5 + 5):
            batch = data.global_batch(step)
            index = batch.pixel_values[:, 0, 0, 0]
            assert len({images.bucket[i] for i in index}) == 1  # one bucket, so one shape
            np.testing.assert_array_equal(batch.time_ids, data.time_ids[index])
            seen.update(index.tolist())
        assert all(seen[i] >= 2 for i in range(8))  # every image, at least its repeats
        assert sum(seen.values()) == 20


def test_a_short_bucket_is_filled_with_its_own_images():
    images = bucketed_images([5, 1, 2])
    data = source(images)
    one = int(np.flatnonzero(images.counts() == 1)[0])
    alone = int(np.flatnonzero(images.bucket == one)[0])
    batches = [data.global_batch(s) for s in range(data.steps_per_epoch)]
    (batch,) = [b for b in batches if images.bucket[b.pixel_values[0, 0, 0, 0]] == one]
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [alone] * 4  # its 2 slots, then 2 repeats of them
    assert len(set(batch.example_ids.tolist())) == 4  # each its own noise


def test_steps_are_a_function_of_seed_and_step():
    images = bucketed_images([5, 1, 2])
    whole = source(images)
    want = [whole.global_batch(s) for s in range(12)]
    resumed = source(images)  # a fresh source, read from the middle of epoch 1 and out of order
    for s in (7, 11, 6, 2):
        for a, b in zip(resumed.global_batch(s), want[s]):
            np.testing.assert_array_equal(a, b)
    other_seed = source(images, seed=4)
    assert any(not np.array_equal(other_seed.global_batch(s).pixel_values, want[s].pixel_values) for s in range(5))


def test_one_and_four_devices_and_two_hosts_see_the_same_batch():
    images = bucketed_images([5, 1, 2])
    data = source(images, global_batch=8)
    for step in range(6):
        whole = data.global_batch(step)
        four = data.local_batch(step, 0, 1, 4)
        hosts = [data.local_batch(step, p, 2, 2) for p in range(2)]
        for k, field in enumerate(whole):
            if field is None:  # time ids: SDXL only
                continue
            np.testing.assert_array_equal(four[k].reshape(field.shape), field)
            np.testing.assert_array_equal(np.concatenate([h[k].reshape(-1, *field.shape[1:]) for h in hosts]), field)


def test_cached_latents_per_bucket_and_flip():
    images = bucketed_images([3, 0, 2], shapes=((8, 16), (16, 16), (16, 8)))
    # Stand-in "latents": each view's pixels as float, so a view is easy to recompute.
    views = [np.stack([a, a[:, :, ::-1]], axis=1).astype(np.float32) for a in images.arrays]
    data = source(images)
    cached = LatentViews(images.with_arrays(views), images.with_arrays([-v for v in views]))
    for step in range(data.steps_per_epoch):
        pixels, latents = data.global_batch(step), data.global_batch(step, cached)
        np.testing.assert_array_equal(latents.latent_mean, pixels.pixel_values.astype(np.float32))
        np.testing.assert_array_equal(latents.latent_logvar, -latents.latent_mean)
        np.testing.assert_array_equal(latents.example_ids, pixels.example_ids)


def test_concepts_with_buckets():
    a, b = bucketed_images([2, 1, 0]), bucketed_images([0, 2, 3])
    templates = np.arange(6, dtype=np.int32).reshape(3, 2)
    parts = [TrainData(x, templates + 10 * c, 3, 0.5, 1, 1) for c, x in enumerate((a, b))]
    data = BucketBatches(ConceptMix(parts, [1.0, 3.0], ["<a>", "<b>"], 1, 4), 1, 4)
    counts = collections.Counter()
    for step in range(data.epochs_steps(4)):
        batch = data.global_batch(step)
        index = data.examples(step, 0, 4)[0]
        assert len({data.images.bucket[i] for i in index}) == 1
        # Each example's concept is the concept its image came from, and its prompt that concept's.
        np.testing.assert_array_equal(batch.concept_ids, (index >= len(a)).astype(np.int32))
        assert all((row >= 10) == bool(c) for row, c in zip(batch.input_ids[:, 0], batch.concept_ids))
        counts.update(batch.concept_ids.tolist())
    assert counts[1] > 2 * counts[0]  # weight 3 to 1, plus each bucket's fill
    assert data.locate(data.epochs_steps(2)) == (2, 0)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"min_bucket_reso": 128}, "--min_bucket_reso needs --enable_bucket"),
        ({"bucket_no_upscale": True}, "--bucket_no_upscale needs --enable_bucket"),
        ({"enable_bucket": True, "min_bucket_reso": 512, "max_bucket_reso": 256},
         r"--min_bucket_reso \(512\) must be positive and at most --max_bucket_reso \(256\)"),
        ({"enable_bucket": True, "bucket_reso_steps": 48}, "must be multiples of --bucket_reso_steps"),
        ({"enable_bucket": True, "resolution": 128}, "--resolution 128 must be between"),
        ({"enable_bucket": True, "center_crop": True}, "--center_crop does nothing with --enable_bucket"),
        ({"enable_bucket": True, "validation_loss_steps": 5}, "--validation_loss_steps .* --enable_bucket"),
    ],
)
def test_bad_bucket_flags_are_one_line(changes, message):
    config = TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", placeholder_token="<t>",
                         initializer_token="toy", **{"resolution": 512, **changes})
    with pytest.raises(UserError, match=message) as err:
        config.validate()
    assert "\n" not in str(err.value)


def test_a_bucket_step_the_model_cannot_divide_is_refused():
    class Spec:  # an SD model: VAE x 8, UNet x 8
        pixel_multiple = 64

    config = TrainConfig(enable_bucket=True, resolution=512, min_bucket_reso=256, max_bucket_reso=1024,
                         bucket_reso_steps=32)
    with pytest.raises(UserError, match="--bucket_reso_steps 32: this model needs a multiple of 64") as err:
        check_buckets(config, Spec)
    assert "\n" not in str(err.value)
    check_buckets(config.replace(bucket_reso_steps=128), Spec)


# --------------------------------------------------------------------------------------------
# Training on the tiny model (4 pixels of downsampling): two buckets, 24 x 40 and 32 x 32.


@pytest.fixture(scope="session")
def bucket_images_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bucket_images")
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate([(40, 40), (30, 50), (36, 60), (50, 52)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return str(d)


def bucket_config(model_dir, data_dir, out, **changes):
    base = dict(enable_bucket=True, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=8, repeats=2,
                num_vectors=2, max_train_steps=6, checkpointing_steps=3)
    return TrainConfig.tiny(model_dir, data_dir, str(out), **{**base, **changes})


def embedding_bytes(output_dir):
    with open(os.path.join(output_dir, "learned_embeds.safetensors"), "rb") as f:
        return f.read()


@pytest.fixture(scope="session")
def two_device_bucketed_run(tiny_model_dir, bucket_images_dir, tmp_path_factory, traces):
    """6 bucketed steps on 2 devices x 2 examples: (config, result, train_step traces, what it printed)."""
    config = bucket_config(tiny_model_dir, bucket_images_dir, tmp_path_factory.mktemp("bucketed"), train_batch_size=2)
    before, printed = traces["train_step"], io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train(config, devices=jax.local_devices()[:2])
    return config, result, traces["train_step"] - before, printed.getvalue()


def test_bucketed_run_compiles_once_per_bucket_and_resumes_bitwise(two_device_bucketed_run, tmp_path, traces):
    devices = jax.local_devices()[:2]
    whole, _, traced, banner = two_device_bucketed_run
    assert traced == 2  # two buckets used, each traced once in 6 steps
    assert "buckets    2 used, one compiled step each (height x width: images): 32x32: 2, 24x40: 2" in banner
    assert "2 steps per epoch" in banner  # 2 images x 2 repeats per bucket, in global batches of 4
    card = open(os.path.join(whole.output_dir, "README.md"), encoding="utf-8").read()
    assert "| resolution | 32 (aspect-ratio buckets of about 32x32 pixels, sides 16-64 in steps of 8) |" in card
    # checkpoint-3 is in the middle of epoch 1 (steps 3-4): the resumed run draws the same buckets
    # and examples for steps 4-6, with the programs already compiled.
    resumed = whole.replace(output_dir=str(tmp_path / "half"), resume_from_checkpoint="latest")
    shutil.copytree(os.path.join(whole.output_dir, "checkpoint-3"), os.path.join(resumed.output_dir, "checkpoint-3"))
    before = traces["train_step"]
    result = train(resumed, devices=devices)
    assert traces["train_step"] == before
    assert [r["step"] for r in result.history] == [4, 5, 6]
    assert embedding_bytes(resumed.output_dir) == embedding_bytes(whole.output_dir)
    # Turning buckets off is refused on resume: it changes every batch.
    square = resumed.replace(enable_bucket=False, min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64,
                             max_train_steps=9)
    with pytest.raises(checkpoint.UserError, match="--enable_bucket"):
        train(square, devices=devices)


def test_four_devices_with_cached_latents_train_the_same_rows(two_device_bucketed_run, tmp_path, traces):
    # The same global batch of 4 as 4 devices x 1, from latents cached per bucket and flip: the same
    # examples and draws, so the same rows (up to the order of the cross-device mean).
    two, result, _, _ = two_device_bucketed_run
    before = traces["train_step"]
    four = train(two.replace(output_dir=str(tmp_path / "four"), train_batch_size=1, cache_latents=True),
                 devices=jax.local_devices()[:4])
    assert traces["train_step"] - before == 2
    np.testing.assert_allclose(four.rows, result.rows, atol=2e-6)


# --------------------------------------------------------------------------------------------
# Masks in buckets (--masked_loss / --alpha_mask with --enable_bucket): a 3:5 portrait and a 5:3
# landscape bucket, 40 x 24 and 24 x 40, on the tiny buckets of about 32 x 32 pixels.

TINY = images_lib.Bucketing.of(32, 16, 64, 8, False)


@pytest.fixture(scope="session")
def alpha_bucket_dir(tmp_path_factory):
    """Two portrait and two landscape RGBA images, each opaque in one rectangle off its centre
    (top, left, bottom, right) and transparent around it; red is 0 inside, so once composited onto
    white, 255 - red is the alpha wherever a pixel came from."""
    d = tmp_path_factory.mktemp("alpha_buckets")
    rng = np.random.default_rng(7)
    for i, (h, w, (top, left, bottom, right)) in enumerate([(50, 30, (10, 3, 38, 19)), (60, 36, (4, 14, 30, 33)),
                                                            (30, 50, (3, 9, 25, 30)), (36, 60, (12, 30, 33, 52))]):
        rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        rgba[..., 3] = 0
        rgba[top:bottom, left:right, 3] = 255
        rgba[top:bottom, left:right, 0] = 0
        Image.fromarray(rgba, "RGBA").save(d / f"{i}.png")
    return str(d)


def load_alpha_buckets(folder, interpolation="nearest"):
    return images_lib.load_image_set(folder, 32, False, interpolation, mask=images_lib.ALPHA, bucketing=TINY)


def test_an_alpha_mask_is_resized_cropped_and_flipped_with_its_image_in_each_bucket(alpha_bucket_dir):
    images, _, _, masks = load_alpha_buckets(alpha_bucket_dir)
    assert images.shapes == masks.shapes == ((40, 24), (24, 40))
    assert images.counts().tolist() == [2, 2] and masks.bucket.tolist() == images.bucket.tolist()
    for pixels, mask in zip(images.arrays, masks.arrays):
        assert mask.dtype == np.float32 and set(np.unique(mask).tolist()) == {0.0, 1.0}
        np.testing.assert_array_equal(mask * 255, 255 - pixels[..., 0].astype(np.float32))
    data, seen = source(images, repeats=4, global_batch=2, masks=masks), set()
    for step in range(data.steps_per_epoch):
        batch = data.global_batch(step)
        np.testing.assert_array_equal(batch.mask * 255, 255 - batch.pixel_values[..., 0].astype(np.float32))
        index, flips = data.examples(step, 0, 2)[:2]
        seen |= {(int(images.bucket[i]), bool(flip)) for i, flip in zip(index, flips)}
    assert seen == {(0, False), (0, True), (1, False), (1, True)}  # both buckets, both ways round
    _, _, _, smooth = load_alpha_buckets(alpha_bucket_dir, "lanczos")
    assert all(0 <= m.min() and m.max() <= 1 for m in smooth.arrays)  # lanczos overshoots; a mask stays a weight


def test_several_concepts_keep_each_images_mask_in_its_bucket(alpha_bucket_dir):
    images, _, _, masks = load_alpha_buckets(alpha_bucket_dir)
    first = [0, 3]  # a portrait and a landscape image each
    a = Bucketed.make([images.items()[i] for i in first]), Bucketed.make([masks.items()[i] for i in first])
    b = Bucketed.make([images.items()[i] for i in (1, 2)]), Bucketed.make([masks.items()[i] for i in (1, 2)])
    templates = np.zeros((1, 2), np.int32)
    parts = [TrainData(x, templates, 3, 0.5, 1, 1, masks=m) for x, m in (a, b)]
    data = BucketBatches(ConceptMix(parts, [1.0, 2.0], ["<a>", "<b>"], 1, 2), 1, 2)
    for step in range(data.epochs_steps(2)):
        batch = data.global_batch(step)
        np.testing.assert_array_equal(batch.mask * 255, 255 - batch.pixel_values[..., 0].astype(np.float32))


def test_bucket_masks_on_the_latent_grid_flip_with_their_latents(alpha_bucket_dir):
    # Reduced once per image, then flipped with its example: the flipped image's mask reduced, in
    # pixel batches and in batches of latents cached per bucket and flip.
    images, _, _, masks = load_alpha_buckets(alpha_bucket_dir)
    grid = losses.bucket_latent_masks(masks, 4)
    assert [a.shape for a in grid.arrays] == [(2, 10, 6), (2, 6, 10)]
    pixels, on_grid = source(images, repeats=4, global_batch=2, masks=masks), source(images, repeats=4,
                                                                                       global_batch=2, masks=grid)
    views = [np.zeros((len(a), 2, 4, a.shape[1] // 4, a.shape[2] // 4), np.float32) for a in images.arrays]
    cached = LatentViews(images.with_arrays(views), images.with_arrays(views))
    for step in range(pixels.steps_per_epoch):
        mask = pixels.global_batch(step).mask
        expected = np.asarray(losses.latent_mask(mask, (mask.shape[1] // 4, mask.shape[2] // 4)))
        np.testing.assert_array_equal(on_grid.global_batch(step).mask, expected)  # 0/1 pixels: exact sums
        np.testing.assert_array_equal(on_grid.global_batch(step, cached).mask, expected)


def test_where_a_bucket_mask_is_zero_the_prediction_does_not_count(alpha_bucket_dir):
    images, _, _, masks = load_alpha_buckets(alpha_bucket_dir)
    data = source(images, repeats=4, global_batch=2, masks=losses.bucket_latent_masks(masks, 4))
    rng, spec = np.random.default_rng(1), losses.LossSpec(masked=True, unmasked_weight=0.0)
    for step in range(2):
        mask = data.global_batch(step).mask
        pred = rng.standard_normal((2, 4, *mask.shape[1:])).astype(np.float32)
        target = rng.standard_normal(pred.shape).astype(np.float32)

        def loss(p):
            return np.asarray(losses.example_losses(spec, p, target, np.zeros(2, np.int32), np.ones(1000, np.float32),
                                                    "epsilon", mask))

        base = loss(pred)
        assert (mask == 0).any() and (mask > 0).any()
        np.testing.assert_array_equal(loss(pred + 100.0 * (mask == 0)[:, None]), base)  # bit for bit
        assert (loss(pred + (mask > 0)[:, None]) != base).all()  # the subject's error counts


@pytest.fixture(scope="session")
def masked_bucketed_run(tiny_model_dir, alpha_bucket_dir, tmp_path_factory, traces):
    """6 bucketed steps with --alpha_mask on 2 devices x 2 examples: (config, result, train_step traces)."""
    config = bucket_config(tiny_model_dir, alpha_bucket_dir, tmp_path_factory.mktemp("masked_bucketed"),
                           train_batch_size=2, alpha_mask=True, unmasked_weight=0.1)
    before = traces["train_step"]
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(config, devices=jax.local_devices()[:2])
    return config, result, traces["train_step"] - before


@pytest.mark.slow
def test_a_masked_bucketed_run_resumes_bitwise_mid_epoch(masked_bucketed_run, tmp_path, traces):
    whole, result, traced = masked_bucketed_run
    assert traced == 2 and len(result.history) == 6 and all(np.isfinite(r["loss"]) for r in result.history)
    resumed = whole.replace(output_dir=str(tmp_path / "half"), resume_from_checkpoint="latest")
    shutil.copytree(os.path.join(whole.output_dir, "checkpoint-3"), os.path.join(resumed.output_dir, "checkpoint-3"))
    before = traces["train_step"]
    again = train(resumed, devices=jax.local_devices()[:2])
    assert traces["train_step"] == before
    assert [r["step"] for r in again.history] == [4, 5, 6]
    assert [r["loss"] for r in again.history] == [r["loss"] for r in result.history[3:]]
    assert embedding_bytes(resumed.output_dir) == embedding_bytes(whole.output_dir)


@pytest.mark.slow
def test_a_masked_bucketed_run_from_cached_latents_is_the_pixel_run(masked_bucketed_run, tmp_path, traces):
    pixels, result, _ = masked_bucketed_run
    before = traces["train_step"]
    cached = train(pixels.replace(output_dir=str(tmp_path / "cached"), cache_latents=True, checkpointing_steps=0),
                   devices=jax.local_devices()[:2])
    assert traces["train_step"] - before == 2
    np.testing.assert_allclose([r["loss"] for r in cached.history], [r["loss"] for r in result.history], rtol=1e-4)
    np.testing.assert_allclose(cached.rows, result.rows, atol=2e-6)


@pytest.mark.slow
def test_two_processes_of_one_device_train_the_buckets_of_one_process_with_two(two_device_bucketed_run, tmp_path):
    # The same 6 steps as 2 processes x 1 device x 2 examples: each step's global batch is one
    # bucket's on both hosts, with the same examples and draws, so the same losses and rows.
    from test_multihost import finish, free_port, start_workers, worker_args

    config, result, _, _ = two_device_bucketed_run
    flags = ("--enable_bucket", "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "8",
             "--repeats", "2", "--train_batch_size", "2")
    outs, port = [tmp_path / "out0", tmp_path / "out1"], free_port()
    procs = start_workers([worker_args(config.pretrained_model_name_or_path, config.train_data_dir, outs[i], port, i,
                                       steps=6, checkpointing=3, extra=flags) for i in range(2)], devices=1)
    outputs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "buckets    2 used" in outputs[0] and "devices    2 (1 local x 2 process(es)" in outputs[0]
    logged = [json.loads(line) for line in (outs[0] / "logs" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in logged], [r["loss"] for r in result.history], rtol=1e-5)
    rows = read_embedding(str(outs[0] / "learned_embeds.safetensors")).rows
    np.testing.assert_allclose(rows, result.rows, atol=1e-6)
