"""Running the frozen model's parts: pure functions of a static `ModelSpec` (what the model is),
a `Compute` (how this run computes with it) and the weights, for use inside jit / pmap.

`encode_text` runs a CLIP text encoder over a prompt's ids (with the learned rows), `predict_noise`
the UNet, `vae_moments` / `decode_latents` the VAE; what a family conditions its UNet on is the
family's (`families/`, `ModelFamily.condition`). The helpers on the
parameter trees (`cast_params`, `token_table`, `with_token_table`) work on host arrays.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import attention as attention_lib, clip, unet, vae
from .spec import default_size


def cast_params(params, dtype, abstract=False):
    """A copy of a host params tree with every float leaf cast to `dtype` (e.g. "bfloat16").

    With abstract=True, what that copy would be as jax.ShapeDtypeStruct leaves, with nothing cast
    or copied: for compiling a step while the weights are still being cast.
    """
    dtype = jnp.dtype(dtype)

    def cast(x):
        new = dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        if abstract:
            return jax.ShapeDtypeStruct(np.shape(x), new)
        x = np.asarray(x)
        return x.astype(new) if x.dtype != new else x

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
    side = (resolution or default_size(spec)[0]) // spec.vae_scale_factor
    tokens = side * side
    heads = spec.denoiser.heads[0]
    head_dim = spec.denoiser.block_out_channels[0] // heads
    return attention_lib.resolve(name, backend=backend, dtype=jnp.dtype(dtype), q_len=tokens, kv_len=tokens,
                                 head_dim=head_dim)


def attention_sites(spec, compute, resolution):
    """Which implementation each of the UNet's attention calls runs at `resolution` pixels.

    Returns:
      a list of ((kind, q_len, kv_len, head_dim, implementation), count), kind "self" or
      "cross", in the order the calls first appear; resolved for compute.backend (None: this
      machine's) and compute.dtype, as the traced step resolves them.
    """
    backend = compute.backend or jax.default_backend()
    side = resolution // spec.vae_scale_factor
    counts = {}
    for kind, q_len, kv_len, head_dim in unet.attention_sites(spec.denoiser, (side, side), spec.text.max_position_embeddings):
        implementation = attention_lib.resolve(compute.attention, backend=backend, dtype=jnp.dtype(compute.dtype),
                                               q_len=q_len, kv_len=kv_len, head_dim=head_dim)
        key = (kind, q_len, kv_len, head_dim, implementation)
        counts[key] = counts.get(key, 0) + 1
    return list(counts.items())


def encode_text(spec, compute, text_params, input_ids, rows):
    """CLIP last hidden state [B, L, D] for ids that may include the learned tokens (one text encoder).

    Ids below `spec.base_vocab_size` read the frozen table; ids at or above it read
    `rows[id - base_vocab_size]`. The table is never copied or grown, so the only gradient
    the caller can take is the one with respect to `rows` ([num_vectors, D]).
    """
    out = clip.encode(text_params, spec.text, input_ids, rows, base_vocab_size=spec.base_vocab_size,
                      dtype=jnp.dtype(compute.dtype))
    return out.last_hidden_state


class Condition(NamedTuple):
    """What the UNet is conditioned on for a prompt.

    Attributes:
      context: [B, L, C] the cross-attention states: the text encoder's last hidden state, or for
        SDXL both encoders' penultimate states side by side (C = 768 + 1280).
      text_embeds: a pooled text embedding [B, E] (SDXL's second encoder's, projected); None where
        the family has none.
    """

    context: jax.Array
    text_embeds: object = None


def predict_noise(spec, compute, unet_params, latents, timesteps, encoder_hidden_states, added_cond=None):
    """UNet output for NCHW latents (epsilon or v, per the model's prediction_type), NCHW.

    `added_cond` is SDXL's {"text_embeds": [B, E], "time_ids": [B, 6]} (None otherwise).
    """
    sample = jnp.transpose(latents, (0, 2, 3, 1))
    out = unet.apply(unet_params, spec.denoiser, sample, jnp.asarray(timesteps), encoder_hidden_states,
                     added_cond=added_cond, attention=compute.attention, remat=compute.remat,
                     dtype=jnp.dtype(compute.dtype), backend=compute.backend)
    return jnp.transpose(out, (0, 3, 1, 2))


def vae_moments(spec, compute, vae_params, pixels):
    """Mean and log-variance (NHWC) of the VAE posterior for NHWC pixels in [-1, 1]."""
    return vae.encode(vae_params, spec.vae, pixels, dtype=jnp.dtype(compute.dtype), backend=compute.backend)


def decode_latents(spec, compute, vae_params, latents_nchw):
    """Pixels in about [-1, 1], NCHW, from NCHW latents scaled the way the denoiser sees them
    (divided by the scaling factor, and the VAE's shift added back where it has one: FLUX's)."""
    latents = jnp.transpose(latents_nchw, (0, 2, 3, 1)) / spec.scaling_factor
    if spec.vae.shift_factor is not None:
        latents = latents + spec.vae.shift_factor
    pixels = vae.decode(vae_params, spec.vae, latents, dtype=jnp.dtype(compute.dtype))
    return jnp.transpose(pixels, (0, 3, 1, 2))
