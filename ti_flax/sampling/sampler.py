"""Text-to-image sampling with learned rows, compiled once and reused.

`Sampler` is built once for fixed settings (steps, size, scheduler, number of images,
devices). Its compiled program is the pure, module-level `sample_step`: the frozen text
encoder, UNet and VAE weights are replicated on the local devices once and passed in as
arguments, and the learned rows, prompts, seed and guidance scale are arguments too, so
sampling with new rows (a validation during training) never recompiles anything.

What a model conditions on is its family's (`ModelFamily.condition`, `sampling_condition`): SDXL's
program adds the pooled text embedding and size/crop ids, as diffusers' StableDiffusionXLPipeline
does by default, and an empty negative prompt is all zeros there (its
`force_zeros_for_empty_prompt`) and here too.

    >>> from ti_flax.data.prompts import CUT, encode_prompt  # doctest: +SKIP
    >>> sampler = Sampler.from_model(model, num_images=4, num_inference_steps=25)  # doctest: +SKIP
    >>> ids = encode_prompt(model.tokenizer, "a photo of <cat-toy>", [["<cat-toy>"]], overflow=CUT)  # doctest: +SKIP
    >>> neg = encode_prompt(model.tokenizer, "", overflow=CUT)  # doctest: +SKIP
    >>> images = sampler.sample(rows, ids, neg, seed=0)  # doctest: +SKIP
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from .. import families, models, parallel
from ..errors import UserError
from ..families import Frozen
from ..models import schedulers

SCHEDULERS = schedulers.SAMPLERS

# Learned rows are padded to a multiple of this many, so embeddings of different lengths
# (1 to 8 vectors, or several embeddings together) share one compiled program.
ROW_BUCKET = 8


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
    # An empty negative prompt conditions on zeros, not on the encoded empty text, where the family
    # says so (ModelFamily.zero_empty_negative: SDXL's force_zeros_for_empty_prompt).
    zero_empty_negative: bool = False


@functools.lru_cache(maxsize=None)
def _plan(settings):
    """The sampler's static plan (timesteps and coefficients: ModelFamily.sampling_plan); UserError
    if it cannot run."""
    return families.of(settings.spec).sampling_plan(settings.scheduler, json.loads(settings.scheduler_config),
                                                    settings.num_inference_steps, latent_shape(settings)[1:])


def default_scheduler(spec, scheduler_config):
    """The sampler used when none is chosen: the model family's (ModelFamily.default_sampler)."""
    return families.of(spec).default_sampler(spec, scheduler_config)


def check_size(spec, height, width, flag="--height/--width"):
    """Raise UserError (naming `flag`) unless `height` x `width` pixels is a size the model can sample."""
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise UserError(f"{flag} {height}x{width}: both must be positive multiples of 8")
    multiple = spec.pixel_multiple
    if height % multiple or width % multiple:
        raise UserError(f"{flag} {height}x{width}: this model needs multiples of {multiple}")


def image_noise(key, image_ids, shape):
    """Initial latents [B, *shape]: image i's noise comes from fold_in(key, i) alone."""
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(jnp.asarray(image_ids))


def denoise(frozen, rows, prompt_ids, negative_ids, noise, guidance_scale, *, settings):
    """The family's sampling loop from starting noise to final latents (ModelFamily.denoise).

    Args:
      frozen: Frozen (its text encoder(s) and denoiser are read).
      rows: float32 [R, spec.row_width] learned rows; token id base_vocab_size + i reads rows[i]
        (for SDXL in both encoders: each row is the CLIP-L row and the bigG row side by side).
      prompt_ids, negative_ids: int32 [B, L] token ids of the prompts and negative prompts.
      noise: float32 [B, C, h, w] standard normal starting latents.
      guidance_scale: float32 scalar. settings: SamplerSettings (static).
    Returns:
      float32 [B, C, h, w] latents, as diffusers' pipelines return with output_type="latent".
    """
    family = families.of(settings.spec)
    return family.denoise(frozen, rows, prompt_ids, negative_ids, noise, guidance_scale, settings,
                          _plan(settings))


def sample_step(frozen, rows, prompt_ids, negative_ids, image_ids, key, guidance_scale, *, settings):
    """Images for one device's share of the prompts (pure; compile it with pmap).

    Args:
      frozen: Frozen (its alphas_cumprod is not read).
      rows: float32 [R, spec.row_width] learned rows; token id base_vocab_size + i reads rows[i].
      prompt_ids, negative_ids: int32 [B, L] token ids of the prompts and negative prompts.
      image_ids: int32 [B] each image's index in the whole batch; its noise is keyed by it,
        so an image does not depend on the number of devices.
      key: the PRNG key of the seed. guidance_scale: float32 scalar (classifier-free guidance).
      settings: SamplerSettings (static).
    Returns:
      uint8 [B, height, width, 3].
    """
    spec, compute = settings.spec, settings.compute
    noise = image_noise(key, image_ids, latent_shape(settings))
    latents = denoise(frozen, rows, prompt_ids, negative_ids, noise, guidance_scale, settings=settings)
    pixels = families.of(spec).decode(spec, compute, frozen.vae, latents.astype(compute.dtype)).astype(jnp.float32)
    pixels = jnp.round(jnp.clip(pixels / 2 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    return jnp.transpose(pixels, (0, 2, 3, 1))


def latent_shape(settings):
    """[C, h, w] of one image's latents."""
    scale = settings.spec.vae_scale_factor
    return (settings.spec.vae.latent_channels, settings.height // scale, settings.width // scale)


@functools.lru_cache(maxsize=16)
def pmapped_sample_step(settings, devices):
    """sample_step pmapped over `devices`, cached so every Sampler with these settings shares it.

    rows, key and guidance_scale are broadcast (in_axes None); the rest is split by device.
    """
    fn = functools.partial(sample_step, settings=settings)
    return jax.pmap(fn, axis_name=parallel.AXIS, in_axes=(0, None, 0, 0, 0, None, None), devices=devices)


@functools.lru_cache(maxsize=16)
def sharded_sample_step(settings, devices):
    """sample_step as one program over `parallel.Sharded(devices)`'s mesh, for frozen weights split
    over it (the train engine's with --shard_weights); cached like `pmapped_sample_step`.

    rows, key and guidance_scale come with a leading axis of one; the prompts and image ids
    [devices, per device, ...], and so do the images returned.
    """
    fn = functools.partial(sample_step, settings=settings)
    one, split = parallel.ONE, parallel.SPLIT
    return parallel.mesh_map(fn, devices, (None, one, split, split, split, one, one), split)


class Sampler:
    """Stable Diffusion text-to-image for fixed settings, compiled on first use and reused.

    Args:
      spec: models.ModelSpec. params: {"text_encoder", "unet", "vae"} (+ "text_encoder_2" for a
        second encoder) host params, or (with params_replicated=True) a Frozen already on `devices`
        as `layout` placed it, such as the train engine's, so the weights are not held twice.
      scheduler_config: the model's scheduler config (LoadedModel.scheduler_config).
      num_images: images per call (padded up to a multiple of the device count; extras dropped).
      num_inference_steps, guidance_scale, height, width, scheduler: sampling settings; height and
        width default to the model's native size, scheduler to default_scheduler's choice.
      devices: the local devices to split images over (default: all local devices).
      compute: models.Compute (default: float32, auto attention).
      zero_empty_negative: an empty negative prompt conditions on zeros, where the family has such
        a choice (SDXL: from_model reads the folder's, ModelFamily.zero_empty_negative). Default:
        what the family does for a model without one (SDXL: True, as diffusers' SDXL pipelines).
      layout: with params_replicated, the parallel layout that placed `params` (default
        parallel.Replicated: sampled pmapped); a parallel.Sharded one (the train engine's with
        --shard_weights) samples with one program over its mesh, every process taking part.
    """

    def __init__(self, spec, params, scheduler_config, *, num_images=None, num_inference_steps=25,
                 guidance_scale=7.5, height=None, width=None, scheduler=None, devices=None,
                 params_replicated=False, compute=None, zero_empty_negative=None, layout=None):
        self.devices = tuple(devices or jax.local_devices())
        self.layout = layout if params_replicated and layout is not None else parallel.Replicated(self.devices)
        family = families.of(spec)
        default_h, default_w = family.default_size(spec)
        self.height, self.width = height or default_h, width or default_w
        check_size(spec, self.height, self.width)
        if not 1 <= num_inference_steps <= spec.num_train_timesteps:
            raise UserError(f"--steps {num_inference_steps}: must be between 1 and {spec.num_train_timesteps}")
        scheduler = scheduler or default_scheduler(spec, scheduler_config)
        config_json = json.dumps(dict(scheduler_config), sort_keys=True, default=str)
        if zero_empty_negative is None:
            zero_empty_negative = family.zero_empty_negative(None)
        zero_empty_negative = bool(zero_empty_negative)
        self.settings = SamplerSettings(spec, compute or models.Compute(), scheduler, config_json,
                                        int(num_inference_steps), self.height, self.width, zero_empty_negative)
        _plan(self.settings)  # UserError for an unknown or unusable scheduler
        self.num_images = int(num_images or len(self.devices))
        if self.num_images < 1:
            raise UserError(f"--num_images {num_images}: must be at least 1")
        self.guidance_scale = float(guidance_scale)
        n = len(self.devices)
        self.per_device = -(-self.num_images // n)
        if params_replicated:
            # The noise schedule is not read: without it the engine's weights and a model's own
            # make the same program, so generating after a validation compiles nothing new.
            self.frozen = params._replace(alphas_cumprod=None)
        else:
            self.frozen = parallel.replicate(Frozen(params["text_encoder"], params[spec.denoiser.FOLDER], params["vae"], None,
                                                    params.get("text_encoder_2")), self.devices)
        make = sharded_sample_step if self.layout.sharded else pmapped_sample_step
        self._fn = make(self.settings, self.devices)

    @classmethod
    def from_model(cls, model, **kwargs):
        """A Sampler for a models.LoadedModel (its family's zero_empty_negative read from the model)."""
        kwargs.setdefault("zero_empty_negative", families.of(model.spec).zero_empty_negative(model))
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

    def sample(self, rows, prompt_ids, negative_ids, seed=0, guidance_scale=None, lora=None):
        """Generate `num_images` images.

        Args:
          rows: float32 [N, spec.row_width] learned rows (N may be 0); ids base_vocab_size + i read
            rows[i] (for SDXL the CLIP-L row and the bigG row side by side).
          prompt_ids, negative_ids: int32 [L] (one prompt for all images) or [num_images, L],
            from prompts.encode_prompt.
          seed: images depend only on (seed, image index, rows, prompts, settings).
          guidance_scale: overrides the Sampler's (no recompilation).
          lora: (factors, scale): a LoRA of the denoiser (models/lora.py's host factors, lora_B
            scaled by `scale` when attached), or None. The program compiles once with a LoRA
            and once without.
        Returns:
          uint8 [num_images, height, width, 3].
        """
        if not 0 <= seed < 2**32:
            raise UserError(f"--seed {seed}: must be between 0 and {2**32 - 1}")
        width = self.settings.spec.row_width
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != width:
            # A replicated [devices, N, D] copy from a pmapped state must be unreplicated first.
            raise ValueError(f"rows: expected [num_rows, {width}], got shape {rows.shape}")
        bucket = max(ROW_BUCKET, -(-rows.shape[0] // ROW_BUCKET) * ROW_BUCKET)
        rows = np.concatenate([rows, np.zeros((bucket - rows.shape[0], width), np.float32)])
        prompt_ids = self._per_device(prompt_ids, "prompt_ids")
        negative_ids = self._per_device(negative_ids, "negative_ids")
        image_ids = np.arange(prompt_ids.shape[0] * self.per_device, dtype=np.int32).reshape(prompt_ids.shape[:2])
        key = np.asarray(jax.random.key_data(jax.random.key(seed)))
        scale = np.float32(self.guidance_scale if guidance_scale is None else guidance_scale)
        frozen = self.frozen
        if lora is not None:
            factors, factor_scale = lora
            scaled = {m: {"lora_A": np.asarray(p["lora_A"], np.float32),
                          "lora_B": np.asarray(p["lora_B"], np.float32) * np.float32(factor_scale)}
                      for m, p in factors.items()}
            frozen = frozen.with_lora(self.layout.weights(scaled), 1.0)
        if self.layout.sharded:  # every process gives the same prompts as its slices, and reads its own
            one, split = self.layout.state, self.layout.batch
            images = self._fn(frozen, one(rows), split(prompt_ids), split(negative_ids), split(image_ids), one(key),
                              one(scale))
            images = parallel.local_rows(images)
        else:
            images = self._fn(frozen, rows, prompt_ids, negative_ids, image_ids, key, scale)
            images = np.asarray(images)
        return images.reshape((-1,) + images.shape[2:])[: self.num_images]
