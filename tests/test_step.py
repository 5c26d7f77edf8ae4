"""The step's typed inputs and the model's static settings, at shape level: nothing compiled.

A PixelBatch and a LatentBatch are two kinds of the same examples: the kind is the batch's type
(pytree structure, settled at trace time), and both kinds draw the same noise. ModelSpec says
what the model is, Compute how a run computes with it.
"""

import dataclasses
import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ti_flax import TrainConfig, families, models
from ti_flax.training import checkpoint, latents, step as step_lib
from ti_flax.data import batches as data
from ti_flax.sampling import sampler
from ti_flax.training import run as run_lib
from ti_flax.models.unet import UNetConfig

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "flax-pipeline")


@pytest.fixture(scope="module")
def spec():
    """The committed Flax fixture's spec, from its configs alone (no weights read)."""

    def config(kind):
        with open(os.path.join(FIXTURE, kind, "config.json")) as f:
            return json.load(f)

    return families.get("sd1").spec_from_configs(config("text_encoder"), config("unet"), config("vae"))


def small_data(images=3, side=16, batch=4):
    pixels = np.arange(images * side * side * 3, dtype=np.uint8).reshape(images, side, side, 3)
    return data.TrainData(pixels, np.arange(8, dtype=np.int32).reshape(2, 4), 4, 0.5, 0, batch)


def test_model_spec_is_the_model_and_compute_is_the_run():
    spec_fields = {f.name for f in dataclasses.fields(models.ModelSpec)}
    assert not spec_fields & {"dtype", "attention", "remat"}
    config = TrainConfig(mixed_precision="bf16", attention="chunked", gradient_checkpointing=True)
    compute = run_lib.model_compute(config)
    assert compute == models.Compute(dtype="bfloat16", attention="chunked", remat=True)
    assert hash(compute) == hash(run_lib.model_compute(config))  # static: usable as a cache key
    assert run_lib.model_compute(TrainConfig()) == models.Compute()
    with pytest.raises(dataclasses.FrozenInstanceError):
        compute.dtype = "float32"


def test_the_fingerprint_depends_on_the_model_only(spec):
    table = np.zeros((4, 2), np.float32)
    fingerprint = checkpoint.model_fingerprint(spec, table)
    assert fingerprint == checkpoint.model_fingerprint(families.get("sd1").spec_from_configs(
        spec.text.to_dict(), spec.denoiser.to_dict(), spec.vae.to_dict()), table)
    assert fingerprint != checkpoint.model_fingerprint(dataclasses.replace(spec, prediction_type="v_prediction"), table)


def test_default_size_and_latent_shape_come_from_the_configs(spec):
    unet = spec.denoiser
    side = unet.sample_size * spec.vae_scale_factor
    assert models.default_size(spec) == (side, side)
    settings = sampler.SamplerSettings(spec, models.Compute(), "ddim", "{}", 2, 2 * side, side)
    assert sampler.latent_shape(settings) == (unet.in_channels, 2 * side // spec.vae_scale_factor,
                                              side // spec.vae_scale_factor)


def test_frozen_casts_the_weights_once_and_keeps_the_schedule():
    class Model:
        params = {"text_encoder": {"w": np.ones(2, np.float32)}, "unet": {"w": np.ones(2, np.float32)},
                  "vae": {"w": np.ones(2, np.float32), "n": np.arange(2)}}
        alphas_cumprod = np.linspace(0.9, 0.1, 5, dtype=np.float32)
        spec = SimpleNamespace(denoiser=UNetConfig())

    frozen = families.Frozen.from_model(Model, "bfloat16")
    assert frozen.text_encoder["w"].dtype == jnp.bfloat16 and frozen.vae["n"].dtype == np.arange(2).dtype
    assert frozen.alphas_cumprod.dtype == np.float32
    # With the VAE dropped (cached latents) the tree simply has no VAE leaves.
    assert len(jax.tree_util.tree_leaves(frozen._replace(vae=None))) == 3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_abstract_frozen_has_the_shapes_and_dtypes_of_the_cast_one(dtype):
    # engine.build compiles the step from the abstract tree while the weights are being cast: a
    # leaf whose dtype the two disagree on would make the compiled step refuse the real weights.
    class Model:
        params = {"text_encoder": {"w": np.ones((2, 3), np.float32)}, "unet": {"w": np.ones(2, np.float16)},
                  "vae": {"w": np.ones(2, np.float32), "n": np.arange(2, dtype=np.int32)},
                  "text_encoder_2": {"w": np.ones((1, 4), np.float32)}}
        alphas_cumprod = np.linspace(0.9, 0.1, 5, dtype=np.float32)
        spec = SimpleNamespace(denoiser=UNetConfig())

    cast, abstract = families.Frozen.from_model(Model, dtype), families.Frozen.from_model(Model, dtype, abstract=True)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(cast)
    for a, c in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(cast)):
        assert isinstance(a, jax.ShapeDtypeStruct) and (a.shape, a.dtype) == (c.shape, c.dtype)


def test_pixel_and_latent_batches_show_the_same_examples():
    d = small_data()
    mean = np.random.default_rng(0).standard_normal((3, 2, 4, 2, 2)).astype(np.float32)
    views = data.LatentViews(mean, mean + 1)
    for step in (0, 1, 5):
        pixels, cached = d.global_batch(step), d.global_batch(step, views)
        assert isinstance(pixels, data.PixelBatch) and isinstance(cached, data.LatentBatch)
        np.testing.assert_array_equal(pixels.input_ids, cached.input_ids)
        np.testing.assert_array_equal(pixels.example_ids, cached.example_ids)
        images, flips, *_ = d.examples(step, 0, d.global_batch_size)
        np.testing.assert_array_equal(cached.latent_mean, mean[images, flips.astype(int)])
    local = d.local_batch(1, 0, 1, 2, views)
    assert isinstance(local, data.LatentBatch) and local.latent_mean.shape == (2, 2, 4, 2, 2)
    assert local.example_ids.shape == (2, 2)
    with pytest.raises(ValueError, match="cache must be"):
        data.LatentViews(mean[:, 0], mean[:, 0])


def test_each_batch_kind_reaches_the_same_draws(spec, monkeypatch):
    # (tests/test_speed.py compares the values through the real VAE; this is the dispatch.)
    rng = np.random.default_rng(1)
    mean = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    logvar = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    encoded = []

    def encode(spec, compute, vae, pixels):
        encoded.append(pixels.shape)
        return mean, logvar

    monkeypatch.setattr(step_lib, "encode_pixels", encode)
    ids, example_ids = np.zeros((2, 77), np.int32), np.array([3, 8])
    frozen = families.Frozen(None, None, None, np.linspace(0.99, 0.01, spec.num_train_timesteps, dtype=np.float32))
    compute = models.Compute()
    pixel = step_lib.PixelBatch(np.zeros((2, 32, 32, 3), np.uint8), ids, example_ids)
    cached = step_lib.LatentBatch(mean, logvar, ids, example_ids)
    assert step_lib.posterior(spec, compute, frozen, cached) == (mean, logvar) and not encoded
    assert step_lib.posterior(spec, compute, frozen, pixel) == (mean, logvar) and encoded == [(2, 32, 32, 3)]
    key = jax.random.PRNGKey(0)
    a, b = (jax.eval_shape(lambda batch: step_lib.diffusion_inputs(spec, compute, frozen, batch, key), batch)
            for batch in (pixel, cached))
    assert a == b and a[0].shape == mean.shape and a[1].shape == (2,) and a[2].shape == mean.shape
    with pytest.raises(TypeError, match="PixelBatch or a LatentBatch"):
        step_lib.diffusion_inputs(spec, compute, frozen, {"pixel_values": pixel.pixel_values}, key)


def test_the_batch_kind_is_pytree_structure():
    leaves = [np.zeros(1)] * 3
    pixel = jax.tree_util.tree_structure(step_lib.PixelBatch(*leaves))
    cached = jax.tree_util.tree_structure(step_lib.LatentBatch(*leaves, np.zeros(1)))
    assert pixel != cached  # a compiled step for one kind is never handed the other


def test_latent_batch_shapes_without_encoding(spec):
    pixel = step_lib.PixelBatch(jax.ShapeDtypeStruct((2, 3, 16, 16, 3), np.uint8),
                                jax.ShapeDtypeStruct((2, 3, 77), np.int32), jax.ShapeDtypeStruct((2, 3), np.int64))
    vae = models.abstract_params(spec)["vae"]
    shapes = latents.latent_batch_shapes(spec, models.Compute(), vae, pixel)
    latent_side = 16 // spec.vae_scale_factor
    assert isinstance(shapes, step_lib.LatentBatch)
    assert shapes.latent_mean.shape == (2, 3, 4, latent_side, latent_side) and shapes.latent_mean.dtype == np.float32
    assert shapes.input_ids.shape == (2, 3, 77)
