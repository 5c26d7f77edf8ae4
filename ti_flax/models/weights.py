"""Weights as nested dicts that mirror the PyTorch state-dict names, in PyTorch's layouts.

`unet.down_blocks.0.resnets.1.conv1.weight` lives at
`params["down_blocks"]["0"]["resnets"]["1"]["conv1"]["weight"]`, shaped as PyTorch stores it
(Linear [out, in], Conv2d [out, in, kh, kw]). Reading a diffusers folder is then a safetensors
read and an `unflatten`; writing a PyTorch-layout folder is a `flatten` and a write. The model
functions (clip.py, unet.py, vae.py) contract over the PyTorch axes directly.
"""

import numpy as np

from ..errors import UserError


def unflatten(state_dict):
    """{"a.b.c": array} -> {"a": {"b": {"c": array}}}."""
    tree = {}
    for name, value in state_dict.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree, prefix=""):
    """{"a": {"b": {"c": array}}} -> {"a.b.c": array}; the inverse of `unflatten`."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_params(expected_shapes, state_dict, source):
    """UserError naming the first missing, unexpected or wrongly shaped weight of `source`.

    Args:
      expected_shapes: {"a.b.c": shape tuple} of the model the config describes.
      state_dict: {"a.b.c": array} as read from the file.
      source: the file or folder, for the message.
    """
    missing = sorted(set(expected_shapes) - set(state_dict))
    if missing:
        raise UserError(
            f"{source}: weight {missing[0]} is missing ({len(missing)} missing in all); "
            "the weights do not belong to this config"
        )
    unexpected = sorted(set(state_dict) - set(expected_shapes))
    if unexpected:
        raise UserError(
            f"{source}: unexpected weight {unexpected[0]} ({len(unexpected)} unexpected in all); "
            "the weights do not belong to this config"
        )
    for name in sorted(expected_shapes):
        want, got = tuple(expected_shapes[name]), tuple(np.shape(state_dict[name]))
        if want != got:
            raise UserError(f"{source}: weight {name} has shape {got}, but the config needs {want}")
