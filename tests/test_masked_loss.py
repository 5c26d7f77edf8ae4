"""The masked loss (--masked_loss, --alpha_mask, --mask_suffix, --unmasked_weight): the formula
against OneTrainer's masked_losses and kohya's area reduction written out in torch, the mask's
zero weight, the all-ones mask, alpha channels and mask files alike, the mask following its
image through crop, resize and flip (pixels and cached latents), mask files kept out of the
training images, bad input one line each, resume, and one tiny run that trains and resumes.
"""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ti_flax import TrainConfig, train
from ti_flax.training import checkpoint, losses
from ti_flax.config import cli
from ti_flax.data import batches as data, images
from ti_flax.errors import UserError, run_cli
from ti_flax.training.losses import LossSpec

LATENT = (4, 6)  # the latent grid of the formula tests; pixels are 8x it
PIXELS = (32, 48)


@pytest.fixture(scope="module")
def draws():
    """(pred, target float32 [3, 4, 4, 6], pixel masks float32 [3, 32, 48] of grey levels)."""
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((3, 4, *LATENT)).astype(np.float32)
    target = rng.standard_normal(pred.shape).astype(np.float32) * np.float32(0.5)
    mask = rng.random((3, *PIXELS)).astype(np.float32)
    mask[0, :16] = 0.0  # a background: the top half of the first example
    mask[1] = np.where(mask[1] > 0.7, mask[1], 0.0)  # a small subject
    return pred, target, mask


def ours(loss_spec, pred, target, mask, timesteps=(0, 400, 999)):
    """The step's loss (the batch mean of losses.example_losses) as float32 numpy."""
    alphas = np.linspace(0.999, 0.01, 1000).astype(np.float32)
    examples = losses.example_losses(loss_spec, jnp.asarray(pred), jnp.asarray(target), jnp.asarray(timesteps),
                                     alphas, "epsilon", None if mask is None else jnp.asarray(mask))
    return np.asarray(jnp.mean(examples))


def reference(pred, target, mask, unmasked_weight):
    """OneTrainer's masked_losses (normalize_masked_area_loss on) of the squared error, with the
    mask brought to the latent grid by area, as kohya's apply_masked_loss does; then the mean."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    losses_ = (torch.from_numpy(pred).double() - torch.from_numpy(target).double()) ** 2
    grid = F.interpolate(torch.from_numpy(mask).double()[:, None], size=losses_.shape[2:], mode="area")
    clamped = torch.clamp(grid, unmasked_weight, 1)
    losses_ = losses_ * clamped / clamped.mean(dim=(1, 2, 3), keepdim=True)
    return losses_.mean().item()


@pytest.mark.parametrize("unmasked_weight", [0.0, 0.3])
def test_the_masked_loss_is_onetrainers_normalised_mean_of_the_area_mask(draws, unmasked_weight):
    pred, target, mask = draws
    got = ours(LossSpec(masked=True, unmasked_weight=unmasked_weight), pred, target, mask)
    np.testing.assert_allclose(got, reference(pred, target, mask, unmasked_weight), rtol=1e-6)


def test_the_mask_weighs_the_recipes_element_loss_before_the_snr_weight(draws):
    # Huber (constant c) and min-SNR together: each example's weighted mean of kohya's element
    # loss, times its SNR weight, written out in numpy.
    pred, target, mask = draws
    spec = LossSpec(masked=True, unmasked_weight=0.1, loss_type="huber", huber_c=0.2, huber_schedule="constant",
                    snr_gamma=5.0)
    alphas = np.linspace(0.999, 0.01, 1000).astype(np.float64)
    t = np.array([0, 400, 999])
    element = 2 * 0.2 * (np.sqrt((pred.astype(np.float64) - target) ** 2 + 0.2**2) - 0.2)
    grid = mask.astype(np.float64).reshape(3, 4, 8, 6, 8).mean(axis=(2, 4))
    w = np.clip(grid, 0.1, 1.0)[:, None]
    snr = alphas[t] / (1 - alphas[t])
    want = ((element * w).sum(axis=(1, 2, 3)) / (4 * w.sum(axis=(1, 2, 3))) * np.minimum(snr, 5.0) / snr).mean()
    np.testing.assert_allclose(ours(spec, pred, target, mask), want, rtol=1e-5)


def test_the_error_where_the_mask_is_zero_gets_no_weight(draws):
    pred, target, mask = draws
    spec = LossSpec(masked=True)
    base = ours(spec, pred, target, mask)
    moved = pred.copy()
    moved[0, :, :2] += 100.0  # latent rows 0-1 of example 0: its pixel rows 0-15, all mask 0
    assert ours(spec, moved, target, mask) == base
    moved[0, :, 2] += 1.0  # where the mask is not 0 the error counts
    assert ours(spec, moved, target, mask) != base


def test_an_all_ones_mask_is_the_unmasked_loss_exactly(draws):
    pred, target, _ = draws
    ones = np.ones((3, *PIXELS), np.float32)
    assert ours(LossSpec(masked=True), pred, target, ones) == ours(LossSpec(), pred, target, None)
    huber = dict(loss_type="huber", huber_c=0.1, huber_schedule="snr", snr_gamma=5.0)
    assert ours(LossSpec(masked=True, **huber), pred, target, ones) == ours(LossSpec(**huber), pred, target, None)


def test_a_small_subject_is_learned_as_strongly_as_a_large_one(draws):
    # The same error everywhere: the loss is that error whatever the mask's area (not its area times it).
    pred, _, mask = draws
    target = pred - np.float32(0.5)
    for area in (mask, np.ones_like(mask)):
        np.testing.assert_allclose(ours(LossSpec(masked=True), pred, target, area), 0.25, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Masks from images: alpha channels and mask files, through every transform


def grey(h, w, seed=1):
    """uint8 [h, w]: a mask with black, white and grey regions."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 256, (h, w), dtype=np.uint8)
    mask[: h // 3] = 0
    mask[-h // 4:] = 255
    return mask


def masked_folder(folder, sizes=((40, 24), (30, 30))):
    """Images (their red channel equal to their mask) with OneTrainer mask files; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(2)
    for i, (h, w) in enumerate(sizes):
        mask = grey(h, w, seed=i)
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rgb[..., 0] = mask
        Image.fromarray(rgb).save(os.path.join(folder, f"im{i}.png"))
        Image.fromarray(mask, "L").save(os.path.join(folder, f"im{i}{images.MASK_SUFFIX}"))
    return str(folder)


@pytest.mark.parametrize("center_crop", [False, True])
def test_the_mask_is_cropped_and_resized_with_its_image(tmp_path, center_crop):
    folder = masked_folder(tmp_path)
    pixels, _, _, masks = images.load_image_set(folder, 16, center_crop, "nearest", mask=images.MASK_SUFFIX)
    assert masks.shape == (2, 16, 16) and masks.dtype == np.float32
    # Red is the mask, so wherever each pixel came from, its mask came from the same place.
    np.testing.assert_array_equal(masks * 255, pixels[..., 0].astype(np.float32))
    _, _, _, smooth = images.load_image_set(folder, 16, center_crop, "lanczos", mask=images.MASK_SUFFIX)
    assert smooth.min() >= 0 and smooth.max() <= 1  # lanczos overshoots; the mask stays a weight


def test_the_mask_flips_with_its_image_in_pixel_and_latent_batches(tmp_path):
    folder = masked_folder(tmp_path)
    pixels, _, _, masks = images.load_image_set(folder, 16, True, "nearest", mask=images.MASK_SUFFIX)
    source = data.TrainData(pixels, np.zeros((1, 5), np.int32), repeats=8, flip_p=0.5, seed=0, global_batch_size=4,
                            masks=masks)
    cached = data.LatentViews(np.zeros((2, 2, 4, 2, 2), np.float32), np.zeros((2, 2, 4, 2, 2), np.float32))
    flips = []
    for step in range(4):
        batch = source.global_batch(step)
        np.testing.assert_array_equal(batch.mask * 255, batch.pixel_values[..., 0].astype(np.float32))
        np.testing.assert_array_equal(source.global_batch(step, cached).mask, batch.mask)  # cached latents too
        flips += list(source.examples(step, 0, 4)[1])
    assert any(flips) and not all(flips)  # both kinds were seen


def test_alpha_and_a_mask_file_give_the_same_mask_and_loss(tmp_path, draws):
    mask = grey(40, 24)
    rgb = np.random.default_rng(3).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "alpha")
    os.makedirs(tmp_path / "file")
    Image.fromarray(np.dstack([rgb, mask]), "RGBA").save(tmp_path / "alpha" / "a.png")
    Image.fromarray(rgb).save(tmp_path / "file" / "a.png")
    Image.fromarray(mask, "L").save(tmp_path / "file" / "a_mask.png")
    _, _, _, from_alpha = images.load_image_set(str(tmp_path / "alpha"), 32, False, "bicubic", mask=images.ALPHA)
    _, names, _, from_file = images.load_image_set(str(tmp_path / "file"), 32, False, "bicubic", mask="_mask.png")
    assert names == ["a.png"]
    np.testing.assert_array_equal(from_alpha, from_file)
    pred, target, _ = draws
    spec = LossSpec(masked=True)
    pred, target = pred[:1, :, :, :4], target[:1, :, :, :4]  # a 4x4 latent grid for the 32x32 mask
    assert ours(spec, pred, target, from_alpha, (400,)) == ours(spec, pred, target, from_file, (400,))


def test_mask_files_are_never_training_images(tmp_path, recwarn):
    folder = masked_folder(tmp_path)
    open(os.path.join(folder, "im0_m.png"), "wb").write(open(os.path.join(folder, "im0.png"), "rb").read())
    assert images.list_images(folder) == ["im0.png", "im0_m.png", "im1.png"]
    assert images.list_images(folder, mask_suffix="_m.png") == ["im0.png", "im1.png"]
    assert not [w for w in recwarn if "skipping" in str(w.message)]  # skipped as masks, not as strays


@pytest.mark.parametrize("make, mask, expected", [
    (lambda d: Image.fromarray(np.zeros((40, 24), np.uint8), "L").save(d / f"im0{images.MASK_SUFFIX}"),
     images.MASK_SUFFIX, r"^--masked_loss: .*im0-masklabel.png is black \(transparent\) all over, so nothing of "),
    (lambda d: Image.fromarray(np.ones((8, 8), np.uint8), "L").save(d / f"im0{images.MASK_SUFFIX}"),
     images.MASK_SUFFIX, r"^--masked_loss: mask .*im0-masklabel.png is 8x8 but its image is 24x40; make the mask"),
    (lambda d: os.remove(d / f"im1{images.MASK_SUFFIX}"),
     images.MASK_SUFFIX, r"^--masked_loss: .*im1.png has no mask file im1-masklabel.png; every image needs one"),
    (lambda d: None, "_other.png", r"^--masked_loss: no image in .* has a mask file \(<name>_other.png\); add them"),
    (lambda d: None, images.ALPHA, r"^--alpha_mask: .*im0.png has no alpha channel; save it as a PNG"),
])
def test_masks_that_cannot_work_are_one_line_naming_the_file(tmp_path, make, mask, expected):
    folder = masked_folder(tmp_path / "d")
    make(tmp_path / "d")
    with pytest.raises(UserError, match=expected) as err:
        images.load_image_set(folder, 16, False, "bicubic", mask=mask)
    assert "\n" not in str(err.value)


REQUIRED = ["--pretrained_model_name_or_path", "/no/such/model", "--train_data_dir", "/no/such/images",
            "--placeholder_token", "<t>", "--initializer_token", "toy", "--report_to", "none"]


@pytest.mark.parametrize("extra, expected", [
    (["--masked_loss", "--unmasked_weight", "1.5"], "--unmasked_weight must be between 0 and 1"),
    (["--masked_loss", "--unmasked_weight", "-0.1"], "--unmasked_weight must be between 0 and 1"),
    (["--unmasked_weight", "0.2"], "--unmasked_weight weighs the background of --masked_loss / --alpha_mask"),
    (["--mask_suffix", "_m.png"], "--mask_suffix names the mask files of --masked_loss"),
    (["--masked_loss", "--mask_suffix", ".png"], "--mask_suffix must be the end of a file name after the image's stem"),
    (["--masked_loss", "--mask_suffix", "m/a.png"], "--mask_suffix must be the end of a file name"),
    (["--alpha_mask", "--mask_suffix", "_m.png"], "--mask_suffix names mask files, but --alpha_mask takes"),
])
def test_bad_flags_are_one_line_before_anything_loads(extra, expected, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(lambda: train(cli.parse_config(REQUIRED + ["--output_dir", str(out), *extra])))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert expected in err
    assert not out.exists()


def test_masked_loss_with_no_mask_files_writes_nothing(tiny_model_dir, sample_images_dir, tmp_path, capsys):
    config = TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(tmp_path / "out"), masked_loss=True)
    code = run_cli(lambda: train(config, devices=jax.local_devices()[:1]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "no image in" in err and "has a mask file (<name>-masklabel.png)" in err
    assert not (tmp_path / "out").exists()


def test_resume_refuses_changed_mask_flags_and_takes_old_checkpoints_as_off():
    def meta(config):
        return checkpoint.run_meta(config, ["<t>"], [49408], "f", 1, 3)

    before = meta(TrainConfig())
    for field in ("masked_loss", "alpha_mask", "mask_suffix", "unmasked_weight"):
        del before["config"][field]  # a checkpoint written before the masked loss
    checkpoint.check_compatible(before, meta(TrainConfig()), "checkpoint-2")
    for changes, named in [({"masked_loss": True}, "--masked_loss (False vs True)"),
                           ({"alpha_mask": True}, "--alpha_mask (False vs True)"),
                           ({"masked_loss": True, "mask_suffix": "_m.png"}, "--mask_suffix (-masklabel.png vs _m.png)"),
                           ({"masked_loss": True, "unmasked_weight": 0.5}, "--unmasked_weight (0.0 vs 0.5)")]:
        with pytest.raises(UserError, match=f"cannot resume from checkpoint-2: .*{re.escape(named)}"):
            checkpoint.check_compatible(before, meta(TrainConfig(**changes)), "checkpoint-2")


def test_the_recipe_says_where_the_masks_come_from():
    assert losses.describe(TrainConfig()) == ""
    assert losses.describe(TrainConfig(alpha_mask=True)) == "masked loss from alpha channels, unmasked weight 0"
    assert losses.describe(TrainConfig(masked_loss=True, unmasked_weight=0.25)) == \
        "masked loss from mask files *-masklabel.png, unmasked weight 0.25"
    assert LossSpec.from_config(TrainConfig(alpha_mask=True), 1000) == LossSpec(masked=True)


# --------------------------------------------------------------------------------------------
# A tiny run: it traces once, trains, resumes bitwise, and cached latents give the pixels' loss


@pytest.fixture(scope="module")
def masked_images(sample_images_dir, tmp_path_factory):
    """The sample images, each with a mask file: its left third black, a grey band, the rest white."""
    folder = tmp_path_factory.mktemp("masked")
    for name in sorted(os.listdir(sample_images_dir)):
        shutil.copy(os.path.join(sample_images_dir, name), folder)
        w, h = Image.open(os.path.join(sample_images_dir, name)).size
        mask = np.full((h, w), 255, np.uint8)
        mask[:, : w // 3] = 0
        mask[:, w // 3: w // 2] = 128
        Image.fromarray(mask, "L").save(folder / (os.path.splitext(name)[0] + images.MASK_SUFFIX))
    return str(folder)


@pytest.mark.slow
def test_a_masked_run_traces_once_trains_and_resumes_bitwise(tiny_model_dir, masked_images, tmp_path, traces):
    one = jax.local_devices()[:1]
    config = TrainConfig.tiny(tiny_model_dir, masked_images, str(tmp_path / "whole"), max_train_steps=4,
                              train_batch_size=2, masked_loss=True, unmasked_weight=0.1, checkpointing_steps=2)
    before = traces["train_step"]
    whole = train(config, devices=one)
    assert traces["train_step"] - before == 1
    assert all(np.isfinite(r["loss"]) for r in whole.history) and len(whole.history) == 4
    out = tmp_path / "resumed"
    shutil.copytree(os.path.join(config.output_dir, "checkpoint-2"), out / "checkpoint-2")
    resumed = train(config.replace(output_dir=str(out), resume_from_checkpoint="latest"), devices=one)
    assert [r["step"] for r in resumed.history] == [3, 4]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history[2:]]
    np.testing.assert_array_equal(resumed.rows, whole.rows)
    # The same run from cached latents: the same masked losses (the VAE encodes once instead of each step).
    cached = train(config.replace(output_dir=str(tmp_path / "cached"), cache_latents=True, checkpointing_steps=0,
                                  max_train_steps=2), devices=one)
    np.testing.assert_allclose([r["loss"] for r in cached.history], [r["loss"] for r in whole.history[:2]], rtol=1e-4)
