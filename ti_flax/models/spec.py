"""What a model is (`ModelSpec`) and how a run computes with it (`Compute`), kept apart; a
loaded model (`LoadedModel`) is a spec with its weights, tokenizer(s) and noise table.

Both are frozen and hashable, so a compiled program can be cached by them and take them as
static arguments. A spec comes from the model's configs alone; a Compute from a run's flags
(`run.model_compute`: models never read the run's config). The checkpoint fingerprint hashes
the spec only, so a run may change its dtype, attention or remat and still resume.
"""

import dataclasses
from typing import Any, Optional

import numpy as np

from .clip import CLIPTextConfig
from .vae import VAEConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything static about a model's architecture and training objective.

    The configs are the owned config objects (frozen and hashable, as a jit static argument needs),
    so a spec, and the checkpoint fingerprint made from it, depends on no library.
    """

    text: CLIPTextConfig
    denoiser: Any  # the denoiser's config: unet.UNetConfig, or flux.FluxConfig
    vae: VAEConfig
    prediction_type: str
    scaling_factor: float
    num_train_timesteps: int
    base_vocab_size: int
    # A second text encoder's config (SDXL's bigG: a CLIPTextConfig; FLUX's T5: a t5.T5Config). For
    # SDXL the two token ids that turn the first tokenizer's ids into the second's (they share the
    # vocabulary and differ in padding only).
    text_2: Optional[Any] = None
    eos_token_id: int = -1
    pad_token_id_2: int = -1
    # The model family (a families.get name): what differs between families is asked of it.
    # Not part of the checkpoint fingerprint, which the configs already tell apart.
    family: str = ""
    # The second tokenizer's length where its vocabulary is its own (FLUX's T5: learned ids start
    # there); -1 where the encoders share the first's (SDXL).
    base_vocab_size_2: int = -1

    @property
    def text_configs(self):
        """Each text encoder's config, in row order."""
        return (self.text,) + ((self.text_2,) if self.text_2 else ())

    @property
    def hidden_size(self):
        """The (first) text encoder's width."""
        return self.text.hidden_size

    @property
    def text_widths(self):
        """Each text encoder's width: (768,) for SD 1.x, (768, 1280) for SDXL."""
        return tuple(config.hidden_size for config in self.text_configs)

    @property
    def vocab_bases(self):
        """Each tokenizer's length before any placeholder (where its learned ids start), in row order."""
        bases = (self.base_vocab_size,) * len(self.text_configs)
        return bases if self.base_vocab_size_2 < 0 else (self.base_vocab_size, self.base_vocab_size_2)

    @property
    def row_width(self):
        """Width of a learned row: the text encoders' widths side by side (768 + 1280 for SDXL)."""
        return sum(self.text_widths)

    @property
    def vae_scale_factor(self):
        return self.vae.scale_factor

    @property
    def pixel_multiple(self):
        """Image sides must be multiples of this, so every downsampling of the latents (the VAE's
        factor, then the denoiser's: each UNet down block, FLUX's 2x2 packing) divides evenly."""
        return self.vae_scale_factor * self.denoiser.latent_multiple


@dataclasses.dataclass(frozen=True)
class Compute:
    """How the frozen modules run: nothing here changes what the model is.

    Attributes:
      dtype: compute dtype of the frozen modules ("bfloat16" for --mixed_precision bf16).
      attention: an attention.IMPLEMENTATIONS name, resolved per call site by shape.
      remat: rematerialise the UNet's blocks in the backward pass (--gradient_checkpointing).
      backend: the platform the program is traced for, which "auto" attention resolves against:
        None (every run) means jax.default_backend(); `ti_flax.plan` sets "tpu" to compile a
        TPU's program on a machine without one.
    """

    dtype: str = "float32"
    attention: str = "auto"
    remat: bool = False
    backend: Optional[str] = None


@dataclasses.dataclass
class LoadedModel:
    """A loaded Stable Diffusion model: static spec, host-side weights, tokenizer(s), noise table."""

    spec: ModelSpec
    params: dict  # {"text_encoder": ..., "unet": ..., "vae": ...} (+ "text_encoder_2" for SDXL), float32 numpy
    tokenizer: object  # transformers.CLIPTokenizer
    alphas_cumprod: np.ndarray  # [num_train_timesteps] float32
    model_dir: str
    scheduler_config: dict
    tokenizer_2: object = None  # SDXL's second tokenizer ("!" padding), else None
    notes: tuple = ()  # settings a single file's marker tensors chose (single_file.markers), for the banner

    @property
    def tokenizers(self):
        """Every tokenizer of the model: a placeholder token goes into each."""
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)


def spec_from(text, denoiser_config, vae_config, prediction_type="epsilon", num_train_timesteps=1000, text_2=None,
              eos_token_id=-1, pad_token_id_2=-1, *, family, base_vocab_size_2=-1):
    """A ModelSpec from the owned config objects (clip.CLIPTextConfig, the denoiser's unet.UNetConfig
    or flux.FluxConfig, vae.VAEConfig).

    `family` is the model family's name (families.get). With a second text encoder, `text_2` is
    its config; for SDXL's, `eos_token_id` the first tokenizer's end-of-text id and `pad_token_id_2`
    the second tokenizer's padding id; for FLUX's T5, `base_vocab_size_2` its tokenizer's length.
    """
    second = {}
    if text_2 is not None:
        second = dict(text_2=text_2, eos_token_id=int(eos_token_id), pad_token_id_2=int(pad_token_id_2),
                      base_vocab_size_2=int(base_vocab_size_2))
    return ModelSpec(
        text=text,
        denoiser=denoiser_config,
        vae=vae_config,
        prediction_type=prediction_type,
        scaling_factor=float(vae_config.scaling_factor),
        num_train_timesteps=int(num_train_timesteps),
        base_vocab_size=int(text.vocab_size),
        family=family,
        **second,
    )


def default_size(spec):
    """(height, width) the model was trained at: UNet sample_size x VAE scale factor."""
    size = spec.denoiser.sample_size
    size = size if isinstance(size, (list, tuple)) else (size, size)
    return tuple(int(side or 64) * spec.vae_scale_factor for side in size[:2])

