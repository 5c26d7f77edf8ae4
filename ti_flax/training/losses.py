"""The loss recipe: how the training noise and timesteps are drawn and how the error is weighed.

`LossSpec` holds the static settings (kohya's and diffusers' flags `--snr_gamma`, `--noise_offset`,
`--loss_type`, `--huber_c`, `--huber_schedule`, `--min_timestep`, `--max_timestep`); it is hashable,
so the compiled step is cached by it, like optim.OptimizerSpec. Its default is the plain
mean squared error over uniform timesteps that the step has always computed. The functions are
the published formulas as pure jnp:

- `snr` / `snr_weights`: diffusers' `training_utils.compute_snr` and the min-SNR-gamma weights of
  its `train_text_to_image.py` (min(snr, gamma) / snr for epsilon, / (snr + 1) for v-prediction);
- `huber_threshold` / `elementwise_loss`: kohya sd-scripts' `get_huber_threshold_if_needed` and
  `conditional_loss` (library/train_util.py), with kohya's `--huber_scale` at its default 1;
- `latent_mask` / `mask_weights`: --masked_loss's mask on the latent grid (the area average of its
  pixels, as kohya's F.interpolate(mode="area"); with --enable_bucket taken once per image on the
  host, `bucket_latent_masks`) and OneTrainer's element weights clamp(mask, unmasked_weight, 1);
- `example_losses`: kohya's order (element loss, the mask's weights, mean over each example,
  the SNR weight), whose batch mean is what the step optimizes and logs. With a mask the mean is
  OneTrainer's normalised one, mean(w * loss) / mean(w): a small subject weighs as much as a large one.

The noise offset (`noise + X * randn(B, C, 1, 1)`, kohya's `apply_noise_offset`) and the timestep
range are drawn per example in step.example_draws.
"""

import dataclasses
import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

from ..errors import UserError


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The loss recipe's static settings; the default is the plain mean squared error.

    Attributes:
      snr_gamma: min-SNR-gamma weighting (diffusers' --snr_gamma); None: off.
      noise_offset: scale of the per-channel offset added to the noise (0: off).
      loss_type: "l2", "huber" or "smooth_l1" (choices.LOSS_TYPES).
      huber_c, huber_schedule: kohya's threshold and its schedule over timesteps; None with l2.
      min_timestep, max_timestep: timesteps are drawn uniformly from [min, max); max None: the
        model's num_train_timesteps.
      masked: --masked_loss: batches carry masks and each example's loss is their weighted mean.
      unmasked_weight: OneTrainer's weight of the background (mask 0); 0 unless masked.
      timestep_sampling, discrete_flow_shift, sigmoid_scale: how a rectified-flow family (FLUX)
        draws each example's noise level (kohya's --timestep_sampling and its two knobs, see
        models/flow_match.py); guidance_scale: FLUX.1 [dev]'s embedded guidance while training.
        All None for a DDPM family (SD), which has no such draws.
    """

    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    loss_type: str = "l2"
    huber_c: Optional[float] = None
    huber_schedule: Optional[str] = None
    min_timestep: int = 0
    max_timestep: Optional[int] = None
    masked: bool = False
    unmasked_weight: float = 0.0
    timestep_sampling: Optional[str] = None
    discrete_flow_shift: Optional[float] = None
    sigmoid_scale: Optional[float] = None
    guidance_scale: Optional[float] = None

    @classmethod
    def from_config(cls, config, num_train_timesteps, flow=False):
        """The spec of a validated TrainConfig for a model trained on `num_train_timesteps` steps;
        `flow`: the model is trained with rectified flow (ModelFamily.flow_matching), whose draws
        --timestep_sampling and its knobs set.

        Settings that change nothing are normalised (the Huber settings under l2, a --max_timestep
        equal to the model's count, the flow settings of a DDPM model), so runs that differ only
        there share one compiled step. Raises UserError when the timestep range does not fit the
        model's schedule.
        """
        high = num_train_timesteps if config.max_timestep is None else config.max_timestep
        if not config.min_timestep < high <= num_train_timesteps:
            raise UserError(
                f"--min_timestep {config.min_timestep} / --max_timestep {high}: this model has "
                f"{num_train_timesteps} training timesteps; pass 0 <= min < max <= {num_train_timesteps}"
            )
        huber = config.loss_type != "l2"
        return cls(
            snr_gamma=None if config.snr_gamma is None else float(config.snr_gamma),
            noise_offset=float(config.noise_offset),
            loss_type=config.loss_type,
            huber_c=float(config.huber_c) if huber else None,
            huber_schedule=config.huber_schedule if huber else None,
            min_timestep=int(config.min_timestep),
            max_timestep=None if high == num_train_timesteps else int(high),
            masked=config.masked,
            unmasked_weight=float(config.unmasked_weight) if config.masked else 0.0,
            **(dict(timestep_sampling=config.timestep_sampling, discrete_flow_shift=float(config.discrete_flow_shift),
                    sigmoid_scale=float(config.sigmoid_scale), guidance_scale=float(config.guidance_scale))
               if flow else {}),
        )

    @property
    def weighted(self):
        """Whether the loss is other than the plain mean squared error of every element."""
        return self.loss_type != "l2" or self.snr_gamma is not None or self.masked

    def timestep_range(self, num_train_timesteps):
        """(low, high): timesteps are drawn from [low, high)."""
        return self.min_timestep, num_train_timesteps if self.max_timestep is None else self.max_timestep

def describe(config, num_train_timesteps=None):
    """The recipe of a TrainConfig in words, for the banner and the model card: "" when every
    setting is off (the plain mean squared error over every timestep). With the model's
    `num_train_timesteps`, a range with only --min_timestep set is shown whole."""
    parts = []
    if config.loss_type != "l2":
        parts.append(f"{config.loss_type} loss (huber_c {config.huber_c:g}, {config.huber_schedule} schedule)")
    if config.snr_gamma is not None:
        parts.append(f"min-SNR gamma {config.snr_gamma:g}")
    if config.noise_offset:
        parts.append(f"noise offset {config.noise_offset:g}")
    if config.masked:
        source = "alpha channels" if config.alpha_mask else f"mask files *{config.mask_suffix}"
        parts.append(f"masked loss from {source}, unmasked weight {config.unmasked_weight:g}")
    high = num_train_timesteps if config.max_timestep is None else config.max_timestep
    if config.max_timestep is not None or config.min_timestep:
        parts.append(f"timesteps from {config.min_timestep}" if high is None
                     else f"timesteps [{config.min_timestep}, {high})")
    return ", ".join(parts)


def check_schedule(loss_spec, alphas_cumprod, prediction_type):
    """UserError when min-SNR weighting would divide by a zero SNR (a zero-terminal-SNR schedule
    trained for epsilon): diffusers' weights are NaN there."""
    if loss_spec.snr_gamma is None or prediction_type != "epsilon":
        return
    low, high = loss_spec.timestep_range(len(alphas_cumprod))
    zero = low + np.flatnonzero(~(np.asarray(alphas_cumprod)[low:high] > 0.0))
    if zero.size:
        raise UserError(
            f"--snr_gamma: this model's noise schedule has zero SNR at timestep {zero[0]}, where min-SNR "
            f"weighting for epsilon prediction divides by zero; pass --max_timestep {zero[0]} or less"
        )


def snr(alphas_cumprod, timesteps):
    """float32 [B]: the signal-to-noise ratio of each timestep, as diffusers' compute_snr."""
    alphas_cumprod = jnp.asarray(alphas_cumprod, jnp.float32)
    alpha = jnp.sqrt(alphas_cumprod)[timesteps]
    sigma = jnp.sqrt(1.0 - alphas_cumprod)[timesteps]
    return (alpha / sigma) ** 2


def snr_weights(gamma, alphas_cumprod, timesteps, prediction_type):
    """float32 [B]: min(snr, gamma) / snr for epsilon, min(snr, gamma) / (snr + 1) for v-prediction."""
    s = snr(alphas_cumprod, timesteps)
    clipped = jnp.minimum(s, jnp.float32(gamma))
    return clipped / s if prediction_type == "epsilon" else clipped / (s + 1.0)


def huber_threshold(loss_spec, alphas_cumprod, timesteps, num_train_timesteps):
    """float32 [B]: kohya's Huber threshold c of each example's timestep.

    constant: huber_c; exponential: exp(-a t) with a = -ln(huber_c) / num_train_timesteps;
    snr: (1 - huber_c) / (1 + sigma)^2 + huber_c with sigma = sqrt((1 - alpha_bar) / alpha_bar)
    (a DDPM schedule's: `alphas_cumprod`).
    """
    c = loss_spec.huber_c
    if loss_spec.huber_schedule == "constant":
        return jnp.full(timesteps.shape, c, jnp.float32)
    if loss_spec.huber_schedule == "exponential":
        rate = -math.log(c) / num_train_timesteps
        return jnp.exp(-rate * timesteps.astype(jnp.float32))
    if loss_spec.huber_schedule == "snr":
        a = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps]
        sigmas = jnp.sqrt((1.0 - a) / a)
        return (1.0 - c) / (1.0 + sigmas) ** 2 + c
    raise ValueError(f"unknown Huber schedule {loss_spec.huber_schedule!r}")


def elementwise_loss(loss_type, pred, target, threshold=None):
    """Each element's loss, as kohya's conditional_loss with reduction "none".

    l2: (p - y)^2; huber: 2c (sqrt((p - y)^2 + c^2) - c); smooth_l1: 2 (sqrt((p - y)^2 + c^2) - c),
    with `threshold` c float32 [B] broadcast over each example.
    """
    error = jnp.square(pred - target)
    if loss_type == "l2":
        return error
    c = threshold.reshape((-1,) + (1,) * (pred.ndim - 1))
    if loss_type == "huber":
        return 2.0 * c * (jnp.sqrt(error + c**2) - c)
    if loss_type == "smooth_l1":
        return 2.0 * (jnp.sqrt(error + c**2) - c)
    raise ValueError(f"unknown loss type {loss_type!r}")


def latent_mask(mask, latent_size):
    """float32 [B, h, w]: pixel masks [B, H, W] averaged over each latent position's H/h x W/w
    block of pixels (torch's F.interpolate(mode="area"), as kohya reduces its masks). A mask
    already on the latent grid ([B, h, w], as --enable_bucket's batches carry) comes back as it is."""
    b, height, width = mask.shape
    h, w = latent_size
    return jnp.mean(mask.astype(jnp.float32).reshape(b, h, height // h, w, width // w), axis=(2, 4))


def bucket_latent_masks(masks, vae_scale_factor):
    """--enable_bucket's masks brought to their buckets' latent grids once, on the host.

    Args:
      masks: a data.Bucketed of float32 [H, W] pixel masks (images.load_image_set's).
      vae_scale_factor: the VAE's downsampling f; every bucket side is a multiple of it.
    Returns:
      The same items in the same buckets, float32 numpy [H / f, W / f]: `latent_mask` of each
      bucket's masks, which the step's own `latent_mask` then leaves as they are.
    """
    f = vae_scale_factor
    return masks.with_arrays([np.array(latent_mask(m, (m.shape[1] // f, m.shape[2] // f))) for m in masks.arrays])


def mask_weights(loss_spec, mask, latent_size):
    """float32 [B, 1, h, w]: each latent position's weight, OneTrainer's clamp(mask, unmasked_weight,
    1) of the latent-grid mask, shared by every channel."""
    return jnp.clip(latent_mask(mask, latent_size), loss_spec.unmasked_weight, 1.0)[:, None]


def example_losses(loss_spec, pred, target, timesteps, alphas_cumprod, prediction_type, mask=None,
                   num_train_timesteps=None):
    """float32 [B]: each example's loss under the recipe (its mean over the batch is the step's loss).

    Args:
      loss_spec: LossSpec. pred, target: float32 [B, C, h, w]. timesteps: int [B] (a flow
        family's: float, t * num_train_timesteps).
      alphas_cumprod: float32 [num_train_timesteps] (a DDPM family's; None for a flow family,
        whose recipe has no min-SNR weights or SNR-scheduled Huber threshold).
      prediction_type: "epsilon" or "v_prediction" (what min-SNR weights divide by).
      num_train_timesteps: the schedule's length (default: len(alphas_cumprod)).
      mask: with loss_spec.masked, float32 [B, H, W] pixel masks (or [B, h, w] on the latent
        grid): each example's loss is then mean(w * loss) / mean(w) with w = mask_weights (the
        mean over every element).
    """
    count = len(alphas_cumprod) if num_train_timesteps is None else num_train_timesteps
    threshold = None if loss_spec.loss_type == "l2" else huber_threshold(loss_spec, alphas_cumprod, timesteps, count)
    element = elementwise_loss(loss_spec.loss_type, pred, target, threshold)
    axes = tuple(range(1, element.ndim))
    if loss_spec.masked:
        weights = mask_weights(loss_spec, mask, element.shape[2:])
        losses = jnp.mean(element * weights, axis=axes) / jnp.mean(weights, axis=axes)
    else:
        losses = jnp.mean(element, axis=axes)
    if loss_spec.snr_gamma is not None:
        losses = losses * snr_weights(loss_spec.snr_gamma, alphas_cumprod, timesteps, prediction_type)
    return losses
