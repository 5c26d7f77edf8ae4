"""The train step of diffusers' Flax textual-inversion script, rebuilt for scripts/benchmark.py.

It trains the way examples/textual_inversion/textual_inversion_flax.py (diffusers 0.x) does, so
one benchmark run can measure ti_flax against it on the same model, images and settings:

- the trainable tree is the whole text encoder, its token table grown by the new rows, and the
  gradient is taken with respect to all of it (then all-reduced over devices);
- `optax.multi_transform` runs AdamW on the whole token table and zeroes every other gradient;
- after each update the table is rebuilt from the original one with only the new rows copied
  in, undoing AdamW's weight decay on the other 49408 rows;
- every step VAE-encodes the batch's float32 NCHW pixels and samples the latent.

Two things are kinder to the baseline than the script: the original table is an argument of
the step rather than a closed-over constant (diffusers PR #880 is the TPU out-of-memory that
constant caused), and its host pipeline gets the images already decoded and resized (the script
re-opens and resizes each image with PIL every step).
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ti_flax import models
from ti_flax.models import schedulers
from ti_flax.models import clip
from ti_flax.parallel import AXIS


class RefState(NamedTuple):
    step: Any
    params: Any  # the whole text encoder, token table [vocab + num_vectors, hidden]
    opt_state: Any
    rng: Any  # the script keeps one key per device and splits it every step


def _labels(params):
    # The script's create_mask: "token_embedding" for the table, "zero" for everything else.
    def label(path, _):
        return "token_embedding" if any(getattr(k, "key", None) == "token_embedding" for k in path) else "zero"

    return jax.tree_util.tree_map_with_path(label, params)


def _zero_grads():
    return optax.GradientTransformation(
        lambda _: (), lambda updates, state, params=None: (jax.tree_util.tree_map(jnp.zeros_like, updates), ())
    )


def reference_tx(params, opt_spec):
    """AdamW on the token table, zero elsewhere, with ti_flax's hyperparameters (opt_spec)."""
    adamw = optax.adamw(
        opt_spec.schedule(), b1=opt_spec.beta1, b2=opt_spec.beta2, eps=opt_spec.epsilon, weight_decay=opt_spec.weight_decay
    )
    return optax.multi_transform({"token_embedding": adamw, "zero": _zero_grads()}, _labels(params))


def reference_params(text_params, init_rows):
    """The script's text-encoder params: the token table resized, new rows set to the initializer's."""
    from ti_flax.tokens import merged_table

    return models.with_token_table(text_params, merged_table(models.token_table(text_params), init_rows))


# The script runs its models in float32 with XLA's dense attention (auto picks it on TPU/GPU).
COMPUTE = models.Compute()


def grown_spec(spec, num_vectors):
    """The spec with the text encoder's vocabulary grown by the new tokens, as the script resizes it."""
    return dataclasses.replace(spec, text=dataclasses.replace(spec.text, vocab_size=spec.text.vocab_size + num_vectors))


def init_state(params, opt_spec, seed=0):
    tx = reference_tx(params, opt_spec)
    return RefState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(seed))


def reference_step(state, original_table, frozen, batch, *, spec, opt_spec, new_ids, axis_name=AXIS):
    """One step of the script's train_step.

    Args:
      state: RefState (donated). original_table: the grown table at the start of training.
      frozen: {"unet", "vae": params, "alphas_cumprod": [T]}.
      batch: {"pixel_values": float32 [B, 3, H, W] in [-1, 1], "input_ids": int32 [B, L]}.
      spec: the model's spec grown by `grown_spec` (static).
      new_ids: the placeholder token ids (static, as the script closes over them).
    """
    dropout_rng, sample_rng, new_rng = jax.random.split(state.rng, 3)  # CLIP's dropout is 0: unused
    tx = reference_tx(state.params, opt_spec)

    def compute_loss(params):
        mean, logvar = models.vae_moments(spec, COMPUTE, frozen["vae"], jnp.transpose(batch["pixel_values"], (0, 2, 3, 1)))
        sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(sample_rng, mean.shape, mean.dtype)
        latents = jnp.transpose(sample, (0, 3, 1, 2)).astype(jnp.float32) * spec.scaling_factor
        noise_rng, timestep_rng = jax.random.split(sample_rng)
        noise = jax.random.normal(noise_rng, latents.shape)
        timesteps = jax.random.randint(timestep_rng, (latents.shape[0],), 0, spec.num_train_timesteps)
        alphas = frozen["alphas_cumprod"]
        noisy = schedulers.noisy_latents(alphas, latents, noise, timesteps)
        text_config = spec.text  # the grown vocabulary: a plain lookup in the grown table
        hidden = clip.encode(params, text_config, batch["input_ids"], dtype=jnp.dtype(COMPUTE.dtype)).last_hidden_state
        pred = models.predict_noise(spec, COMPUTE, frozen["unet"], noisy, timesteps, hidden)
        target = noise if spec.prediction_type == "epsilon" else schedulers.velocity(alphas, latents, noise, timesteps)
        return jnp.mean(jnp.square(target - pred.astype(jnp.float32)))

    loss, grads = jax.value_and_grad(compute_loss)(state.params)
    grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ids = jnp.asarray(new_ids)
    table = original_table.at[ids].set(models.token_table(params)[ids])
    params = models.with_token_table(params, table)
    metrics = {"loss": jax.lax.pmean(loss, axis_name)}
    return RefState(state.step + 1, params, opt_state, new_rng), metrics


@functools.lru_cache(maxsize=8)
def pmapped_reference_step(spec, opt_spec, new_ids, devices):
    fn = functools.partial(reference_step, spec=spec, opt_spec=opt_spec, new_ids=new_ids)
    return jax.pmap(fn, axis_name=AXIS, devices=devices, donate_argnums=(0,))


def reference_batches(data, num_devices):
    """The script's host batches: float32 NCHW pixels in [-1, 1] and token ids, per device."""
    for batch in data.batches(0, 0, 1, num_devices):
        pixels = batch.pixel_values.astype(np.float32) / 127.5 - 1.0
        yield {"pixel_values": np.ascontiguousarray(np.moveaxis(pixels, -1, -3)), "input_ids": batch.input_ids}
