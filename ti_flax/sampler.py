"""Text-to-image sampling with learned rows, compiled once and reused.

`Sampler` is built once for fixed settings (steps, size, scheduler, number of images,
devices). Its compiled program is the pure, module-level `sample_step`: the frozen text
encoder, UNet and VAE weights are replicated on the local devices once and passed in as
arguments, and the learned rows, prompts, seed and guidance scale are arguments too, so
sampling with new rows (a validation during training) never recompiles anything.

    >>> sampler = Sampler.from_model(model, num_images=4, num_inference_steps=25)  # doctest: +SKIP
    >>> ids = encode_prompt(model.tokenizer, "a photo of <cat-toy>", [["<cat-toy>"]])  # doctest: +SKIP
    >>> images = sampler.sample(rows, ids, encode_prompt(model.tokenizer, ""), seed=0)  # doctest: +SKIP
"""

import dataclasses
import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from . import models, parallel
from .errors import UserError
from .step import Frozen
from .models import schedulers
from .tokens import expand_placeholders

SCHEDULERS = schedulers.SAMPLERS

# Learned rows are padded to a multiple of this many, so embeddings of different lengths
# (1 to 8 vectors, or several embeddings together) share one compiled program.
ROW_BUCKET = 8

# Traces of sample_step, counted so tests can assert that sampling compiles once.
TRACE_COUNT = {"sample": 0}


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """What the compiled program depends on besides argument shapes (hashable, for caching)."""

    spec: models.ModelSpec
    compute: models.Compute
    scheduler: str  # one of SCHEDULERS
    scheduler_config: str  # the model's scheduler config as sorted JSON
    num_inference_steps: int
    height: int
    width: int


@functools.lru_cache(maxsize=None)
def _plan(name, scheduler_config_json, num_inference_steps):
    """The sampler's static plan (timesteps and coefficients); UserError if it cannot run."""
    return schedulers.plan(name, json.loads(scheduler_config_json), num_inference_steps)


def check_size(spec, height, width):
    """Raise UserError unless `height` x `width` pixels is a size the model can sample."""
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise UserError(f"--height/--width {height}x{width}: both must be positive multiples of 8")
    multiple = spec.pixel_multiple
    if height % multiple or width % multiple:
        raise UserError(f"--height/--width {height}x{width}: this model needs multiples of {multiple}")


def encode_prompt(tokenizer, prompt, concepts=()):
    """Token ids of `prompt`, padded to the tokenizer's max length as diffusers pads them.

    Args:
      tokenizer: a CLIP tokenizer that already holds the concepts' tokens.
      prompt: the text.
      concepts: token lists such as [["<cat>", "<cat>_1", "<cat>_2"]]. A concept's first token in
        the prompt stands for all of them, as in diffusers' `maybe_convert_prompt`
        ("<cat>" -> "<cat> <cat>_1 <cat>_2"); a prompt that already spells them out is kept.
    Returns:
      int32 [model_max_length]: BOS, the prompt's ids (cut to fit, with a warning), EOS, padding.
    """
    groups = [tokenizer.convert_tokens_to_ids(list(tokens)) for tokens in concepts]
    expanded = expand_placeholders(tokenizer(prompt, add_special_tokens=False).input_ids, groups)
    length = tokenizer.model_max_length
    if len(expanded) > length - 2:
        warnings.warn(f"prompt {prompt!r} is {len(expanded)} tokens long; only the first {length - 2} are used")
    body = [tokenizer.bos_token_id] + expanded[: length - 2] + [tokenizer.eos_token_id]
    return np.asarray(body + [tokenizer.pad_token_id] * (length - len(body)), dtype=np.int32)


def image_noise(key, image_ids, shape):
    """Initial latents [B, *shape]: image i's noise comes from fold_in(key, i) alone."""
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(jnp.asarray(image_ids))


def denoise(frozen, rows, prompt_ids, negative_ids, noise, guidance_scale, *, settings):
    """The scheduler's loop from starting noise to final latents, with classifier-free guidance.

    Args:
      frozen: step.Frozen (text_encoder and unet are read).
      rows: float32 [R, hidden] learned rows; token id base_vocab_size + i reads rows[i].
      prompt_ids, negative_ids: int32 [B, L] token ids of the prompts and negative prompts.
      noise: float32 [B, C, h, w] standard normal starting latents (scaled here by the
        scheduler's init_noise_sigma, as diffusers' pipelines scale given latents).
      guidance_scale: float32 scalar. settings: SamplerSettings (static).
    Returns:
      float32 [B, C, h, w] latents, as diffusers' pipelines return with output_type="latent".
    """
    spec, compute = settings.spec, settings.compute
    plan = _plan(settings.scheduler, settings.scheduler_config, settings.num_inference_steps)
    batch = prompt_ids.shape[0]
    # Negative and positive prompts go through each model in one batch: [uncond, cond].
    context = models.encode_text(spec, compute, frozen.text_encoder, jnp.concatenate([negative_ids, prompt_ids]), rows)
    latents = noise * schedulers.init_noise_sigma(plan)
    # The plan's few small tables are constants of the program.
    timesteps_table = jnp.asarray(plan.timesteps, jnp.float32)

    def step(i, carry):
        latents, state = carry
        x = schedulers.scale_model_input(plan, jnp.concatenate([latents, latents]), i)
        timesteps = jnp.broadcast_to(timesteps_table[i], (2 * batch,))
        pred = models.predict_noise(spec, compute, frozen.unet, x.astype(context.dtype), timesteps, context)
        uncond, cond = jnp.split(pred.astype(jnp.float32), 2)
        guided = uncond + guidance_scale * (cond - uncond)
        return schedulers.step(plan, state, guided, i, latents)

    # PNDM calls the model num_inference_steps + 1 times (its warm-up), as diffusers' PyTorch pipeline.
    latents, _ = jax.lax.fori_loop(0, plan.num_steps, step, (latents, schedulers.init_state(plan, latents)))
    return latents


def sample_step(frozen, rows, prompt_ids, negative_ids, image_ids, key, guidance_scale, *, settings):
    """Images for one device's share of the prompts (pure; compile it with pmap).

    Args:
      frozen: step.Frozen (its alphas_cumprod is not read).
      rows: float32 [R, hidden] learned rows; token id base_vocab_size + i reads rows[i].
      prompt_ids, negative_ids: int32 [B, L] token ids of the prompts and negative prompts.
      image_ids: int32 [B] each image's index in the whole batch; its noise is keyed by it,
        so an image does not depend on the number of devices.
      key: the PRNG key of the seed. guidance_scale: float32 scalar (classifier-free guidance).
      settings: SamplerSettings (static).
    Returns:
      uint8 [B, height, width, 3].
    """
    TRACE_COUNT["sample"] += 1
    spec, compute = settings.spec, settings.compute
    noise = image_noise(key, image_ids, latent_shape(settings))
    latents = denoise(frozen, rows, prompt_ids, negative_ids, noise, guidance_scale, settings=settings)
    pixels = models.decode_latents(spec, compute, frozen.vae, latents.astype(compute.dtype)).astype(jnp.float32)
    pixels = jnp.round(jnp.clip(pixels / 2 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    return jnp.transpose(pixels, (0, 2, 3, 1))


def latent_shape(settings):
    """[C, h, w] of one image's latents."""
    scale = settings.spec.vae_scale_factor
    channels = models.configs(settings.spec).unet.in_channels
    return (channels, settings.height // scale, settings.width // scale)


@functools.lru_cache(maxsize=16)
def pmapped_sample_step(settings, devices):
    """sample_step pmapped over `devices`, cached so every Sampler with these settings shares it.

    rows, key and guidance_scale are broadcast (in_axes None); the rest is split by device.
    """
    fn = functools.partial(sample_step, settings=settings)
    return jax.pmap(fn, axis_name=parallel.AXIS, in_axes=(0, None, 0, 0, 0, None, None), devices=devices)


class Sampler:
    """Stable Diffusion text-to-image for fixed settings, compiled on first use and reused.

    Args:
      spec: models.ModelSpec. params: {"text_encoder", "unet", "vae"} host params, or (with
        params_replicated=True) a step.Frozen already replicated by parallel.replicate on
        `devices`, such as the train engine's, so the weights are not held twice.
      scheduler_config: the model's scheduler config (LoadedModel.scheduler_config).
      num_images: images per call (padded up to a multiple of the device count; extras dropped).
      num_inference_steps, guidance_scale, height, width, scheduler: sampling settings; height and
        width default to the model's native size.
      devices: the local devices to split images over (default: all local devices).
      compute: models.Compute (default: float32, auto attention).
    """

    def __init__(self, spec, params, scheduler_config, *, num_images=None, num_inference_steps=25,
                 guidance_scale=7.5, height=None, width=None, scheduler="pndm", devices=None,
                 params_replicated=False, compute=None):
        self.devices = tuple(devices or jax.local_devices())
        default_h, default_w = models.default_size(spec)
        self.height, self.width = height or default_h, width or default_w
        check_size(spec, self.height, self.width)
        if not 1 <= num_inference_steps <= spec.num_train_timesteps:
            raise UserError(f"--steps {num_inference_steps}: must be between 1 and {spec.num_train_timesteps}")
        config_json = json.dumps(dict(scheduler_config), sort_keys=True, default=str)
        _plan(scheduler, config_json, int(num_inference_steps))  # UserError for an unknown or unusable scheduler
        self.settings = SamplerSettings(spec, compute or models.Compute(), scheduler, config_json,
                                        int(num_inference_steps), self.height, self.width)
        self.num_images = int(num_images or len(self.devices))
        if self.num_images < 1:
            raise UserError(f"--num_images {num_images}: must be at least 1")
        self.guidance_scale = float(guidance_scale)
        n = len(self.devices)
        self.per_device = -(-self.num_images // n)
        if params_replicated:
            self.frozen = params
        else:
            self.frozen = parallel.replicate(Frozen(params["text_encoder"], params["unet"], params["vae"], None),
                                             self.devices)
        self._fn = pmapped_sample_step(self.settings, self.devices)

    @classmethod
    def from_model(cls, model, **kwargs):
        """A Sampler for a models.LoadedModel."""
        return cls(model.spec, model.params, model.scheduler_config, **kwargs)

    def _per_device(self, ids, name):
        ids = np.asarray(ids, dtype=np.int32)
        if ids.ndim == 1:
            ids = np.broadcast_to(ids, (self.num_images, ids.shape[0]))
        if ids.ndim != 2 or ids.shape[0] != self.num_images:
            raise ValueError(f"{name}: expected [L] or [{self.num_images}, L] token ids, got shape {ids.shape}")
        total = self.per_device * len(self.devices)
        ids = np.concatenate([ids, np.repeat(ids[-1:], total - self.num_images, axis=0)])  # pads are dropped
        return ids.reshape(len(self.devices), self.per_device, -1)

    def sample(self, rows, prompt_ids, negative_ids, seed=0, guidance_scale=None):
        """Generate `num_images` images.

        Args:
          rows: float32 [N, hidden] learned rows (N may be 0); ids base_vocab_size + i read rows[i].
          prompt_ids, negative_ids: int32 [L] (one prompt for all images) or [num_images, L],
            from encode_prompt.
          seed: images depend only on (seed, image index, rows, prompts, settings).
          guidance_scale: overrides the Sampler's (no recompilation).
        Returns:
          uint8 [num_images, height, width, 3].
        """
        if not 0 <= seed < 2**32:
            raise UserError(f"--seed {seed}: must be between 0 and {2**32 - 1}")
        hidden = self.settings.spec.hidden_size
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != hidden:
            # A replicated [devices, N, D] copy from a pmapped state must be unreplicated first.
            raise ValueError(f"rows: expected [num_rows, {hidden}], got shape {rows.shape}")
        bucket = max(ROW_BUCKET, -(-rows.shape[0] // ROW_BUCKET) * ROW_BUCKET)
        rows = np.concatenate([rows, np.zeros((bucket - rows.shape[0], hidden), np.float32)])
        prompt_ids = self._per_device(prompt_ids, "prompt_ids")
        negative_ids = self._per_device(negative_ids, "negative_ids")
        image_ids = np.arange(prompt_ids.shape[0] * self.per_device, dtype=np.int32).reshape(prompt_ids.shape[:2])
        key = np.asarray(jax.random.key_data(jax.random.key(seed)))
        scale = np.float32(self.guidance_scale if guidance_scale is None else guidance_scale)
        images = self._fn(self.frozen, rows, prompt_ids, negative_ids, image_ids, key, scale)
        images = np.asarray(images)
        return images.reshape((-1,) + images.shape[2:])[: self.num_images]
