"""Loading a pretrained model through its family: a diffusers folder (local, or a Hub snapshot) is
claimed by the family whose parts it has, a single file by the family whose layout it is in."""

import os

from ..errors import UserError
from ..models import model_folder, pretrained, single_file
from .registry import FAMILIES, get


def family_of_folder(model_dir):
    """The family that claims a diffusers folder (`ModelFamily.claims`), nothing checked; where none
    does (no model there), the first, whose `check_folder` says what a model folder lacks."""
    name = model_folder.class_name(model_dir)
    return next((family for family in FAMILIES if family.claims(model_dir, name)), FAMILIES[0])


def detect_folder(model_dir, tokenizer_dir=None):
    """The family of a diffusers folder, its parts checked (before any weight is read).

    Raises UserError (one line) for a pipeline of a kind ti_flax does not train, or one that
    lacks a part its family needs.
    """
    model_folder.refuse_foreign(model_dir, model_folder.class_name(model_dir))
    family = family_of_folder(model_dir)
    family.check_folder(model_dir, tokenizer_dir)
    return family


def load_model(name_or_path, revision=None, tokenizer_name=None, prediction_type=None, allow_pickle=False,
               zero_terminal_snr=None, vae=None, separate=None, dtype="float32"):
    """Load a model's tokenizer(s), text encoder(s), denoiser, VAE and noise schedule.

    Args:
      name_or_path: a diffusers folder, a Hub id, or one original-layout checkpoint file
        (A1111 / ComfyUI `.safetensors`; `.ckpt` with `allow_pickle`), see models/single_file.py.
      revision: the Hub revision. tokenizer_name: a tokenizer folder or Hub id instead of the model's.
      prediction_type: "epsilon" or "v_prediction" instead of what the scheduler config says (a
        single file has none: epsilon unless given).
      allow_pickle: let a single `.ckpt` file be unpickled (it can run code: trusted files only).
      zero_terminal_snr: True rescales the noise schedule (training and sampling) to zero terminal
        SNR with "trailing" timesteps, False turns a rescaling off; None: what the scheduler config
        (a single file: its `ztsnr` marker) says.
      vae: another VAE to use instead of the model's (--pretrained_vae_model_name_or_path): see
        models.pretrained.with_vae.
      separate: {flag name: path} of the parts a model kept as files has apart (FLUX.1's --clip_l,
        --t5xxl, --ae, --t5xxl_tokenizer), for a family that reads files itself; unset ones None.
      dtype: the weights' dtype on the host, where the family loads them so (FLUX.1: bf16 keeps
        [dev] at 24 GB); the Stable Diffusion families load float32, and the engine casts.
    Returns:
      a models.LoadedModel whose spec names its family.
    """
    pretrained.check_prediction_type(prediction_type)
    separate = {name: path for name, path in (separate or {}).items() if path is not None}
    if pretrained.is_single_file(name_or_path):
        path = os.fspath(name_or_path)
        claimed = [family for family in FAMILIES if family.claims_file(path)]
        if claimed:
            model = claimed[0].load_file(path, separate, dtype)
        else:
            _refuse_separate(separate, f"{path} is not a FLUX.1 transformer file")
            layouts = [family.layout for family in FAMILIES if family.layout is not None]
            model = single_file.load(path, layouts, _spec_of, revision, tokenizer_name, prediction_type, allow_pickle,
                                     zero_terminal_snr)
    else:
        model_dir = model_folder.resolve_model_dir(name_or_path, revision)
        tokenizer_dir = model_folder.resolve_model_dir(tokenizer_name, revision) if tokenizer_name else None
        family = detect_folder(model_dir, tokenizer_dir)
        _refuse_separate(separate, f"{model_dir} is a model folder, which holds every part")
        model = family.load_folder(model_dir, tokenizer_dir, prediction_type, zero_terminal_snr, dtype)
    return model if vae is None else pretrained.with_vae(model, vae, revision, allow_pickle)


def _refuse_separate(separate, why):
    """UserError naming the first of `separate`'s flags: they name the parts of FLUX.1 kept as files."""
    if separate:
        name = next(iter(separate))
        raise UserError(f"--{name}: names a part of FLUX.1 kept as files (with its transformer file as "
                        f"--pretrained_model_name_or_path), but {why}; drop it")


def _spec_of(name, configs, prediction_type, num_train_timesteps, tokenizers):
    return get(name).spec(configs, prediction_type, num_train_timesteps, tokenizers)


def read_spec(name_or_path, revision=None, prediction_type=None):
    """(ModelSpec, alphas_cumprod) of a diffusers folder or Hub id from its config files alone:
    no weights are read, and from the Hub only the configs are fetched. For measuring the model's
    step (`ti_flax.plan`)."""
    if pretrained.is_single_file(name_or_path):
        raise UserError(f"--pretrained_model_name_or_path {os.fspath(name_or_path)}: planning reads a model's "
                        "config files; pass a diffusers folder or Hub id of the same architecture")
    model_dir = model_folder.resolve_model_dir(name_or_path, revision, model_folder.CONFIG_FILES)
    return detect_folder(model_dir).read_spec(model_dir, prediction_type)
