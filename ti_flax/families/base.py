"""What every model family shares: the frozen weights a compiled program reads (`Frozen`)."""

from typing import Any, NamedTuple

import jax
import numpy as np

from .. import models


class Frozen(NamedTuple):
    """The weights the step reads and never changes (a pytree; never donated).

    Attributes:
      text_encoder, unet: params trees, float leaves in the run's compute dtype.
      vae: params tree, or None when batches carry cached latents (the step never encodes).
      alphas_cumprod: float32 [num_train_timesteps], the training noise schedule.
      text_encoder_2: SDXL's second text encoder's params tree; None for one text encoder.
    """

    text_encoder: Any
    unet: Any
    vae: Any
    alphas_cumprod: Any
    text_encoder_2: Any = None

    @classmethod
    def from_model(cls, model, dtype="float32", abstract=False):
        """Host weights of a models.LoadedModel, float leaves cast to `dtype` (the schedule stays float32);
        with abstract=True, their jax.ShapeDtypeStruct (nothing cast: see models.cast_params)."""
        params = models.cast_params(model.params, dtype, abstract)
        schedule = model.alphas_cumprod
        if abstract:
            schedule = jax.ShapeDtypeStruct(np.shape(schedule), np.asarray(schedule).dtype)
        return cls(params["text_encoder"], params["unet"], params["vae"], schedule, params.get("text_encoder_2"))

    @property
    def text_params(self):
        """What models.condition takes: the text encoder's params, or SDXL's pair."""
        return self.text_encoder if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)
