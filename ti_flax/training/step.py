"""The pure textual-inversion train step.

`train_step(state, frozen, batch, base_key)` differentiates the diffusion loss with respect to
the learned rows only. The frozen text encoder, UNet and VAE weights come in as a separate,
non-donated `Frozen` argument; nothing is closed over, so a 49408 x 768 table never becomes a
constant of the compiled program. A batch is a `PixelBatch` (images, encoded by the VAE in the
step) or a `LatentBatch` (the VAE posterior cached up front): the kind is the batch's type, part
of the pytree structure, so it is settled when the step is traced.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import families, models, parallel
from ..data.batches import LatentBatch, PixelBatch
from ..parallel import AXIS, ONE, SPLIT, pmap_devices
from . import losses
from .losses import LossSpec


class TrainState(NamedTuple):
    """What training changes: the step counter, the learned rows and their optimizer state, with
    --use_ema the rows' moving average, and with --lora_rank the LoRA's factors and their own
    optimizer state (None without: the tree, and so a checkpoint, is then exactly what it was
    before these existed)."""

    step: Any  # int32 scalar
    rows: Any  # float32 [num_vectors, hidden]
    opt_state: Any
    ema: Any = None  # float32 [num_vectors, hidden], or None
    lora: Any = None  # {module: {"lora_A", "lora_B"}} float32 (models/lora.py), or None
    lora_opt_state: Any = None

    @property
    def output_rows(self):
        """The rows a run's embeddings, validation images and pipeline use: the EMA with
        --use_ema, else the learned rows."""
        return self.rows if self.ema is None else self.ema


def init_state(rows, opt_spec):
    rows = jnp.asarray(rows, jnp.float32)
    ema = jnp.array(rows) if opt_spec.ema is not None else None  # diffusers' EMAModel: a copy of the start
    state = TrainState(step=jnp.zeros((), jnp.int32), rows=rows, opt_state=opt_spec.build().init(rows), ema=ema)
    if opt_spec.lora is None:
        return state
    factors = opt_spec.lora.init()
    return state._replace(lora=factors, lora_opt_state=opt_spec.build_lora().init(factors))


# The noise offset's draw comes from fold_in(example key, OFFSET_DRAW), apart from the three
# split draws, so they stay what they were without it. (jax's threefry gives split(k, 3)'s keys
# as fold_in(k, 0), 1 and 2: the offset's constant must be none of those.)
OFFSET_DRAW = 3


def example_draws(key, example_ids, latent_shape, time_draw, noise_offset=0.0):
    """Per-example (latent sample noise, diffusion noise, time draw), keyed by global example id.

    Keying by the example's index in the run rather than by device makes the draws the same
    whatever the number of devices or hosts the global batch is split over. `time_draw(key)` is
    the family's draw of one example's time (ModelFamily.time_draw: a DDPM timestep, or the draw a
    flow-matching schedule maps to one); `noise_offset` (--noise_offset) adds noise_offset * a
    normal draw of shape (C, 1, 1) to the noise, one per example and channel.
    """

    def one(example_id):
        k = jax.random.fold_in(key, example_id)
        k_latent, k_noise, k_time = jax.random.split(k, 3)
        noise = jax.random.normal(k_noise, latent_shape)
        if noise_offset:
            offset = jax.random.normal(jax.random.fold_in(k, OFFSET_DRAW), (latent_shape[0], 1, 1))
            noise = noise + noise_offset * offset
        return jax.random.normal(k_latent, latent_shape), noise, time_draw(k_time)

    return jax.vmap(one)(example_ids)


def encode_pixels(spec, compute, vae_params, pixel_values):
    """VAE posterior (mean, log-variance), float32 NCHW, of uint8 NHWC images."""
    pixels = pixel_values.astype(jnp.float32) / 127.5 - 1.0
    mean, logvar = models.vae_moments(spec, compute, vae_params, pixels)
    return tuple(jnp.transpose(x.astype(jnp.float32), (0, 3, 1, 2)) for x in (mean, logvar))


def posterior(spec, compute, frozen, batch):
    """(mean, log-variance), float32 NCHW, of a batch's latents: encoded now, or read from the cache."""
    if isinstance(batch, LatentBatch):
        return batch.latent_mean, batch.latent_logvar
    if isinstance(batch, PixelBatch):
        return encode_pixels(spec, compute, frozen.vae, batch.pixel_values)
    raise TypeError(f"batch must be a PixelBatch or a LatentBatch, not {type(batch).__name__}")


def diffusion_inputs(spec, compute, frozen, batch, key, loss_spec=LossSpec(), timesteps=None):
    """(noisy latents, timesteps, target) for a PixelBatch or a LatentBatch.

    A LatentBatch (from --cache_latents) skips the VAE; the latent sample still draws its noise
    from the example's own key, so both kinds of batch give the same draws. The latents are the
    posterior's sample, less the VAE's shift (FLUX's), times its scale; the family's forward
    process noises them and names the target (ModelFamily.forward_process). `loss_spec` sets the
    time draws and the noise offset. `timesteps` int32 [B] replaces the drawn ones (the validation
    loss's fixed timesteps, out of num_train_timesteps); the noises are drawn either way.
    """
    family = families.of(spec)
    mean, logvar = posterior(spec, compute, frozen, batch)
    latent_eps, noise, drawn = example_draws(key, batch.example_ids, mean.shape[1:],
                                             family.time_draw(spec, loss_spec), loss_spec.noise_offset)
    sample = mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * latent_eps
    shift = spec.vae.shift_factor
    latents = (sample if shift is None else sample - shift) * spec.scaling_factor
    return family.forward_process(spec, frozen, loss_spec, latents, noise, drawn, timesteps)


def diffusion_loss(rows, spec, compute, frozen, input_ids, noisy, timesteps, target, per_example=False,
                   time_ids=None, loss_spec=LossSpec(), mask=None):
    """The loss of the UNet's prediction, conditioned on text with the learned rows: the mean
    squared error, or the batch mean of each example's loss under `loss_spec` (a losses.LossSpec:
    Huber, min-SNR weights, the mask's weighted mean with `mask` float32 [B, H, W]).

    `frozen` is a Frozen (its text encoder(s) and UNet are read). With `per_example`, returns
    (loss, float32 [B] each example's own loss) for jax's has_aux. `time_ids` float32 [B, 6] is
    each example's size and crop conditioning (images.size_and_crop_ids) where the family has it
    (ModelFamily.time_ids: SDXL); None otherwise.
    """
    family = families.of(spec)
    cond = family.condition(spec, compute, frozen.text_params, input_ids, rows)
    pred = family.predict(spec, compute, frozen.denoiser, noisy.astype(cond.context.dtype), timesteps, cond, time_ids,
                          guidance=loss_spec.guidance_scale)
    if loss_spec.weighted:
        examples = losses.example_losses(loss_spec, pred.astype(jnp.float32), target, timesteps, frozen.alphas_cumprod,
                                         spec.prediction_type, mask, spec.num_train_timesteps)
        loss = jnp.mean(examples)
        return (loss, examples) if per_example else loss
    error = jnp.square(pred.astype(jnp.float32) - target)
    loss = jnp.mean(error)
    return (loss, jnp.mean(error, axis=tuple(range(1, error.ndim)))) if per_example else loss


def pivotal_loss(trained, spec, compute, frozen, *args, scale, **options):
    """diffusion_loss of `trained` = (rows, LoRA factors): the UNet runs with the factors attached,
    so the gradient is taken with respect to both and nothing else."""
    rows, factors = trained
    return diffusion_loss(rows, spec, compute, frozen.with_lora(factors, scale), *args, **options)


def concept_sums(example_losses, concept_ids, num_concepts, axis_name):
    """(loss sum, example count), float32 [num_concepts] each, over every device's examples
    (`axis_name` None: the examples given are every device's already)."""
    onehot = jax.nn.one_hot(concept_ids, num_concepts, dtype=jnp.float32)
    sums = (example_losses @ onehot, onehot.sum(0))
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def train_step(state, frozen, batch, base_key, *, spec, compute, opt_spec, num_concepts=1, loss_spec=LossSpec(),
               axis_name=AXIS):
    """One optimizer step (or, with gradient accumulation, one micro-step) on one device's share,
    or with `axis_name` None on the whole global batch (--shard_weights' program over a mesh, where
    the compiler splits the work): no collective, and the mean over the global batch is the mean
    of the devices' equal shares' means that the pmapped step takes.

    Args:
      state: TrainState (donated by the caller). `state.step` counts optimizer updates: with
        `opt_spec.accumulation_steps` K > 1 it advances on every K-th call only, so the K
        micro-batches of an update share the step's key and differ by example id, exactly as
        one batch K times larger would.
      frozen: Frozen; never donated. Float leaves in `compute.dtype`; its vae may be None when
        batches are LatentBatch.
      batch: PixelBatch (uint8 [B, H, W, 3] images) or LatentBatch (float32 [B, C, h, w] cached
        moments), with input_ids int32 [B, L], example_ids int [B], concept_ids int32 [B]
        (read only when num_concepts > 1), where the family has them time_ids float32 [B, 6] and, exactly when
        `loss_spec.masked`, mask float32 [B, H, W] (with --enable_bucket, [B, h, w] on the latent grid).
      base_key: the run's PRNG key; the step's key is fold_in(base_key, step).
      spec: models.ModelSpec, compute: models.Compute, opt_spec: optim.OptimizerSpec (with
        what follows each update: the rows' norm control and EMA), num_concepts: the run's
        concepts, loss_spec: losses.LossSpec, axis_name: the pmapped axis, or None (all static).
    Returns:
      (new TrainState, metrics dict of scalars averaged over devices ("loss" is the loss optimized,
      under `loss_spec`); with several concepts, also "concept_loss_sum" and "concept_count",
      float32 [num_concepts], summed over devices).
    """
    if loss_spec.masked != (batch.mask is not None):
        raise ValueError(f"masked loss {'on' if loss_spec.masked else 'off'} but the batch has "
                         f"{'a' if batch.mask is not None else 'no'} mask")
    key = jax.random.fold_in(base_key, state.step)
    noisy, timesteps, target = diffusion_inputs(spec, compute, frozen, batch, key, loss_spec)
    lora = opt_spec.lora
    if lora is None:  # the rows alone, as the step has always computed it
        loss_fn, trained, options = diffusion_loss, state.rows, {}
    else:
        loss_fn, trained, options = functools.partial(pivotal_loss, scale=lora.scale), (state.rows, state.lora), {}
    args = (trained, spec, compute, frozen, batch.input_ids, noisy, timesteps, target)
    options = {**options, "time_ids": batch.time_ids, "loss_spec": loss_spec, "mask": batch.mask}
    extra = {}
    if num_concepts == 1:  # the loss alone, as the step has always computed it
        loss, grads = jax.value_and_grad(loss_fn)(*args, **options)
    else:
        (loss, example_losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            *args, per_example=True, **options)
        sums, counts = concept_sums(example_losses, batch.concept_ids, num_concepts, axis_name)
        extra = {"concept_loss_sum": sums, "concept_count": counts}
    if axis_name is not None:
        loss, grads = jax.lax.pmean((loss, grads), axis_name)
    row_grads, lora_grads = (grads, None) if lora is None else grads
    updates, opt_state = opt_spec.build().update(row_grads, state.opt_state, state.rows)
    updated = opt_spec.updated(opt_state)
    step = state.step + jnp.asarray(updated, jnp.int32)
    # The norm control and the EMA, when on, once per optimizer update.
    rows, ema = opt_spec.after_update(optax.apply_updates(state.rows, updates), state.ema, step, updated)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(row_grads),
        "row_norms": jnp.linalg.norm(rows, axis=-1),
        "finite": jnp.isfinite(loss) & jnp.all(jnp.isfinite(row_grads)),
        **extra,
    }
    if lora is None:
        return TrainState(step, rows, opt_state, ema), metrics
    lora_updates, lora_opt_state = opt_spec.build_lora().update(lora_grads, state.lora_opt_state, state.lora)
    factors = optax.apply_updates(state.lora, lora_updates)
    # The pivot: from update `opt_spec.pivot` on, the rows and their EMA stay as they are. Their
    # optimizer state runs on (unapplied): with accumulation its micro-step count says when an
    # update lands, for the LoRA's too.
    learning = state.step < opt_spec.pivot
    rows, ema = jax.tree.map(lambda new, old: jnp.where(learning, new, old), (rows, ema), (state.rows, state.ema))
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(lora_grads)]))
    metrics = {**metrics, "row_norms": jnp.linalg.norm(rows, axis=-1), "finite": metrics["finite"] & finite,
               "lora_grad_norm": optax.tree.norm(lora_grads)}
    return TrainState(step, rows, opt_state, ema, factors, lora_opt_state), metrics


def validation_losses(rows, frozen, batch, timesteps, key, *, spec, compute, guidance=None):
    """Each example's plain (unweighted) mean squared error at the given timesteps: the terms of
    the validation loss. Nothing is differentiated and nothing crosses devices, so an example's
    value depends only on its own inputs and the per-device batch it is computed in.

    Args:
      rows: float32 [num_vectors, row_width], the learned rows. frozen: Frozen.
      batch: PixelBatch or LatentBatch (see train_step); example_ids key each example's noises.
      timesteps: int32 [B]. key: the validation loss's PRNG key (not a step's).
      spec: models.ModelSpec, compute: models.Compute (static).
      guidance: FLUX.1 [dev]'s embedded guidance scale, the training's (--guidance_scale); None:
        the family's default (1.0). The SD families embed none.
    Returns:
      float32 [B].
    """
    noisy, timesteps, target = diffusion_inputs(spec, compute, frozen, batch, key, timesteps=timesteps)
    _, each = diffusion_loss(rows, spec, compute, frozen, batch.input_ids, noisy, timesteps, target,
                             per_example=True, time_ids=batch.time_ids, loss_spec=LossSpec(guidance_scale=guidance))
    return each


@functools.lru_cache(maxsize=16)
def pmapped_validation_losses(spec, compute, devices, guidance=None):
    """validation_losses pmapped over `devices`; it compiles once (ahead, with `compiled_ahead`, or
    on its first call), its arguments always shaped alike."""
    fn = functools.partial(validation_losses, spec=spec, compute=compute, guidance=guidance)
    return jax.pmap(fn, axis_name=AXIS, devices=pmap_devices(devices))


@functools.lru_cache(maxsize=16)
def sharded_validation_losses(spec, compute, devices, guidance=None):
    """validation_losses as one program over `parallel.Sharded(devices)`'s mesh (--shard_weights):
    rows and key with a leading axis of one, batch and timesteps [devices, B, ...]; returns
    float32 [devices, B] split over the devices, as the pmapped one does."""
    fn = functools.partial(validation_losses, spec=spec, compute=compute, guidance=guidance)
    return parallel.mesh_map(fn, devices, (ONE, None, SPLIT, SPLIT, ONE), SPLIT)


def mean_metrics(micro_metrics):
    """One record from the host metrics of an update's micro-steps: loss and gradient norm
    averaged, `finite` only if every micro-step was, row norms after the last; per-concept loss
    sums and counts added up."""
    loss = np.mean([m["loss"] for m in micro_metrics], dtype=np.float32)
    grad_norm = np.mean([m["grad_norm"] for m in micro_metrics], dtype=np.float32)
    finite = all(bool(m["finite"]) for m in micro_metrics)
    summed = {k: np.sum([m[k] for m in micro_metrics], axis=0) for k in ("concept_loss_sum", "concept_count")
              if k in micro_metrics[-1]}
    return {**micro_metrics[-1], "loss": loss, "grad_norm": grad_norm, "finite": finite, **summed}


@functools.lru_cache(maxsize=16)
def pmapped_train_step(spec, compute, opt_spec, devices, num_concepts=1, loss_spec=LossSpec()):
    """train_step pmapped over `devices`, cached (by every static, `loss_spec` too) so repeated
    runs reuse the compiled program."""
    fn = functools.partial(train_step, spec=spec, compute=compute, opt_spec=opt_spec,
                           num_concepts=num_concepts, loss_spec=loss_spec)
    return jax.pmap(fn, axis_name=AXIS, devices=pmap_devices(devices), donate_argnums=(0,))


@functools.lru_cache(maxsize=16)
def sharded_train_step(spec, compute, opt_spec, devices, num_concepts=1, loss_spec=LossSpec()):
    """train_step as one program over `parallel.Sharded(devices)`'s mesh (--shard_weights), on the
    global batch; cached like `pmapped_train_step`. Its arguments are laid out by parallel.Sharded:
    the state and key with a leading axis of one (the state donated), the frozen weights split,
    the batch [devices, per device, ...]; the state and metrics come back with a leading axis of one."""
    fn = functools.partial(train_step, spec=spec, compute=compute, opt_spec=opt_spec,
                           num_concepts=num_concepts, loss_spec=loss_spec, axis_name=None)
    return parallel.mesh_map(fn, devices, (ONE, None, SPLIT, ONE), ONE, donate_argnums=(0,))


def compile_train_step(spec, compute, opt_spec, devices, state, frozen, batch, key, num_concepts=1,
                       loss_spec=LossSpec(), sharded=False):
    """The train step compiled ahead of its first call, for arguments shaped like these.

    Args:
      spec, compute, opt_spec, devices, num_concepts, loss_spec: as for `pmapped_train_step`.
      state, frozen, batch, key: the step's arguments as the run's parallel layout places them:
        arrays, or jax.ShapeDtypeStruct where the arrays are not on the devices yet (with
        `sharded`, the parallel.Sharded shapes, which carry the shardings).
      sharded: the program over the mesh (`sharded_train_step`, --shard_weights), not the pmapped one.
    Returns:
      A callable `(state, frozen, batch, key) -> (state, metrics)` that never traces again: an
      argument of another shape or dtype is a TypeError, not a silent recompile. Cached by the
      step and the arguments' shapes, so a second run with the same settings reuses it. In a
      multi-process run without `sharded`, the pmapped step itself, which compiles on its first call.
    """
    make = sharded_train_step if sharded else pmapped_train_step
    return compiled_ahead(make(spec, compute, opt_spec, devices, num_concepts, loss_spec), state, frozen, batch, key)


def compiled_ahead(step, *args):
    """`step` (a pmapped step, or a parallel.mesh_map one) compiled for arguments shaped like
    `args` (arrays or jax.ShapeDtypeStruct as the layout places them), cached by the function
    and the shapes (and shardings); in a multi-process run a pmapped `step` itself, which
    compiles on its first call."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    # A mesh program's arguments carry their shardings (parallel.Sharded's shapes): global arrays,
    # which compile ahead in any run. A pmapped step's carry none.
    placed = tuple(getattr(x, "sharding", None) for x in leaves)
    if jax.process_count() > 1 and not any(placed):
        # There the pmap spans every process's devices: its ahead-of-time program takes global
        # arrays, not the host-local ones the loop passes (jax's pmap.lower says as much).
        return step
    shapes = tuple((tuple(x.shape), jax.dtypes.canonicalize_dtype(x.dtype), sharding)
                   for x, sharding in zip(leaves, placed))
    return _compiled(step, treedef, shapes)


@functools.lru_cache(maxsize=16)
def _compiled(fn, treedef, shapes):
    # Keyed by the step function itself: after `pmapped_train_step.cache_clear()` a run
    # traces and compiles afresh (the persistent cache may still skip the compile).
    args = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
                                                  for shape, dtype, sharding in shapes])
    return fn.lower(*args).compile()
