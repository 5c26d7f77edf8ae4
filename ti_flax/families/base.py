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
from ..errors import UserError
from ..models import lora as lora_lib


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
      text_encoder, denoiser: params trees (the denoiser: the UNet, or FLUX's transformer), float
        leaves in the run's compute dtype.
      vae: params tree, or None when batches carry cached latents (the step never encodes).
      alphas_cumprod: float32 [num_train_timesteps], the training noise schedule.
      text_encoder_2: a second text encoder's params tree (SDXL's); None for one text encoder.
    """

    text_encoder: Any
    denoiser: Any
    vae: Any
    alphas_cumprod: Any
    text_encoder_2: Any = None

    @classmethod
    def from_model(cls, model, dtype="float32", abstract=False):
        """Host weights of a models.LoadedModel, float leaves cast to `dtype` (the schedule stays float32);
        with abstract=True, their jax.ShapeDtypeStruct (nothing cast: see models.cast_params)."""
        params = models.cast_params(model.params, dtype, abstract)
        schedule = model.alphas_cumprod  # None for a rectified-flow model
        if abstract and schedule is not None:
            schedule = jax.ShapeDtypeStruct(np.shape(schedule), np.asarray(schedule).dtype)
        return cls(params["text_encoder"], params[model.spec.denoiser.FOLDER], params["vae"], schedule,
                   params.get("text_encoder_2"))

    def with_lora(self, factors, scale):
        """These weights with a LoRA's `factors` ({module: {"lora_A", "lora_B"}}, models/lora.py)
        attached to the denoiser, lora_B times `scale`; `factors` None: these weights as they are.
        Leaves are shared, not copied; `layers.linear` / `conv2d` apply the factors."""
        if factors is None:
            return self
        return self._replace(denoiser=lora_lib.attach(self.denoiser, factors, scale))

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
      layout: its original single-file layout (models.ldm_layout.SingleFileLayout), or None.
      flow_matching: trained with rectified flow, whose draws --timestep_sampling sets.
      negative_prompt: its sampling takes a negative prompt (False: FLUX.1, guidance-distilled).
      file_flags: the TrainConfig fields naming the files of a model kept apart (`load_file`'s
        `separate`), e.g. FLUX.1's ("clip_l", "t5xxl", "ae", "t5xxl_tokenizer").
      shards_weights: its frozen weights may be split over the devices (--shard_weights, or on
        their own where they do not fit one device: run.shard_decision); False: they are always
        replicated, the step pmapped (the SD families, whose `check_run` refuses --shard_weights).

    Each method below is a question; `families/sd.py` answers them for the UNet families. A new
    family answers each one (docs/add-a-family.md is the checklist).
    """

    name = ""
    title = ""
    encoders = ()
    time_ids = False
    pipeline_class = ""
    layout = None
    flow_matching = False  # trained with rectified flow (training.losses.LossSpec's flow settings apply)
    negative_prompt = True  # sampling takes a negative prompt (classifier-free guidance)
    file_flags = ()  # the flags naming the parts a model kept as files has apart (FLUX.1's --clip_l, ...)
    shards_weights = True  # its frozen weights may be split over the devices (--shard_weights)

    def __repr__(self):
        return f"<model family {self.name}>"

    # Recognising and loading -------------------------------------------------------------------

    def claims(self, model_dir, class_name):
        """Whether a diffusers folder (its model_index.json `_class_name`, "" without one) is this
        family's. The registered families' claims do not overlap."""
        raise NotImplementedError

    def claims_file(self, path):
        """Whether one model file is this family's, where the family reads files itself (`load_file`;
        families with a `layout` are told apart by models/single_file.py instead)."""
        return False

    def load_file(self, path, separate=None, dtype="float32"):
        """The models.LoadedModel of a file this family claims; `separate`: the files kept apart
        ({"clip_l", "t5xxl", "ae", ...}: kohya's flags), where the family has such."""
        raise NotImplementedError

    def check_run(self, config, model):
        """UserError (one line, naming the flag) for a flag this family cannot honour, checked once
        the model is loaded and before anything is written."""
        raise NotImplementedError

    def check_folder(self, model_dir, tokenizer_dir=None):
        """UserError naming what a folder of this family lacks (before any weight is read);
        `tokenizer_dir`: --tokenizer_name's folder, where the family takes one."""
        raise NotImplementedError

    def load_folder(self, model_dir, tokenizer_dir=None, prediction_type=None, zero_terminal_snr=None,
                    dtype="float32"):
        """The models.LoadedModel of a checked folder (its spec naming this family); `dtype`: the
        weights' host dtype where the family loads them cast (families.load_model)."""
        raise NotImplementedError

    def prompt_tokenizers(self, model):
        """What a prompt is tokenized with (data.prompts.encode_prompt): the first tokenizer where
        the encoders share its ids (SD 1.x / 2.x, SDXL), or every tokenizer of encoders that read
        their own vocabulary (FLUX), whose ids then follow each other in one array."""
        raise NotImplementedError

    def prompt_length(self, spec):
        """How many ids a prompt is (`prompt_tokenizers`' contexts together): a batch's width."""
        raise NotImplementedError

    def spec(self, configs, prediction_type, num_train_timesteps, all_tokenizers=None):
        """The models.ModelSpec of this family's parts ({part: owned config}); `all_tokenizers`,
        where loaded, give the ids the spec records. A single file's parts come here too."""
        raise NotImplementedError

    def read_spec(self, model_dir, prediction_type=None):
        """(ModelSpec, alphas_cumprod) from a folder's config files alone (`plan`): no weights."""
        raise NotImplementedError

    # Training ----------------------------------------------------------------------------------

    def token_tables(self, params):
        """Each text encoder's [vocab, width] token table, in row order (host arrays)."""
        raise NotImplementedError

    def resolve_attention(self, name, spec, resolution=None, backend=None, dtype="float32"):
        """What --attention `name` runs for the denoiser's largest self-attention at `resolution`
        (default: its native size) on `backend` in `dtype`; UserError for an explicit choice that
        cannot run there."""
        raise NotImplementedError

    def attention_sites(self, spec, compute, resolution):
        """[((kind, q_len, kv_len, head_dim, implementation), count)] of the denoiser's attention
        calls at `resolution` pixels, as `plan` reports them."""
        raise NotImplementedError

    def lora_targets(self, spec, targets):
        """{module: weight shape} of the denoiser's layers a LoRA adapts for --lora_targets
        `targets` (names or groups, config.choices.LORA_TARGETS), named as the denoiser's state
        dict names them; UserError where this family has no LoRA."""
        raise UserError(f"--lora_rank: pivotal tuning (rows and a LoRA) is not available for {self.title} yet; "
                        "train the rows alone (leave --lora_rank out)")

    def default_resolution(self, spec):
        """--resolution left unset."""
        raise NotImplementedError

    def condition(self, spec, compute, text_params, input_ids, rows):
        """What the denoiser is conditioned on (a models.Condition) for the first tokenizer's ids
        [B, L]; `text_params`: every encoder's params (Frozen.text_params); `rows`: the learned rows
        [N, spec.row_width], id `base_vocab_size + i` reading rows[i]. Pure: runs inside jit."""
        raise NotImplementedError

    def time_draw(self, spec, loss_spec):
        """`draw(key) -> scalar`: one example's time draw under the loss recipe (training.losses.
        LossSpec), which `forward_process` turns into its timestep. Pure: runs inside jit."""
        raise NotImplementedError

    def forward_process(self, spec, frozen, loss_spec, latents, noise, drawn, timesteps=None):
        """(noisy latents, timesteps, target) of scaled NCHW `latents`, `noise` and each example's
        time `drawn` (or the given `timesteps` out of spec.num_train_timesteps: the validation
        loss's fixed ones): the objective the family was trained with. The timesteps are what
        `predict` and the loss's schedules take. Pure: runs inside jit."""
        raise NotImplementedError

    def predict(self, spec, compute, denoiser_params, latents, timesteps, cond, time_ids=None, guidance=None):
        """The denoiser's prediction, NCHW, for NCHW `latents` at `timesteps`, conditioned on
        `cond`; `time_ids` [B, 6] where `time_ids` is True; `guidance` the embedded guidance scale
        of a guidance-distilled denoiser (FLUX.1 [dev]), None elsewhere. Pure: runs inside jit."""
        raise NotImplementedError

    # Sampling ----------------------------------------------------------------------------------

    def default_size(self, spec):
        """(height, width) in pixels the model was trained at: what sampling makes by default."""
        raise NotImplementedError

    def sampling_plan(self, scheduler, scheduler_config, num_inference_steps, size):
        """The static plan of sampler `scheduler` (a name of models.schedulers.SAMPLERS) on the
        model's `scheduler_config` for latents of `size` (h, w: the image's pixels / the VAE's
        factor): what `denoise` steps through. UserError for one the family cannot run."""
        raise NotImplementedError

    def denoise(self, frozen, rows, prompt_ids, negative_ids, noise, guidance_scale, settings, plan):
        """The sampling loop: final latents [B, C, h, w] from standard-normal `noise` for the
        prompts' ids, the learned `rows`, `guidance_scale` and the sampler's `settings`
        (sampling.sampler.SamplerSettings) and `plan`. Pure: runs inside jit."""
        raise NotImplementedError

    def decode(self, spec, compute, vae_params, latents):
        """Pixels in about [-1, 1], NCHW, of the sampler's final latents. Pure: runs inside jit."""
        raise NotImplementedError

    def sampling_defaults(self, spec):
        """(denoising steps, guidance scale) where a caller gives none: the family's pipeline's
        defaults in diffusers."""
        raise NotImplementedError

    def default_sampler(self, spec, scheduler_config):
        """The sampler (one of models.schedulers.SAMPLERS) used when none is chosen."""
        raise NotImplementedError

    def zero_empty_negative(self, model):
        """Whether an empty negative prompt of `model` (a LoadedModel; None: the family's default)
        conditions on zeros rather than on the encoded empty text."""
        raise NotImplementedError

    def sampling_condition(self, spec, cond, negative_ids, size, zero_empty_negative=False):
        """(cond, time_ids) for the sampler's [negative, positive] batch of `cond` at `size` (h, w)."""
        raise NotImplementedError

    # Outputs -----------------------------------------------------------------------------------

    def save_embedding(self, folder, token, rows, widths, step=None, bin=False):
        """Write a run's embedding of `token` (rows [N, sum(widths)]) into `folder`, in every layout
        the tools of this family load; `step`: an intermediate file's; `bin`: also PyTorch `.bin`
        twins. Returns {kind: path}."""
        raise NotImplementedError

    def embedding_file(self, token):
        """The file the model card names for a concept's embedding."""
        raise NotImplementedError

    def usage_lines(self, model, embeddings):
        """The model card's lines on loading the run's embeddings in each tool; `embeddings`:
        (token, folder as the run names it, folder relative to the card or "" for its own)."""
        raise NotImplementedError

    def save_pipeline(self, model, rows, out_dir, tokenizers=None):
        """Write `model`, the rows appended to each encoder's table, as this family's diffusers
        folder into `out_dir` (--save_as_full_pipeline); `tokenizers` hold the new tokens."""
        raise NotImplementedError

    # Checking the files in PyTorch diffusers (ti_flax.export --verify) --------------------------

    def reference_kwargs(self):
        """What `from_pretrained` of `pipeline_class` needs to load the text encoders alone."""
        raise NotImplementedError

    def reference_outputs(self, pipe, prompt):
        """{name: float32 array} of the PyTorch pipeline's prompt encoding."""
        raise NotImplementedError

    def our_outputs(self, cond):
        """{name: array} of a models.Condition, named as `reference_outputs` names them."""
        raise NotImplementedError


def pair_loading_code(pipeline_class, model, embeddings):
    """The model card's diffusers code for a two-encoder family's pair of files: a fenced block
    with one `load_textual_inversion` per text encoder and concept (`embeddings` as `usage_lines`
    takes them), then an image of the first concept."""
    where = lambda folder, name: f"{folder}/{name}" if folder else name  # noqa: E731
    lines = ["```python", f"from diffusers import {pipeline_class}",
             f'pipe = {pipeline_class}.from_pretrained("{model}")']
    for _, _, rel in embeddings:
        lines += [
            f'pipe.load_textual_inversion("{where(rel, "learned_embeds.safetensors")}", '
            "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
            f'pipe.load_textual_inversion("{where(rel, "learned_embeds_2.safetensors")}", '
            "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)",
        ]
    return lines + [f'image = pipe("a photo of {embeddings[0][0]}").images[0]', "```"]
