"""Old Flax msgpack weights -> PyTorch-named, PyTorch-layout state dicts.

Folders saved by diffusers' `FlaxStableDiffusionPipeline.save_pretrained` (what ti_flax's
`--save_as_full_pipeline` wrote before the port) hold `unet/diffusion_flax_model.msgpack`,
`vae/diffusion_flax_model.msgpack` and `text_encoder/flax_model.msgpack`. Their trees were made
from PyTorch state dicts by diffusers' and transformers' `convert_pytorch_state_dict_to_flax`;
these are the inverse rules, so the owned models (clip.py, unet.py, vae.py) read such a folder
without diffusers or transformers:

  leaf      Flax                        PyTorch
  kernel    Conv [kh, kw, in, out]      weight [out, in, kh, kw]
  kernel    Dense [in, out]             weight [out, in]
  scale     LayerNorm / GroupNorm       weight
  embedding Embed [vocab, dim]          weight [vocab, dim]

Module names (UNet and VAE only): the i-th module of a list is `name_i` in Flax and `name.i` in
PyTorch (`down_blocks_0` -> `down_blocks.0`, `ff.net_2` -> `ff.net.2`); the VAE's mid-block
attention names its projections `query` / `key` / `value` / `proj_attn` (PyTorch `to_q` / `to_k` /
`to_v` / `to_out.0`), the UNet's attention `to_q` / `to_k` / `to_v` / `to_out_0`. The text
encoder's names are PyTorch's already (its encoder layers are Flax modules named "0", "1", ...).

Arrays keep the file's dtype (float32, or bfloat16 for the `bf16` Hub revisions); the caller casts.
Anything these rules do not know keeps its Flax name, so `weights.check_params` reports it.
"""

import os

import numpy as np

from .. import files
from .weights import check_params

KINDS = ("text_encoder", "unet", "vae")
# The file `save_pretrained` writes in each component's folder.
FILENAMES = {
    "text_encoder": "flax_model.msgpack",
    "unet": "diffusion_flax_model.msgpack",
    "vae": "diffusion_flax_model.msgpack",
}

# diffusers' Flax modules that are lists: PyTorch's nn.ModuleList / nn.Sequential index.
_LISTS = frozenset((
    "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
    "downsamplers", "upsamplers", "net", "to_out",
))
# diffusers' Flax VAE attention (FlaxAttentionBlock): its Flax names are the pre-0.14 PyTorch ones.
_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Conv kernel [kh, kw, in, out] -> [out, in, kh, kw]; Dense kernel [in, out] -> [out, in].
_KERNEL_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}
_TEXT_PARTS = ("embeddings", "encoder", "final_layer_norm")


def _module_name(part):
    """`down_blocks_0` -> `down_blocks.0`, `query` -> `to_q`; other names unchanged."""
    if part in _RENAMES:
        return _RENAMES[part]
    base, _, index = part.rpartition("_")
    return f"{base}.{index}" if base in _LISTS and index.isdigit() else part


def _leaf(name, array):
    """(PyTorch leaf name, array in PyTorch's layout) for one Flax leaf."""
    if name == "kernel" and np.ndim(array) in _KERNEL_AXES:
        return "weight", np.ascontiguousarray(np.transpose(array, _KERNEL_AXES[np.ndim(array)]))
    if name in ("scale", "embedding"):
        return "weight", np.asarray(array)
    return name, np.asarray(array)


def to_state_dict(tree, kind):
    """The PyTorch state dict of a Flax params tree.

    Args:
      tree: nested dicts of arrays, as `files.read_msgpack` returns them.
      kind: "text_encoder", "unet" or "vae".

    Returns:
      {"dotted.name": np.ndarray}: the names and layouts of the diffusers / transformers PyTorch
      model (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`).

    Example:
      >>> to_state_dict({"conv_in": {"kernel": np.zeros((3, 3, 4, 32))}}, "unet")["conv_in.weight"].shape
      (32, 4, 3, 3)
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "text_encoder" and "text_model" not in tree and any(p in tree for p in _TEXT_PARTS):
        tree = {"text_model": tree}  # a CLIPTextTransformer's own tree, without the model's prefix
    rename = (lambda part: part) if kind == "text_encoder" else _module_name
    out = {}

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, path + [rename(str(key))])
            else:
                leaf, array = _leaf(str(key), value)
                out[".".join(path + [leaf])] = array

    walk(tree, [])
    return out


def read_state_dict(path, kind, expected_shapes):
    """The checked PyTorch state dict of one Flax msgpack file.

    Args:
      path: a component's msgpack file (FILENAMES[kind] in its folder).
      kind: "text_encoder", "unet" or "vae".
      expected_shapes: the owned model's `param_shapes(config)`.

    Returns:
      {"dotted.name": np.ndarray}, exactly the names and shapes of `expected_shapes`.

    Raises:
      UserError (files.DamagedFile for an unreadable file) naming the file and the first
      missing, unexpected or wrongly shaped weight.
    """
    state_dict = to_state_dict(files.read_msgpack(path), kind)
    check_params(expected_shapes, state_dict, os.fspath(path))
    return state_dict
