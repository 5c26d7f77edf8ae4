"""The frozen Stable Diffusion model: loading it, and running its parts inside the train step.

ti_flax owns its model code: `clip` (the CLIP text encoders), `unet`, `vae`, `attention` and
`schedulers` are pure functions over parameter trees named like the PyTorch state dicts
(`weights`). This module is the seam the rest of ti_flax uses: `load_model` reads a diffusers
model folder (local, or a Hub snapshot) or one original-layout checkpoint file (`single_file`)
into a `LoadedModel`, and `encode_text`,
`predict_noise`, `vae_moments` and `decode_latents` run its parts for a static `ModelSpec` (what
the model is) and `Compute` (how this run computes with it), both from `spec.py`.
No diffusers or transformers model class is used; the tokenizer is transformers' CLIPTokenizer.
"""

import dataclasses
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import files
from ..errors import UserError
from . import attention as attention_lib
from . import clip, component_weights, schedulers, unet, vae
from .spec import (  # noqa: F401  (the models API)
    Compute, Configs, ModelSpec, configs, default_resolution, default_size, spec_from, spec_from_configs,
)
from .weights import unflatten

COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # what an SDXL folder adds

# model_index.json pipeline classes that are not Stable Diffusion 1.x/2.x, and what they are.
_FOREIGN_PIPELINES = {
    "StableDiffusionXLInpaint": "an SDXL inpainting model",
    "StableDiffusionXLInstructPix2Pix": "an SDXL InstructPix2Pix model",
    "StableDiffusion3": "a Stable Diffusion 3 model",
    "Flux": "a Flux model",
    "ControlNet": "a ControlNet",
    "Kandinsky": "a Kandinsky model",
    "PixArt": "a PixArt model",
    "Wuerstchen": "a Wuerstchen model",
    "StableCascade": "a Stable Cascade model",
    "Sana": "a Sana model",
    "Lumina": "a Lumina model",
    "Hunyuan": "a Hunyuan model",
    "AuraFlow": "an AuraFlow model",
}
SUPPORTED = ("Stable Diffusion 1.x and 2.x (a StableDiffusionPipeline folder, or one original .safetensors file) "
             "and SDXL (a StableDiffusionXLPipeline folder)")


# --------------------------------------------------------------------------------------------
# Locating a model


def resolve_model_dir(name_or_path, revision=None):
    """Local folder for a model path or Hub id (downloaded to the HF cache, or read from it).

    Raises UserError when the model cannot be found. With HF_HUB_OFFLINE=1 only the local
    cache is consulted, so no network call is made.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"--pretrained_model_name_or_path {name_or_path!r}: no such model folder")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            name_or_path,
            revision=revision,
            allow_patterns=["*.json", "*.txt", "*.msgpack", "*.safetensors", "*.bin", "*.model"],
            ignore_patterns=["*.fp16.*", "*.non_ema.*", "*.ckpt", "safety_checker/*", "*/*.onnx"],
        )
    except Exception as err:  # network down, offline mode, unknown repo, wrong revision
        raise UserError(
            f"--pretrained_model_name_or_path {name_or_path!r}: not a local folder and could not be "
            f"fetched from the Hugging Face Hub ({type(err).__name__}); pass a local model folder"
        ) from None


def model_index(model_dir):
    """A diffusers folder's model_index.json as a dict; {} where there is none (a single file)."""
    path = os.path.join(model_dir or "", "model_index.json")
    return files.read_json(path, "a JSON pipeline index") if os.path.isfile(path) else {}


def check_model_dir(model_dir, tokenizer_dir=None):
    """Raise UserError for a folder of another model family, or naming every missing component.

    Returns whether the folder is an SDXL model (`is_sdxl_dir`)."""
    name = str(model_index(model_dir).get("_class_name", ""))
    for prefix, what in _FOREIGN_PIPELINES.items():
        if prefix in name:
            raise UserError(f"{model_dir}: {what} ({name}); ti_flax trains {SUPPORTED}")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(model_dir, c))]
    if tokenizer_dir is None and not os.path.isdir(os.path.join(model_dir, "tokenizer")):
        missing.append("tokenizer")
    if missing:
        raise UserError(
            f"{model_dir}: not a Stable Diffusion model folder (missing {', '.join(missing)}/); "
            "expected unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
        )
    sdxl = is_sdxl_dir(model_dir, name)
    if sdxl:
        missing = [c for c in SDXL_COMPONENTS if not os.path.isdir(os.path.join(model_dir, c))]
        if missing:
            raise UserError(f"{model_dir}: an SDXL model folder without {', '.join(missing)}/; "
                            "an SDXL folder has text_encoder_2/ and tokenizer_2/ beside text_encoder/ and tokenizer/")
        if tokenizer_dir is not None:
            raise UserError("--tokenizer_name: not supported for SDXL models, which carry two tokenizers; "
                            "drop the flag to use the model's own")
    return sdxl


def is_sdxl_dir(model_dir, class_name=None):
    """Whether a diffusers folder is an SDXL model: its index says so, or it has a second text
    encoder. `class_name`: its model_index.json `_class_name`, when the caller has read it."""
    if class_name is None:
        class_name = str(model_index(model_dir).get("_class_name", ""))
    return class_name.startswith("StableDiffusionXL") or os.path.isdir(os.path.join(model_dir, "text_encoder_2"))


def zeros_for_empty_negative(model):
    """Whether an empty negative prompt is all zeros for a LoadedModel: an SDXL folder's
    model_index.json `force_zeros_for_empty_prompt` (True when unset, as diffusers' default);
    False for SD 1.x / 2.x, whose pipelines encode the empty text."""
    return model.spec.is_sdxl and bool(model_index(model.model_dir).get("force_zeros_for_empty_prompt", True))


# --------------------------------------------------------------------------------------------
# The frozen model: a static spec (spec.py) plus a pytree of weights


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

    @property
    def tokenizers(self):
        """Every tokenizer of the model: a placeholder token goes into each."""
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)


def is_single_file(name_or_path):
    """True for a path that names one checkpoint file (`.safetensors`, `.ckpt`, ...), not a folder or Hub id."""
    from .single_file import SUFFIXES

    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        return False
    return os.path.isfile(name_or_path) or name_or_path.lower().endswith(SUFFIXES)


def load_model(name_or_path, revision=None, tokenizer_name=None, prediction_type=None, allow_pickle=False):
    """Load tokenizer, text encoder, UNet, VAE and noise schedule of a Stable Diffusion model.

    Args:
      name_or_path: a diffusers folder, a Hub id, or one original-layout checkpoint file
        (A1111 / ComfyUI `.safetensors`; `.ckpt` with `allow_pickle`), see single_file.py.
      revision: the Hub revision. tokenizer_name: a tokenizer folder or Hub id instead of the model's.
      prediction_type: "epsilon" or "v_prediction" instead of what the scheduler config says (a
        single file has none: epsilon unless given).
      allow_pickle: let a single `.ckpt` file be unpickled (it can run code: trusted files only).
    """
    if prediction_type is not None and prediction_type not in schedulers.PREDICTION_TYPES:
        choices = ", ".join(schedulers.PREDICTION_TYPES)
        raise UserError(f"--prediction_type {prediction_type!r}: choose one of {choices}")
    if is_single_file(name_or_path):
        from . import single_file

        return single_file.load(os.fspath(name_or_path), revision, tokenizer_name, prediction_type, allow_pickle)
    model_dir = resolve_model_dir(name_or_path, revision)
    tokenizer_dir = resolve_model_dir(tokenizer_name, revision) if tokenizer_name else None
    sdxl = check_model_dir(model_dir, tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir or os.path.join(model_dir, "tokenizer"))
    scheduler_file = os.path.join(model_dir, "scheduler", "scheduler_config.json")
    scheduler_config = files.read_json(scheduler_file, "a JSON config file")
    with files.reading(scheduler_file, "a noise scheduler config"):
        alphas_cumprod = noise_schedule(scheduler_config)
    if prediction_type is not None:  # --prediction_type overrides the scheduler config, sampling included
        scheduler_config = dict(scheduler_config, prediction_type=prediction_type)
    prediction_type = scheduler_config.get("prediction_type") or "epsilon"
    if prediction_type not in schedulers.PREDICTION_TYPES:
        raise UserError(f"{model_dir}: scheduler prediction_type {prediction_type!r} is not supported; "
                        "pass --prediction_type epsilon or v_prediction")
    text_config = component_weights.read_config(os.path.join(model_dir, "text_encoder"), "text_encoder")
    if text_config.vocab_size != len(tokenizer):
        raise UserError(
            f"{model_dir}: tokenizer has {len(tokenizer)} tokens but the text encoder has "
            f"{text_config.vocab_size} rows; use the tokenizer that belongs to this model"
        )
    tokenizer_2 = load_second_tokenizer(model_dir, tokenizer) if sdxl else None
    params, found = {}, {}
    for kind in ("text_encoder", "unet", "vae") + (("text_encoder_2",) if sdxl else ()):
        loaded_as = "text_encoder" if kind == "text_encoder_2" else kind
        found[kind], params[kind] = component_weights.load_component(os.path.join(model_dir, kind), loaded_as)
    sdxl_args = {}
    if sdxl:
        check_sdxl_parts(model_dir, found["text_encoder"], found["text_encoder_2"], found["unet"], tokenizer_2)
        sdxl_args = dict(text_2=found["text_encoder_2"], eos_token_id=tokenizer.eos_token_id,
                         pad_token_id_2=tokenizer_2.pad_token_id)
    spec = spec_from(found["text_encoder"], found["unet"], found["vae"], prediction_type,
                     int(scheduler_config.get("num_train_timesteps") or 1000), **sdxl_args)
    return LoadedModel(spec, params, tokenizer, alphas_cumprod, model_dir, dict(scheduler_config), tokenizer_2)


def load_second_tokenizer(model_dir, tokenizer):
    """SDXL's tokenizer_2, checked to be the first tokenizer's vocabulary with its own padding.

    The second text encoder's ids are then the first's with the padding after the end-of-text
    token replaced (`second_encoder_ids`), so one tokenization serves both encoders.
    """
    folder = os.path.join(model_dir, "tokenizer_2")
    tokenizer_2 = load_tokenizer(folder)
    if tokenizer_2.get_vocab() != tokenizer.get_vocab() or tokenizer_2.model_max_length != tokenizer.model_max_length:
        raise UserError(f"{folder}: not the same vocabulary and length as tokenizer/; ti_flax trains SDXL models "
                        "whose two tokenizers differ in padding only, as SDXL base's do")
    if tokenizer_2.pad_token_id is None or tokenizer.eos_token_id is None:
        raise UserError(f"{model_dir}: tokenizer/ needs an end-of-text token and tokenizer_2/ a padding token")
    return tokenizer_2


def check_sdxl_parts(model_dir, text, text_2, unet_config, tokenizer_2):
    """UserError unless the parts fit together as SDXL's do."""
    if not text_2.with_projection:
        raise UserError(f"{model_dir}/text_encoder_2: SDXL's second text encoder needs its text_projection "
                        "(CLIPTextModelWithProjection)")
    if unet_config.addition_embed_type != "text_time":
        raise UserError(f"{model_dir}/unet: an SDXL UNet has addition_embed_type 'text_time', this one "
                        f"{unet_config.addition_embed_type!r}")
    if text_2.vocab_size != len(tokenizer_2):
        raise UserError(f"{model_dir}: tokenizer_2 has {len(tokenizer_2)} tokens but text_encoder_2 has "
                        f"{text_2.vocab_size} rows; use the tokenizer that belongs to this model")
    want = unet_config.projection_class_embeddings_input_dim
    got = text_2.projection_dim + 6 * unet_config.addition_time_embed_dim
    if text.hidden_size + text_2.hidden_size not in unet_config.cross_dims or want != got:
        raise UserError(f"{model_dir}: the text encoders ({text.hidden_size} + {text_2.hidden_size} wide, "
                        f"projection {text_2.projection_dim}) do not fit the UNet's conditioning")


def abstract_params(spec):
    """{"text_encoder", "unet", "vae"} (+ "text_encoder_2" for SDXL): float32 jax.ShapeDtypeStruct trees from the configs alone,
    so nothing is allocated."""
    c = configs(spec)
    out = {}
    parts = (("text_encoder", c.text), ("unet", c.unet), ("vae", c.vae))
    if c.text_2 is not None:
        parts += (("text_encoder_2", c.text_2),)
    for kind, config in parts:
        shapes = component_weights.shapes(config, "text_encoder" if kind == "text_encoder_2" else kind)
        out[kind] = unflatten({k: jax.ShapeDtypeStruct(tuple(s), jnp.float32) for k, s in shapes.items()})
    return out


TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def load_tokenizer(folder):
    """A CLIP tokenizer from `folder`; DamagedFile naming the file when one of them is damaged.

    The folder holds vocab.json + merges.txt (transformers 4.x saves these) and/or tokenizer.json
    (what transformers 5 saves); each file present is checked before transformers reads it.
    """
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such tokenizer folder")
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    fast_file = os.path.join(folder, "tokenizer.json")
    if os.path.exists(fast_file):
        if not isinstance(files.read_json(fast_file, "a tokenizers JSON file").get("model"), dict):
            raise files.DamagedFile(fast_file, "not a tokenizers file (no model section)")
    if os.path.exists(vocab_file) or not os.path.exists(fast_file):
        vocab = files.read_json(vocab_file, "a CLIP vocabulary (JSON)")
        bad = [k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool)]
        if not vocab or bad:
            raise files.DamagedFile(vocab_file, "not a CLIP vocabulary (expected {token: id} with integer ids)")
    if os.path.exists(merges_file) or not os.path.exists(fast_file):
        files.read_text(merges_file, "a BPE merges text file")
    for name in TOKENIZER_CONFIGS:
        if os.path.exists(os.path.join(folder, name)):
            files.read_json(os.path.join(folder, name), "a JSON tokenizer config")
    import transformers
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    # transformers 4.x's CLIPTokenizer (Python) needs vocab.json + merges.txt; its fast twin reads
    # tokenizer.json. In 5.x CLIPTokenizer reads either.
    cls = transformers.CLIPTokenizer
    if not os.path.exists(vocab_file) and hasattr(transformers, "CLIPTokenizerFast"):
        cls = transformers.CLIPTokenizerFast
    with files.reading(folder, "a CLIP tokenizer folder (vocab.json and merges.txt, or tokenizer.json)"):
        return cls.from_pretrained(folder)


def noise_schedule(scheduler_config):
    """alphas_cumprod of the model's training noise schedule, as diffusers' DDPMScheduler computes it."""
    return schedulers.alphas_cumprod(dict(scheduler_config))


# --------------------------------------------------------------------------------------------
# Parameters


def cast_params(params, dtype):
    """A copy of a host params tree with every float leaf cast to `dtype` (e.g. "bfloat16")."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        x = np.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x

    return jax.tree_util.tree_map(cast, params)


def token_table(text_params):
    """The text encoder's [vocab, hidden] token-embedding table."""
    return clip.token_table(text_params)


def token_tables(params):
    """Each text encoder's token table: (table,) or, for SDXL, (CLIP-L's, bigG's)."""
    names = ("text_encoder", "text_encoder_2") if "text_encoder_2" in params else ("text_encoder",)
    return tuple(token_table(params[name]) for name in names)


def with_token_table(text_params, table):
    """A copy of the text-encoder params with the token table replaced (the rest shared)."""
    out = jax.tree_util.tree_map(lambda x: x, text_params)  # new containers, same leaves
    out["text_model"]["embeddings"]["token_embedding"]["weight"] = table
    return out


# --------------------------------------------------------------------------------------------
# Running the parts (pure; inside jit/pmap, with the spec and the compute setting static)


def resolve_attention(name, spec=None, resolution=None, backend=None, dtype="float32"):
    """What --attention `name` runs for the model's largest self-attention, e.g. "chunked".

    For the banner, and to refuse at start-up an explicit choice that cannot run here (UserError).
    Without a spec, the answer for a 64x64-latent SD 1.x self-attention in float32; with one, for
    its native size (or `resolution`) in compute `dtype`.
    """
    backend = backend or jax.default_backend()
    if spec is None:
        return attention_lib.resolve(name, backend=backend, dtype=jnp.float32, q_len=4096, kv_len=4096, head_dim=40)
    c = configs(spec)
    side = (resolution or default_resolution(spec)) // spec.vae_scale_factor
    tokens = side * side
    heads = c.unet.heads[0]
    head_dim = c.unet.block_out_channels[0] // heads
    return attention_lib.resolve(name, backend=backend, dtype=jnp.dtype(dtype), q_len=tokens, kv_len=tokens,
                                 head_dim=head_dim)


def encode_text(spec, compute, text_params, input_ids, rows):
    """CLIP last hidden state [B, L, D] for ids that may include the learned tokens (one text encoder).

    Ids below `spec.base_vocab_size` read the frozen table; ids at or above it read
    `rows[id - base_vocab_size]`. The table is never copied or grown, so the only gradient
    the caller can take is the one with respect to `rows` ([num_vectors, D]).
    """
    out = clip.encode(text_params, configs(spec).text, input_ids, rows, base_vocab_size=spec.base_vocab_size,
                      dtype=jnp.dtype(compute.dtype))
    return out.last_hidden_state


class Condition(NamedTuple):
    """What the UNet is conditioned on for a prompt.

    Attributes:
      context: [B, L, C] the cross-attention states: the text encoder's last hidden state, or for
        SDXL both encoders' penultimate states side by side (C = 768 + 1280).
      text_embeds: SDXL's pooled, projected output of the second encoder [B, E]; None otherwise.
    """

    context: jax.Array
    text_embeds: object = None


def split_rows(spec, rows):
    """Each text encoder's part of learned rows [N, row_width]: (rows,) or, for SDXL, (rows[:, :D1], rows[:, D1:]).

    An SDXL vector is one row holding its CLIP-L row and its bigG row side by side, so the
    learned rows stay one leaf; AdamW and global-norm clipping treat it exactly as two leaves.
    """
    if not spec.is_sdxl:
        return (rows,)
    first = spec.text_widths[0]
    return rows[..., :first], rows[..., first:]


def second_encoder_ids(spec, input_ids):
    """SDXL's second tokenizer's ids from the first's: the padding after the first end-of-text
    token becomes the second tokenizer's padding id (the two differ only there)."""
    positions = jnp.arange(input_ids.shape[-1])
    first_eos = jnp.argmax(input_ids == spec.eos_token_id, axis=-1)[..., None]
    return jnp.where(positions > first_eos, jnp.asarray(spec.pad_token_id_2, input_ids.dtype), input_ids)


def condition(spec, compute, text_params, input_ids, rows):
    """The UNet's text conditioning (a `Condition`) for the first tokenizer's ids [B, L].

    Args:
      text_params: the text encoder's params; for SDXL a pair (text_encoder, text_encoder_2).
      rows: learned rows [N, spec.row_width]; id `base_vocab_size + i` reads rows[i] in each encoder.
    """
    if not spec.is_sdxl:
        return Condition(encode_text(spec, compute, text_params, input_ids, rows))
    c, dtype = configs(spec), jnp.dtype(compute.dtype)
    rows_1, rows_2 = split_rows(spec, rows)
    params_1, params_2 = text_params
    first = clip.encode(params_1, c.text, input_ids, rows_1, base_vocab_size=spec.base_vocab_size, dtype=dtype)
    second = clip.encode(params_2, c.text_2, second_encoder_ids(spec, input_ids), rows_2,
                         base_vocab_size=spec.base_vocab_size, dtype=dtype)
    return Condition(jnp.concatenate([first.penultimate, second.penultimate], axis=-1), second.text_embeds)


def predict_noise(spec, compute, unet_params, latents, timesteps, encoder_hidden_states, added_cond=None):
    """UNet output for NCHW latents (epsilon or v, per the model's prediction_type), NCHW.

    `added_cond` is SDXL's {"text_embeds": [B, E], "time_ids": [B, 6]} (None otherwise).
    """
    sample = jnp.transpose(latents, (0, 2, 3, 1))
    out = unet.apply(unet_params, configs(spec).unet, sample, jnp.asarray(timesteps), encoder_hidden_states,
                     added_cond=added_cond, attention=compute.attention, remat=compute.remat,
                     dtype=jnp.dtype(compute.dtype))
    return jnp.transpose(out, (0, 3, 1, 2))


def vae_moments(spec, compute, vae_params, pixels):
    """Mean and log-variance (NHWC) of the VAE posterior for NHWC pixels in [-1, 1]."""
    return vae.encode(vae_params, configs(spec).vae, pixels, dtype=jnp.dtype(compute.dtype))


def decode_latents(spec, compute, vae_params, latents_nchw):
    """Pixels in about [-1, 1], NCHW, from NCHW latents scaled the way the UNet sees them."""
    latents = jnp.transpose(latents_nchw, (0, 2, 3, 1)) / spec.scaling_factor
    pixels = vae.decode(vae_params, configs(spec).vae, latents, dtype=jnp.dtype(compute.dtype))
    return jnp.transpose(pixels, (0, 3, 1, 2))


# --------------------------------------------------------------------------------------------
# Saving a whole pipeline


def save_pipeline(model, tokenizer, rows, out_dir, tokenizer_2=None):
    """Save a PyTorch-layout diffusers folder whose tokenizer(s) and text encoder(s) hold the new
    tokens (SDXL: both, with each encoder's part of the rows); see pipeline.save_pipeline."""
    from .pipeline import save_pipeline as save

    return save(model, tokenizer, rows, out_dir, tokenizer_2)
