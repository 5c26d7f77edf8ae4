"""Reading one component of a diffusers model folder: its config and its weights.

Each component (`text_encoder/`, `unet/`, `vae/`) is read into the owned model's config and a
float32 parameter tree named like the PyTorch state dict (see weights.py). Weights come, in this
order, from PyTorch safetensors (one file or a sharded index; read without torch), PyTorch `.bin`
(needs torch), or the Flax msgpack of an old Flax pipeline (renamed by flax_layout.py). Every file
goes through `files`, so a damaged one is a one-line DamagedFile naming it, and weights that do not
fit the config are a UserError naming the first offending weight. (A whole model folder, all its
components together, is its family's: `families.load_model`.)
"""

import os

import numpy as np

from .. import files
from ..errors import UserError
from . import clip, flax_layout, unet, vae
from .weights import check_params, unflatten

# kind -> (safetensors, PyTorch .bin, Flax msgpack) file names.
WEIGHT_FILES = {
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack"),
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "diffusion_flax_model.msgpack"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "diffusion_flax_model.msgpack"),
}
_CONFIGS = {"text_encoder": clip.CLIPTextConfig, "unet": unet.UNetConfig, "vae": vae.VAEConfig}
_SHAPES = {"text_encoder": clip.param_shapes, "unet": unet.param_shapes, "vae": vae.param_shapes}
_WHAT = {"text_encoder": "a CLIP text model config", "unet": "a UNet config", "vae": "an AutoencoderKL config"}


def read_config(folder, kind):
    """The owned config (clip.CLIPTextConfig, unet.UNetConfig or vae.VAEConfig) of a component folder."""
    path = os.path.join(folder, "config.json")
    data = files.read_json(path, "a JSON config file")
    if kind == "text_encoder" and data.get("model_type") == "clip" and isinstance(data.get("text_config"), dict):
        data = data["text_config"]  # a whole CLIPModel's config: its text part
    if kind == "vae":
        name = data.get("_class_name", "AutoencoderKL")
        if name not in ("AutoencoderKL", "FlaxAutoencoderKL"):
            raise UserError(f"{path}: a {name}, not an AutoencoderKL; only the KL VAE is supported")
    with files.reading(path, _WHAT[kind]):
        return _CONFIGS[kind].from_dict(data)


def read_state_dict(folder, kind):
    """({"dotted.name": array}, the file it came from) in PyTorch names and layouts."""
    safetensors, binary, msgpack = WEIGHT_FILES[kind]
    names = set(files.list_folder(folder))
    if safetensors in names:
        path = os.path.join(folder, safetensors)
        return files.read_safetensors(path), path
    if safetensors + ".index.json" in names:
        index = os.path.join(folder, safetensors + ".index.json")
        weight_map = files.read_json(index, "a safetensors index (JSON)").get("weight_map")
        if not isinstance(weight_map, dict):
            raise files.DamagedFile(index, "not a safetensors index (no weight_map)")
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(files.read_safetensors(os.path.join(folder, shard)))
        return state, index
    if binary in names:
        path = os.path.join(folder, binary)
        data = files.read_torch(path)
        if not isinstance(data, dict) or not all(isinstance(v, np.ndarray) for v in data.values()):
            raise files.DamagedFile(path, "not a PyTorch state dict of tensors")
        return data, path
    if msgpack in names:
        path = os.path.join(folder, msgpack)
        return flax_layout.to_state_dict(files.read_msgpack(path), kind), path
    raise UserError(f"{folder}: no weights found (expected {safetensors}, {binary} or {msgpack})")


def load_component(folder, kind):
    """(config, float32 numpy params) of one component folder; see the module docstring."""
    config = read_config(folder, kind)
    state, source = read_state_dict(folder, kind)
    if kind == "text_encoder":
        state = text_model_names(state)
    elif kind == "vae":
        state = vae.convert_old_attention_names(state)
    check_params(_SHAPES[kind](config), state, source)
    return config, unflatten({k: np.asarray(v, dtype=np.float32) for k, v in state.items()})


def text_model_names(state):
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix (4.x, the Hub's SD
    models and CLIPTextModelWithProjection keep it): add it, and drop the `position_ids` buffer
    older versions saved."""
    top = ("embeddings.", "encoder.", "final_layer_norm.")
    state = {("text_model." + k if k.startswith(top) else k): v for k, v in state.items()}
    state.pop("text_model.embeddings.position_ids", None)
    return state


def shapes(config, kind):
    """{"dotted.name": shape} of a component's weights, from its config alone."""
    return _SHAPES[kind](config)
