"""What every model family has: the interface the rest of ti_flax asks (`ModelFamily`), its text
encoders (`TextEncoder`), and the frozen weights a compiled program reads (`Frozen`).

A family is one object. Loading, the train step, the sampler, the planner, the model card, the
exporter's check in PyTorch and the full-pipeline writer ask it what differs between families
(which encoders, which conditioning, which files), and none of them tests which family it has.
`families/__init__.py` registers the families; `of(spec)` is a model's.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

from .. import models


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family, as the files that hold it name it.

    Attributes:
      part: its params key and folder in a diffusers model: "text_encoder", "text_encoder_2".
      tokenizer: its tokenizer's folder: "tokenizer", "tokenizer_2".
      key: the key of its rows in a file holding several encoders' rows (kohya's, A1111's and
        ComfyUI's `{"clip_l": ..., "clip_g": ...}`); "" for a family of one encoder.
      title: how messages and the model card name it, e.g. "CLIP ViT-L".
    """

    part: str
    tokenizer: str
    key: str
    title: str


class Frozen(NamedTuple):
    """The weights the step reads and never changes (a pytree; never donated).

    Attributes:
      text_encoder, unet: params trees, float leaves in the run's compute dtype.
      vae: params tree, or None when batches carry cached latents (the step never encodes).
      alphas_cumprod: float32 [num_train_timesteps], the training noise schedule.
      text_encoder_2: a second text encoder's params tree (SDXL's); None for one text encoder.
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
        """Every text encoder's params, in the family's order: what `ModelFamily.condition` takes."""
        return tuple(p for p in (self.text_encoder, self.text_encoder_2) if p is not None)


class ModelFamily:
    """A model family: what the rest of ti_flax asks about a model instead of testing its kind.

    Attributes (set by each family):
      name: the registry key and `ModelSpec.family`, e.g. "sd1", "sdxl".
      title: for messages, the banner and `plan`, e.g. "SD 1.x".
      encoders: its TextEncoder tuple, in row order (a learned row is each encoder's part side by
        side: tokens.join_rows).
      time_ids: whether each example carries size-and-crop ids (SDXL's added conditioning).
      pipeline_class: the diffusers pipeline class that loads its folders.
      layout: its original single-file layout (models.ldm_layout.Family), or None.

    Methods are documented where the families implement them (`families/sd.py`: the UNet
    families, SD 1.x, SD 2.x and SDXL). A new family implements each of them; the developer docs'
    "Add a model family" page lists them.
    """

    name = ""
    title = ""
    encoders = ()
    time_ids = False
    pipeline_class = ""
    layout = None

    def __repr__(self):
        return f"<model family {self.name}>"
