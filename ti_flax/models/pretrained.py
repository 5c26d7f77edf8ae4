"""Loading a whole pretrained Stable Diffusion model into a `LoadedModel`.

`load_model` reads a diffusers folder (local, or a Hub snapshot; `model_folder.py` finds and
checks it) component by component (`component_weights.py`), its tokenizer(s) (`tokenizers.py`)
and its noise schedule, or one original-layout checkpoint file (`single_file.py`).
`read_spec` reads a model's configs alone and `abstract_params` gives the weights' shapes, so a
model's step can be measured without reading any weights.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp

from .. import files
from ..errors import UserError
from . import component_weights, schedulers, single_file
from .model_folder import CONFIG_FILES, check_model_dir, resolve_model_dir
from .spec import LoadedModel, spec_from
from .tokenizers import load_second_tokenizer, load_tokenizer
from .weights import unflatten


def is_single_file(name_or_path):
    """True for a path that names one checkpoint file (`.safetensors`, `.ckpt`, ...), not a folder or Hub id."""
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        return False
    return os.path.isfile(name_or_path) or name_or_path.lower().endswith(single_file.SUFFIXES)


def load_model(name_or_path, revision=None, tokenizer_name=None, prediction_type=None, allow_pickle=False,
               zero_terminal_snr=None, vae=None):
    """Load tokenizer, text encoder, UNet, VAE and noise schedule of a Stable Diffusion model.

    Args:
      name_or_path: a diffusers folder, a Hub id, or one original-layout checkpoint file
        (A1111 / ComfyUI `.safetensors`; `.ckpt` with `allow_pickle`), see single_file.py.
      revision: the Hub revision. tokenizer_name: a tokenizer folder or Hub id instead of the model's.
      prediction_type: "epsilon" or "v_prediction" instead of what the scheduler config says (a
        single file has none: epsilon unless given).
      allow_pickle: let a single `.ckpt` file be unpickled (it can run code: trusted files only).
      zero_terminal_snr: True rescales the noise schedule (training and sampling) to zero terminal
        SNR with "trailing" timesteps, False turns a rescaling off; None: what the scheduler config
        (a single file: its `ztsnr` marker) says.
      vae: another VAE to use instead of the model's (--pretrained_vae_model_name_or_path): see
        `with_vae`.
    """
    model = _load_model(name_or_path, revision, tokenizer_name, prediction_type, allow_pickle, zero_terminal_snr)
    return model if vae is None else with_vae(model, vae, revision, allow_pickle)


def _load_model(name_or_path, revision, tokenizer_name, prediction_type, allow_pickle, zero_terminal_snr):
    if prediction_type is not None and prediction_type not in schedulers.PREDICTION_TYPES:
        choices = ", ".join(schedulers.PREDICTION_TYPES)
        raise UserError(f"--prediction_type {prediction_type!r}: choose one of {choices}")
    if is_single_file(name_or_path):
        return single_file.load(os.fspath(name_or_path), revision, tokenizer_name, prediction_type, allow_pickle,
                                zero_terminal_snr)
    model_dir = resolve_model_dir(name_or_path, revision)
    tokenizer_dir = resolve_model_dir(tokenizer_name, revision) if tokenizer_name else None
    sdxl = check_model_dir(model_dir, tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir or os.path.join(model_dir, "tokenizer"))
    scheduler_config, alphas_cumprod, prediction_type = read_scheduler(model_dir, prediction_type,
                                                                       zero_terminal_snr)
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


def with_vae(model, name_or_path, revision=None, allow_pickle=False):
    """`model` with the VAE of `name_or_path` in place of its own, as diffusers' scripts'
    --pretrained_vae_model_name_or_path (and kohya's --vae) do: an AutoencoderKL folder or Hub id
    (its config.json and weights, or a model folder's vae/), or one VAE file in the original
    layout (A1111's models/VAE; `.ckpt` with `allow_pickle`).

    A folder's config gives the latents' scale, as diffusers reads `vae.config.scaling_factor`; a
    file states none, so it keeps the model's. Every other weight stays the model's, bitwise.
    Raises UserError (one line) for a VAE whose latents the model's UNet cannot take.
    """
    flag = "--pretrained_vae_model_name_or_path"
    own = model.spec.vae

    def check(config):  # before the weights are read
        levels, own_levels = len(config.block_out_channels), len(own.block_out_channels)
        if (config.latent_channels, levels) != (own.latent_channels, own_levels):
            raise UserError(f"{flag} {os.fspath(name_or_path)}: its latents have {config.latent_channels} channels at "
                            f"1/{2 ** (levels - 1)} of the image size, but this model's UNet takes "
                            f"{own.latent_channels} at 1/{2 ** (own_levels - 1)}; use a VAE of the model's family")

    if is_single_file(name_or_path):
        config, params = single_file.load_vae(os.fspath(name_or_path), own.scaling_factor, allow_pickle, check)
    else:
        folder = resolve_model_dir(os.fspath(name_or_path), revision, flag=flag)
        if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isdir(os.path.join(folder, "vae")):
            folder = os.path.join(folder, "vae")  # a whole model folder: its VAE
        check(component_weights.read_config(folder, "vae"))
        config, params = component_weights.load_component(folder, "vae")
    config = dataclasses.replace(config, sample_size=own.sample_size)
    spec = dataclasses.replace(model.spec, vae=config, scaling_factor=float(config.scaling_factor))
    notes = (*model.notes, f"VAE from {os.fspath(name_or_path)}")
    return dataclasses.replace(model, spec=spec, params={**model.params, "vae": params}, notes=notes)


def read_scheduler(model_dir, prediction_type=None, zero_terminal_snr=None):
    """(scheduler config dict, alphas_cumprod, prediction type) of a diffusers folder;
    `prediction_type` (--prediction_type) overrides the config's, sampling included, and
    `zero_terminal_snr` (--zero_terminal_snr: True/False; None keeps the config's) rescales the
    schedule for training and sampling alike."""
    scheduler_file = os.path.join(model_dir, "scheduler", "scheduler_config.json")
    scheduler_config = files.read_json(scheduler_file, "a JSON config file")
    if zero_terminal_snr is not None:
        scheduler_config = schedulers.with_zero_terminal_snr(scheduler_config, zero_terminal_snr)
    with files.reading(scheduler_file, "a noise scheduler config"):
        alphas_cumprod = schedulers.alphas_cumprod(dict(scheduler_config))
    if prediction_type is not None:
        scheduler_config = dict(scheduler_config, prediction_type=prediction_type)
    prediction_type = scheduler_config.get("prediction_type") or "epsilon"
    if prediction_type not in schedulers.PREDICTION_TYPES:
        raise UserError(f"{model_dir}: scheduler prediction_type {prediction_type!r} is not supported; "
                        "pass --prediction_type epsilon or v_prediction")
    return dict(scheduler_config), alphas_cumprod, prediction_type


def read_spec(name_or_path, revision=None, prediction_type=None):
    """(ModelSpec, alphas_cumprod) of a diffusers folder or Hub id from its config files alone:
    no weights are read, and from the Hub only the configs are fetched.

    For measuring the model's step (`ti_flax.plan`). An SDXL spec takes the CLIP tokenizers'
    ids (end-of-text 49407, tokenizer_2 padding with "!"), as SDXL's own; they change no shape.
    """
    if is_single_file(name_or_path):
        raise UserError(f"--pretrained_model_name_or_path {os.fspath(name_or_path)}: planning reads a model's "
                        "config files; pass a diffusers folder or Hub id of the same architecture")
    model_dir = resolve_model_dir(name_or_path, revision, CONFIG_FILES)
    sdxl = check_model_dir(model_dir)
    _, alphas_cumprod, prediction_type = read_scheduler(model_dir, prediction_type)
    configs = {kind: component_weights.read_config(os.path.join(model_dir, kind), kind)
               for kind in ("text_encoder", "unet", "vae")}
    sdxl_args = {}
    if sdxl:
        sdxl_args = dict(text_2=component_weights.read_config(os.path.join(model_dir, "text_encoder_2"),
                                                               "text_encoder"), eos_token_id=49407, pad_token_id_2=0)
    spec = spec_from(configs["text_encoder"], configs["unet"], configs["vae"], prediction_type, len(alphas_cumprod),
                     **sdxl_args)
    return spec, alphas_cumprod


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
    out = {}
    parts = (("text_encoder", spec.text), ("unet", spec.unet), ("vae", spec.vae))
    if spec.text_2 is not None:
        parts += (("text_encoder_2", spec.text_2),)
    for kind, config in parts:
        shapes = component_weights.shapes(config, "text_encoder" if kind == "text_encoder_2" else kind)
        out[kind] = unflatten({k: jax.ShapeDtypeStruct(tuple(s), jnp.float32) for k, s in shapes.items()})
    return out
