"""Reading one component of a diffusers model folder: its config and its weights.

Each component (`text_encoder/`, `unet/`, `vae/`; FLUX.1's `transformer/` and `text_encoder_2/`)
is read into the owned model's config and a parameter tree named like the PyTorch state dict (see
weights.py), float32 unless another dtype is asked for. Weights come, in this order, from PyTorch
safetensors (one file or a sharded index; read without torch), PyTorch `.bin` (needs torch), or
the Flax msgpack of an old Flax pipeline (renamed by flax_layout.py; Stable Diffusion's parts
only). Every file goes through `files`, so a damaged one is a one-line DamagedFile naming it, and
weights that do not fit the config are a UserError naming the first offending weight. (A whole
model folder, all its components together, is its family's: `families.load_model`.)

kinds: "text_encoder" (a CLIP text model: clip.py), "unet" (unet.py), "vae" (vae.py),
"transformer" (FLUX.1's FluxTransformer2DModel: flux.py) and "t5" (a T5 encoder, FLUX.1's
text_encoder_2: t5.py).
"""

import os

import numpy as np

from .. import files
from ..errors import UserError
from . import clip, flax_layout, flux, t5, unet, vae
from .weights import check_params, unflatten

# kind -> (safetensors, PyTorch .bin, Flax msgpack or None) file names.
WEIGHT_FILES = {
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack"),
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "diffusion_flax_model.msgpack"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "diffusion_flax_model.msgpack"),
    "transformer": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", None),
    "t5": ("model.safetensors", "pytorch_model.bin", None),
}
_CONFIGS = {"text_encoder": clip.CLIPTextConfig, "unet": unet.UNetConfig, "vae": vae.VAEConfig,
            "transformer": flux.FluxConfig, "t5": t5.T5Config}
_SHAPES = {"text_encoder": clip.param_shapes, "unet": unet.param_shapes, "vae": vae.param_shapes,
           "transformer": flux.param_shapes, "t5": t5.param_shapes}
_WHAT = {"text_encoder": "a CLIP text model config", "unet": "a UNet config", "vae": "an AutoencoderKL config",
         "transformer": "a FluxTransformer2DModel config", "t5": "a T5 encoder config"}
# A T5 folder saved from a whole T5ForConditionalGeneration (google/t5-v1_1-xxl) also holds the
# decoder and the LM head. FLUX conditions on the encoder alone, and transformers'
# T5EncoderModel.from_pretrained reads such a folder by skipping them; so do we, before reading.
T5_NOT_ENCODER = ("decoder.", "lm_head.")


def read_config(folder, kind):
    """The owned config (clip.CLIPTextConfig, unet.UNetConfig, vae.VAEConfig, flux.FluxConfig or
    t5.T5Config) of a component folder."""
    path = os.path.join(folder, "config.json")
    data = files.read_json(path, "a JSON config file")
    if kind == "text_encoder" and data.get("model_type") == "clip" and isinstance(data.get("text_config"), dict):
        data = data["text_config"]  # a whole CLIPModel's config: its text part
    if kind == "vae":
        name = data.get("_class_name", "AutoencoderKL")
        if name not in ("AutoencoderKL", "FlaxAutoencoderKL"):
            raise UserError(f"{path}: a {name}, not an AutoencoderKL; only the KL VAE is supported")
    if kind == "t5" and data.get("model_type") != "t5":
        raise UserError(f"{path}: model_type {data.get('model_type')!r}, not a T5 encoder (\"t5\"); FLUX.1's "
                        "text_encoder_2 is T5-XXL v1.1's encoder")
    with files.reading(path, _WHAT[kind]):
        if kind in ("transformer", "t5"):
            try:
                return _CONFIGS[kind].from_dict(data)
            except UserError as err:  # the config classes' messages do not name the file
                raise UserError(f"{path}: {err}") from None
        return _CONFIGS[kind].from_dict(data)


def read_state_dict(folder, kind, keep=None):
    """({"dotted.name": array}, the file it came from) in PyTorch names, layouts and the stored dtype.

    `keep(name)`: read only the weights it is true for (safetensors: the others are never read).
    """
    safetensors, binary, msgpack = WEIGHT_FILES[kind]
    names = set(files.list_folder(folder))
    keep = keep or (lambda name: True)
    if safetensors in names:
        path = os.path.join(folder, safetensors)
        return _read_safetensors(path, keep), path
    if safetensors + ".index.json" in names:
        index = os.path.join(folder, safetensors + ".index.json")
        weight_map = files.read_json(index, "a safetensors index (JSON)").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise files.DamagedFile(index, "not a safetensors index (no weight_map)")
        state = {}
        for shard in sorted(set(weight_map.values())):
            wanted = sorted(k for k, v in weight_map.items() if v == shard and keep(k))
            if wanted:
                state.update(files.read_safetensors(os.path.join(folder, shard), keys=wanted))
        return state, index
    if binary in names:
        path = os.path.join(folder, binary)
        data = files.read_torch(path)
        if not isinstance(data, dict) or not all(isinstance(v, np.ndarray) for v in data.values()):
            raise files.DamagedFile(path, "not a PyTorch state dict of tensors")
        return {k: v for k, v in data.items() if keep(k)}, path
    if msgpack is not None and msgpack in names:
        path = os.path.join(folder, msgpack)
        return flax_layout.to_state_dict(files.read_msgpack(path), kind), path
    expected = f"{safetensors}, {binary}" + (f" or {msgpack}" if msgpack else "")
    if msgpack is None:
        expected = f"{safetensors} (or its .index.json) or {binary}"
    raise UserError(f"{folder}: no weights found (expected {expected})")


def _read_safetensors(path, keep):
    import ml_dtypes  # noqa: F401  (safetensors' numpy reader knows bfloat16 once it is imported)

    names = [k for k in files.safetensors_shapes(path) if keep(k)]
    return files.read_safetensors(path, keys=names)


def load_component(folder, kind, dtype=np.float32):
    """(config, numpy params) of one component folder; see the module docstring.

    `dtype`: the float dtype of the returned weights (np.float32, or e.g. "bfloat16" / jnp.bfloat16).
    Each weight is converted from the dtype it is stored in and its stored copy dropped, one at a
    time, so reading FLUX.1 [dev]'s bf16 transformer (24 GB) as bf16 never holds a float32 copy
    (48 GB), and as float32 holds the stored copy of the weights not yet converted beside it.
    """
    dtype = float_dtype(dtype)
    config = read_config(folder, kind)
    keep = (lambda name: not name.startswith(T5_NOT_ENCODER)) if kind == "t5" else None
    state, source = read_state_dict(folder, kind, keep)
    if kind == "text_encoder":
        state = text_model_names(state)
    elif kind == "vae":
        state = vae.convert_old_attention_names(state)
    elif kind == "t5":
        state = t5.canonical_names(state)
    check_params(_SHAPES[kind](config), state, source)
    return config, unflatten(cast_state(state, dtype))


def float_dtype(dtype):
    """`dtype` (a numpy / jax dtype or its name, e.g. "bfloat16") as a numpy float dtype; UserError if not a float."""
    import jax.numpy as jnp

    try:
        out = np.dtype(jnp.dtype(dtype))
    except TypeError:
        out = None
    if out is None or not jnp.issubdtype(out, jnp.floating):
        raise UserError(f"weights dtype {dtype!r}: not a float dtype (use float32, bfloat16 or float16)")
    return out


def cast_state(state, dtype):
    """{name: array} with every float array in `dtype`, converted one at a time and `state` emptied
    as it goes, so only one weight is ever held twice. Integer arrays (buffers) are kept as they are."""
    import jax.numpy as jnp

    out = {}
    for name in list(state):
        array = np.asarray(state.pop(name))
        convert = jnp.issubdtype(array.dtype, jnp.floating) and array.dtype != dtype  # bfloat16's kind is "V"
        out[name] = array.astype(dtype) if convert else array
    return out


def text_model_names(state):
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix (4.x, the Hub's SD
    models and CLIPTextModelWithProjection keep it): add it, and drop the `position_ids` buffer
    older versions saved."""
    top = ("embeddings.", "encoder.", "final_layer_norm.")
    state = {("text_model." + k if k.startswith(top) else k): v for k, v in state.items()}
    state.pop("text_model.embeddings.position_ids", None)
    return state


def shapes(config, kind=None):
    """{"dotted.name": shape} of a component's weights, from its config alone (`kind`: what the
    config is, default told by its type)."""
    if kind is None:
        (kind,) = [k for k, cls in _CONFIGS.items() if isinstance(config, cls)]
    return _SHAPES[kind](config)
