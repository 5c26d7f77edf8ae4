"""Reading a pretrained model's shared parts: is a path one file, the noise schedule, another VAE, the
weights' shapes from the configs.

Which parts a model has, and how they fit, is its family's (ti_flax/families/: `families.load_model`
reads a folder, a Hub id or a single file through the family that claims it); what every family
reads the same way is here.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp

from .. import files
from ..errors import UserError
from . import component_weights, schedulers, single_file
from .model_folder import resolve_model_dir
from .weights import unflatten


def is_single_file(name_or_path):
    """True for a path that names one checkpoint file (`.safetensors`, `.ckpt`, ...), not a folder or Hub id."""
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        return False
    return os.path.isfile(name_or_path) or name_or_path.lower().endswith(single_file.SUFFIXES)


def check_prediction_type(prediction_type):
    """UserError unless --prediction_type is unset or one the schedules know."""
    if prediction_type is not None and prediction_type not in schedulers.PREDICTION_TYPES:
        choices = ", ".join(schedulers.PREDICTION_TYPES)
        raise UserError(f"--prediction_type {prediction_type!r}: choose one of {choices}")


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


def abstract_params(spec):
    """{"text_encoder", the denoiser's folder ("unet", "transformer"), "vae"} (+ "text_encoder_2"
    with a second text encoder): float32 jax.ShapeDtypeStruct trees from the configs alone, so
    nothing is allocated."""
    parts = {"text_encoder": spec.text, spec.denoiser.FOLDER: spec.denoiser, "vae": spec.vae}
    if spec.text_2 is not None:
        parts["text_encoder_2"] = spec.text_2
    return {part: unflatten({k: jax.ShapeDtypeStruct(tuple(s), jnp.float32)
                             for k, s in component_weights.shapes(config).items()})
            for part, config in parts.items()}
