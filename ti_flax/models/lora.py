"""Low-rank adapters (LoRA) of a frozen network's Linear and Conv2d layers, as PEFT defines them.

A layer with weight W [out, in] gets two factors, A [rank, in] and B [out, rank], and computes
W x + (alpha / rank) * B A x. A Conv2d weight [out, in, kh, kw] gets A [rank, in, kh, kw] (a conv
of the layer's kernel, stride and padding) and B [out, rank, 1, 1]. A starts uniform in
+-1/sqrt(fan_in) (PEFT's kaiming_uniform with a = sqrt(5)) and B at zero, so an adapter starts as
the base network exactly.

The factors are a tree of their own, `{module: {"lora_A": A, "lora_B": B}}` keyed by the module's
PyTorch name ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"): the trainable
leaf, beside the rows. `attach` puts them, B scaled, into the frozen params tree where
`layers.linear` and `layers.conv2d` find them; the frozen weights are never copied or changed.

    >>> shapes = target_shapes(unet.param_shapes(config), modules(("attn",)))   # doctest: +SKIP
    >>> factors = init(jax.random.key(0), shapes, rank=4)                          # doctest: +SKIP
    >>> params = attach(unet_params, factors, scale=alpha / 4)                     # doctest: +SKIP
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..config.choices import LORA_TARGET_GROUPS as GROUPS
from ..errors import UserError

NAMES = tuple(name for group in GROUPS.values() for name in group)


def modules(targets):
    """The module names (e.g. "to_q", "ff.net.2") that `targets` (names or GROUPS keys) stand for,
    each once, in NAMES' order; UserError for an unknown one."""
    wanted = set()
    for target in targets:
        if target in GROUPS:
            wanted.update(GROUPS[target])
        elif target in NAMES:
            wanted.add(target)
        else:
            raise UserError(f"--lora_targets {target!r}: choose from {', '.join((*GROUPS, *NAMES))}")
    return tuple(name for name in NAMES if name in wanted)


def target_shapes(param_shapes, names):
    """{module: weight shape} of the modules in `param_shapes` ({"dotted.name": shape}, a
    network's state dict) whose name ends with one of `names`, in the state dict's order."""
    out = {}
    for key, shape in param_shapes.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and any(module == n or module.endswith("." + n) for n in names) and len(shape) in (2, 4):
            out[module] = tuple(shape)
    return out


def factor_shapes(weight_shape, rank):
    """(A's shape, B's shape) for a Linear [out, in] or Conv2d [out, in, kh, kw] weight."""
    if len(weight_shape) == 2:
        out, fan_in = weight_shape
        return (rank, fan_in), (out, rank)
    out, c_in, kh, kw = weight_shape
    return (rank, c_in, kh, kw), (out, rank, 1, 1)


def check_rank(shapes, rank):
    """UserError unless 1 <= rank <= every target's smaller side (its in or out features)."""
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"--lora_rank must be a positive whole number, got {rank}")
    if not shapes:
        raise UserError("--lora_targets: the model has no such module")
    module, shape = min(shapes.items(), key=lambda item: min(item[1][0], item[1][1]))
    width = min(shape[0], shape[1])
    if rank > width:
        raise UserError(f"--lora_rank {rank} is above the width of {module} ({width}); choose at most {width}")


def init(key, shapes, rank):
    """Fresh float32 factors for `shapes` ({module: weight shape}): A uniform in +-1/sqrt(fan_in),
    each module's draw from fold_in(key, its index in `shapes`), B zero."""
    factors = {}
    for i, (module, shape) in enumerate(shapes.items()):
        a_shape, b_shape = factor_shapes(shape, rank)
        bound = 1.0 / math.sqrt(int(np.prod(a_shape[1:])))
        a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
        factors[module] = {"lora_A": a, "lora_B": jnp.zeros(b_shape, jnp.float32)}
    return factors


def attach(params, factors, scale):
    """`params` (a nested PyTorch-named tree) with each module of `factors` carrying its factors:
    "lora_A" as it is and "lora_B" times `scale` (alpha / rank). New dicts along each path; the
    leaves of `params` are shared, not copied."""
    def carry(layer, pair):
        up = pair["lora_B"] if scale == 1 else pair["lora_B"] * scale
        return {**layer, "lora_A": pair["lora_A"], "lora_B": up}

    return _with_layers(params, factors, carry)


def merge(params, factors, scale):
    """`params` with each module of `factors` merged into its weight (W + scale * B A, float32
    numpy, cast back to W's dtype): the base network a LoRA-less reader (a full pipeline) loads.
    New dicts along each path; the other leaves are shared."""
    def merged(layer, pair):
        weight = layer["weight"]
        return {**layer, "weight": merged_weight(weight, pair, scale).astype(np.asarray(weight).dtype)}

    return _with_layers(params, factors, merged)


def _with_layers(params, factors, change):
    """`params` with the layer of each module of `factors` replaced by `change(layer, its pair)`,
    new dicts along each path (the other leaves shared)."""
    out = dict(params)
    for module, pair in factors.items():
        node, path = out, module.split(".")
        for name in path[:-1]:
            node[name] = dict(node[name])
            node = node[name]
        node[path[-1]] = change(node[path[-1]], pair)
    return out


def merged_weight(weight, pair, scale):
    """W + scale * B A as a float32 numpy array of W's shape (a merged checkpoint's weight)."""
    a, b = np.asarray(pair["lora_A"], np.float32), np.asarray(pair["lora_B"], np.float32)
    delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    return np.asarray(weight, np.float32) + scale * delta.reshape(np.shape(weight))
