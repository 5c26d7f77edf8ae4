"""The PyTorch layers the model ports share, as pure functions over PyTorch-shaped weights.

Activations are NHWC (images) or [..., features]; a Linear weight is [out, in], a Conv2d weight
[out, in, kh, kw]. Weights are cast to the activations' dtype at use, and the normalisations keep
their statistics and affine in float32 (bf16 safety), returning the input's dtype.
"""

import jax
import jax.numpy as jnp


def linear(p, x):
    """nn.Linear: x @ weight.T (+ bias), contracting over the [out, in] weight directly; plus the
    low-rank path (x @ lora_A.T) @ lora_B.T where `p` carries one (models/lora.py attaches it)."""
    y = jnp.einsum("...i,oi->...o", x, p["weight"].astype(x.dtype))
    if "lora_A" in p:
        y = y + jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x, p["lora_A"].astype(x.dtype)),
                           p["lora_B"].astype(x.dtype))
    return y + p["bias"].astype(x.dtype) if "bias" in p else y


def conv2d(p, x, stride=1, padding=None):
    """nn.Conv2d over NHWC x; `padding` an int or [(lo, hi), (lo, hi)], default 'same' for odd kernels.
    A low-rank path where `p` carries one: lora_A a conv of the weight's kernel, stride and padding
    to the rank's channels, lora_B a 1x1 conv back (PEFT's Conv2d LoRA)."""
    w = p["weight"].astype(x.dtype)
    pad = (w.shape[-1] - 1) // 2 if padding is None else padding
    pad = [(pad, pad)] * 2 if isinstance(pad, int) else pad
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=("NHWC", "OIHW", "NHWC"))
    if "lora_A" in p:
        down = jax.lax.conv_general_dilated(x, p["lora_A"].astype(x.dtype), (stride, stride), pad,
                                            dimension_numbers=("NHWC", "OIHW", "NHWC"))
        y = y + jnp.einsum("...r,or->...o", down, p["lora_B"].astype(x.dtype).reshape(w.shape[0], -1))
    return y + p["bias"].astype(x.dtype)


def _affine(p, normalised, dtype):
    return (normalised * p["weight"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(dtype)


def group_norm(p, x, groups, eps):
    """nn.GroupNorm over the channels (last axis) of x [B, ..., C]."""
    shape = x.shape
    xf = x.astype(jnp.float32).reshape(shape[0], -1, groups, shape[-1] // groups)
    mean = xf.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xf - mean).mean(axis=(1, 3), keepdims=True)
    return _affine(p, ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(shape), x.dtype)


def layer_norm(p, x, eps=1e-5):
    """nn.LayerNorm over the last axis."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return _affine(p, (xf - mean) * jax.lax.rsqrt(var + eps), x.dtype)


def embedding_with_rows(table, input_ids, rows=None, base_vocab_size=None, dtype=jnp.float32):
    """nn.Embedding with learned rows beside a frozen `table` [V, D]: [..., D] in `dtype`.

    Ids below `base_vocab_size` (default: the table's length) read the table; ids at or above it
    read `rows[id - base_vocab_size]` ([num_new, D]). The table is never grown or copied, so the
    only gradient a caller can take is w.r.t. `rows`. `rows=None` is a plain lookup.
    """
    if rows is None:
        return jnp.take(table, input_ids, axis=0).astype(dtype)
    base = table.shape[0] if base_vocab_size is None else base_vocab_size
    is_new = input_ids >= base
    # Both lookups use in-range indices everywhere (0 where the other table applies), so the
    # gradient w.r.t. `rows` gets contributions only from positions that hold learned ids.
    frozen = jnp.take(table, jnp.where(is_new, 0, input_ids), axis=0).astype(dtype)
    learned = jnp.take(rows, jnp.where(is_new, input_ids - base, 0), axis=0).astype(dtype)
    return jnp.where(is_new[..., None], learned, frozen)
