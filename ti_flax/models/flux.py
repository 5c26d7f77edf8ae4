"""diffusers' FluxTransformer2DModel (FLUX.1 [dev] and [schnell]) as pure functions, and FLUX's
latent packing.

The transformer predicts the flow-matching velocity of packed latent tokens:

    x_embedder        image tokens [B, N, in_channels] -> [B, N, C]   (C = heads * head_dim)
    context_embedder  text states [B, L, joint_attention_dim] -> [B, L, C]
    time_text_embed   temb [B, C] = MLP(sinusoid(1000 t)) (+ MLP(sinusoid(1000 g)) for [dev])
                      + MLP(pooled text [B, pooled_projection_dim])
    pos_embed         RoPE tables from the position ids of text then image tokens: each id axis
                      (t, h, w) rotates its own axes_dims_rope[i] dimensions of every head,
                      theta 10000, rotating adjacent pairs (x[2j], x[2j+1])
    transformer_blocks         num_layers double-stream blocks: AdaLayerNormZero (6 modulations
                      from temb) per stream, one attention over text+image tokens (separate
                      q/k/v projections per stream, RMSNorm on q and k per head, RoPE), separate
                      gated output projections and tanh-GELU MLPs (4C) per stream
    single_transformer_blocks  num_single_layers blocks over the concatenated tokens:
                      AdaLayerNormZeroSingle (3 modulations), attention and a 4C tanh-GELU MLP in
                      parallel from the same input, one gated proj_out over both
    norm_out, proj_out AdaLayerNormContinuous (scale first, then shift), Linear to out_channels

Weights are the diffusers state dict as a nested dict (weights.py), Linear [out, in]:
`params["transformer_blocks"]["0"]["attn"]["add_q_proj"]["weight"]`,
`params["single_transformer_blocks"]["3"]["proj_out"]["weight"]` ([C, 5C]: attention then MLP),
`params["time_text_embed"]["guidance_embedder"]["linear_1"]["weight"]` ([dev] only); `param_shapes`
lists them all, and `weights.check_params(param_shapes(config), state_dict, source)` checks a
transformer folder's (sharded) safetensors against them before `weights.unflatten`.

Invariants the config constructor checks:
  * sum(axes_dims_rope) == attention_head_dim: the RoPE axes partition each head's dimensions;
    each axis is even (it rotates pairs), and the ids have one column per axis.
  * patch_size == 1: FLUX.1 packs 2x2 latent patches itself (`pack_latents`) before the
    transformer, so the transformer's own patching is the identity.
Every LayerNorm here has no affine and eps 1e-6, every RMSNorm eps 1e-6; the modulations are
`norm(x) * (1 + scale) + shift` with (shift, scale, gate) in that order, except norm_out's
(scale, shift). Text tokens come first in the joint sequence and in the ids.

Latents. FLUX's VAE (AutoencoderKL, 16 latent channels, no quant convs) is vae.py's; the
pipeline's latents are `(vae_mean_nchw - shift_factor) * scaling_factor` (0.1159, 0.3611), the
inverse `latents / scaling_factor + shift_factor` before `vae.decode`: that is the caller's job
(vae.encode/decode take and give unscaled, unshifted latents). `pack_latents` turns [B, 16, h, w]
latents into [B, (h/2)(w/2), 64] tokens (each token a 2x2 patch, channel-major), `unpack_latents`
undoes it, `latent_image_ids(h, w)` / `text_ids(L)` are the position ids the pipeline passes
(image (0, row, column) per token of the packed grid, text all zeros). The pipeline passes
`timestep = sigma` in [0, 1] (apply scales by 1000 inside, as diffusers does).

    >>> tokens = pack_latents(latents)  # [B, 16, h, w] -> [B, h*w/4, 64]  # doctest: +SKIP
    >>> velocity = apply(params, config, tokens, t5_states, clip_pooled, sigmas,  # doctest: +SKIP
    ...                  latent_image_ids(h, w), text_ids(t5_states.shape[1]), guidance)
    >>> velocity_nchw = unpack_latents(velocity, h, w)  # doctest: +SKIP
"""

import dataclasses
import functools
import json
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UserError
from . import attention as attn_lib
from . import layers

ROPE_THETA = 10000
TIME_CHANNELS = 256  # width of the sinusoidal timestep / guidance embedding (flip_sin_to_cos, no shift)
TIME_SCALE = 1000  # diffusers multiplies timestep and guidance by this inside forward
NORM_EPS = 1e-6  # every LayerNorm (no affine) and every q/k RMSNorm
MLP_RATIO = 4
_CLASS_NAMES = ("FluxTransformer2DModel",)
_POSITIVE = ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim")
_COUNTS = ("num_layers", "num_single_layers")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """FluxTransformer2DModel's config.json fields (defaults as diffusers' constructor: FLUX.1's
    sizes, [schnell]'s guidance_embeds False). Hashable, a jit static argument; checked on construction."""

    FOLDER: ClassVar[str] = "transformer"  # the component's folder (and params key) in a model
    patch_size: int = 1
    in_channels: int = 64
    out_channels: object = None  # None: in_channels, as diffusers
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple = (16, 56, 56)

    def __post_init__(self):
        if isinstance(self.axes_dims_rope, (list, tuple)):
            object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        self._validate()

    @classmethod
    def from_dict(cls, d):
        """From a transformer/config.json dict; unknown keys ignored, another model class a UserError."""
        d = dict(d)
        name = d.get("_class_name")
        if name is not None and name not in _CLASS_NAMES:
            raise UserError(f"flux config: _class_name {name!r} is not a FluxTransformer2DModel")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self):
        """The config.json fields (tuples as lists): from_dict(to_dict()) round-trips."""
        return {f.name: json.loads(json.dumps(getattr(self, f.name))) for f in dataclasses.fields(self)}

    @property
    def inner_dim(self):
        """The width C of every token in the blocks: heads * head_dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_multiple(self):
        """Latent sides must be multiples of this: the 2x2 packing (pack_latents)."""
        return 2

    @property
    def out_dim(self):
        return self.out_channels or self.in_channels

    def _validate(self):
        for name in _POSITIVE + _COUNTS + ("patch_size",):
            value = getattr(self, name)
            low = 0 if name in _COUNTS else 1
            if not _is_int(value) or value < low:
                raise UserError(f"flux config: {name} {value!r} is not an integer >= {low}")
        if self.out_channels is not None and (not _is_int(self.out_channels) or self.out_channels < 1):
            raise UserError(f"flux config: out_channels {self.out_channels!r} is not a positive integer or null")
        if not isinstance(self.guidance_embeds, bool):
            raise UserError(f"flux config: guidance_embeds {self.guidance_embeds!r} is not true or false")
        if self.patch_size != 1:
            raise UserError(
                f"flux config: patch_size {self.patch_size} is not supported (only 1: FLUX.1 packs "
                "2x2 latent patches before the transformer)"
            )
        axes = self.axes_dims_rope
        if not isinstance(axes, tuple) or not axes or not all(_is_int(d) and d > 0 and d % 2 == 0 for d in axes):
            raise UserError(f"flux config: axes_dims_rope {axes!r} is not a list of positive even integers")
        if sum(axes) != self.attention_head_dim:
            raise UserError(
                f"flux config: axes_dims_rope {list(axes)} add up to {sum(axes)}, not attention_head_dim "
                f"{self.attention_head_dim}; the RoPE axes must add up to the head width"
            )


# --------------------------------------------------------------------------------------------
# Parameter names and shapes


def _linear_shapes(prefix, d_in, d_out, bias=True):
    out = {f"{prefix}.weight": (d_out, d_in)}
    if bias:
        out[f"{prefix}.bias"] = (d_out,)
    return out


def _qk_norm_shapes(prefix, head_dim, added=False):
    names = ("norm_added_q", "norm_added_k") if added else ("norm_q", "norm_k")
    return {f"{prefix}.{n}.weight": (head_dim,) for n in names}


def _mlp_shapes(prefix, c):
    hidden = MLP_RATIO * c
    return {**_linear_shapes(f"{prefix}.net.0.proj", c, hidden), **_linear_shapes(f"{prefix}.net.2", hidden, c)}


def param_shapes(config):
    """{"dotted.name": shape} of FluxTransformer2DModel's state dict for this config."""
    c, d = config.inner_dim, config.attention_head_dim
    s = {}
    embedders = ("timestep_embedder", "guidance_embedder") if config.guidance_embeds else ("timestep_embedder",)
    for name in embedders:
        s.update(_linear_shapes(f"time_text_embed.{name}.linear_1", TIME_CHANNELS, c))
        s.update(_linear_shapes(f"time_text_embed.{name}.linear_2", c, c))
    s.update(_linear_shapes("time_text_embed.text_embedder.linear_1", config.pooled_projection_dim, c))
    s.update(_linear_shapes("time_text_embed.text_embedder.linear_2", c, c))
    s.update(_linear_shapes("context_embedder", config.joint_attention_dim, c))
    s.update(_linear_shapes("x_embedder", config.in_channels, c))
    for i in range(config.num_layers):
        b = f"transformer_blocks.{i}"
        s.update(_linear_shapes(f"{b}.norm1.linear", c, 6 * c))
        s.update(_linear_shapes(f"{b}.norm1_context.linear", c, 6 * c))
        s.update(_qk_norm_shapes(f"{b}.attn", d))
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            s.update(_linear_shapes(f"{b}.attn.{n}", c, c))
        s.update(_qk_norm_shapes(f"{b}.attn", d, added=True))
        for n in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            s.update(_linear_shapes(f"{b}.attn.{n}", c, c))
        s.update(_mlp_shapes(f"{b}.ff", c))
        s.update(_mlp_shapes(f"{b}.ff_context", c))
    for i in range(config.num_single_layers):
        b = f"single_transformer_blocks.{i}"
        s.update(_linear_shapes(f"{b}.norm.linear", c, 3 * c))
        s.update(_linear_shapes(f"{b}.proj_mlp", c, MLP_RATIO * c))
        s.update(_linear_shapes(f"{b}.proj_out", c + MLP_RATIO * c, c))
        s.update(_qk_norm_shapes(f"{b}.attn", d))
        for n in ("to_q", "to_k", "to_v"):
            s.update(_linear_shapes(f"{b}.attn.{n}", c, c))
    s.update(_linear_shapes("norm_out.linear", c, 2 * c))
    s.update(_linear_shapes("proj_out", c, config.patch_size**2 * config.out_dim))
    return s


# --------------------------------------------------------------------------------------------
# Latent packing and position ids


def pack_latents(latents):
    """[B, C, h, w] latents (NCHW) -> [B, (h/2)(w/2), 4C] tokens, row-major over the 2x2 patches,
    each token its patch's channels (c, dy, dx) with c slowest: FluxPipeline._pack_latents."""
    latents = jnp.asarray(latents)
    if latents.ndim != 4:
        raise UserError(f"pack_latents: latents of shape {tuple(latents.shape)} are not [B, C, h, w]")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise UserError(f"pack_latents: latent sides {h}x{w} are not even (FLUX packs 2x2 patches)")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens, height, width):
    """[B, (h/2)(w/2), 4C] tokens -> [B, C, h, w] latents; `height`, `width` are the latent sides
    h, w (pixels / 8), not the image's. The inverse of `pack_latents` (FluxPipeline._unpack_latents)."""
    tokens = jnp.asarray(tokens)
    b, n, channels = tokens.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or channels % 4:
        raise UserError(
            f"unpack_latents: {n} tokens of {channels} channels are not the 2x2 patches of {height}x{width} latents"
        )
    x = tokens.reshape(b, height // 2, width // 2, channels // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def latent_image_ids(height, width):
    """[(h/2)(w/2), 3] float32 ids (0, row, column) of the packed tokens of h x w latents (latent
    sides, as `unpack_latents`): FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2)."""
    if height % 2 or width % 2:
        raise UserError(f"latent_image_ids: latent sides {height}x{width} are not even (FLUX packs 2x2 patches)")
    rows, cols = np.meshgrid(np.arange(height // 2), np.arange(width // 2), indexing="ij")
    ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3)
    return ids.astype(np.float32)


def text_ids(num_tokens):
    """[num_tokens, 3] float32 zeros: the position ids the pipeline gives the T5 tokens."""
    return np.zeros((num_tokens, 3), np.float32)


# --------------------------------------------------------------------------------------------
# Layers (activations [B, L, C] in the compute dtype; norm statistics and modulation in float32)


def _layer_norm(x):
    """LayerNorm without affine, eps 1e-6, in float32 (the caller casts)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + NORM_EPS)


def _modulate(x, shift, scale):
    """norm(x) * (1 + scale) + shift, per example ([B, C] shift and scale), in x's dtype."""
    out = _layer_norm(x) * (1 + scale.astype(jnp.float32)[:, None]) + shift.astype(jnp.float32)[:, None]
    return out.astype(x.dtype)


def _rms_norm(p, x):
    """torch.nn.RMSNorm over the last axis, eps 1e-6, statistics in float32."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + NORM_EPS)
    return (xf * p["weight"].astype(jnp.float32)).astype(x.dtype)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _mlp(p, x):
    """diffusers FeedForward(activation_fn="gelu-approximate"): net.0.proj, tanh-GELU, net.2."""
    return layers.linear(p["net"]["2"], _gelu_tanh(layers.linear(p["net"]["0"]["proj"], x)))


def _adaln(p, temb, n):
    """The n modulation vectors [B, C] of an AdaLayerNorm*: Linear(SiLU(temb)) split n ways."""
    return jnp.split(layers.linear(p["linear"], jax.nn.silu(temb)), n, axis=-1)


@functools.lru_cache(maxsize=None)
def _time_frequencies():
    # As diffusers' get_timestep_embedding: the exponent in float32, exp rounded to float32.
    exponent = np.float32(-math.log(10000)) * np.arange(TIME_CHANNELS // 2, dtype=np.float32)
    exponent = exponent / np.float32(TIME_CHANNELS // 2)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def _time_embedding(p, t, dtype):
    """TimestepEmbedding(Timesteps(256, flip_sin_to_cos=True, shift 0)(t)) for t [B] (already x1000)."""
    args = t.astype(jnp.float32)[:, None] * _time_frequencies()[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # flipped: cos first
    return layers.linear(p["linear_2"], jax.nn.silu(layers.linear(p["linear_1"], emb.astype(dtype))))


# --------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_frequencies(axes_dims):
    """[head_dim / 2] float32: each id axis i's theta ** (-2j / axes_dims[i]), axes concatenated."""
    return np.concatenate(
        [1.0 / ROPE_THETA ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in axes_dims]
    ).astype(np.float32)


def rope_tables(ids, axes_dims):
    """(cos, sin), each [L, head_dim / 2] float32, of ids [L, len(axes_dims)]: one angle per
    rotated pair, pair j of axis i at angle ids[:, i] * theta ** (-2j / axes_dims[i]).

    diffusers keeps each angle twice (repeat_interleave) in [L, head_dim] tables and takes the
    products in float64; here they are float32: an entry differs from diffusers' by about 2e-6 at
    a 1024-pixel image's positions (a 64x64 token grid) and 7e-6 at 2048 pixels."""
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or ids.shape[-1] != len(axes_dims):
        raise UserError(
            f"flux: position ids of shape {tuple(ids.shape)} are not [tokens, {len(axes_dims)}] "
            f"(one column per RoPE axis of axes_dims_rope {list(axes_dims)})"
        )
    axis_of_pair = np.repeat(np.arange(len(axes_dims)), [d // 2 for d in axes_dims])
    angles = ids.astype(jnp.float32)[:, axis_of_pair] * rope_frequencies(axes_dims)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x, cos, sin):
    """Rotate each adjacent pair (x[2j], x[2j+1]) of x [B, L, H, D] by its angle, in float32."""
    b, length, heads, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, length, heads, d // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([real * c - imag * s, imag * c + real * s], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Attention and blocks


def _project(p, x, head_dim, q, k, v, norm_q, norm_k):
    """q, k, v [B, L, H, D] of one stream: Linear, split into heads, RMSNorm on q and k."""
    b, length, _ = x.shape

    def heads(name):
        return layers.linear(p[name], x).reshape(b, length, -1, head_dim)

    return _rms_norm(p[norm_q], heads(q)), _rms_norm(p[norm_k], heads(k)), heads(v)


def _attend(q, k, v, rope, implementation, backend):
    """RoPE on q and k, then softmax attention over all tokens: [B, L, H, D] -> [B, L, H * D]."""
    cos, sin = rope
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    b, length, heads, d = q.shape
    impl = attn_lib.resolve(implementation, backend=backend, dtype=q.dtype, q_len=length, kv_len=length, head_dim=d)
    out = attn_lib.attention(q, k, v, implementation=impl, backend=backend)
    return out.reshape(b, length, heads * d)


def _double_block(p, img, txt, temb, rope, *, config, implementation, backend):
    """FluxTransformerBlock: (image tokens, text tokens) -> the same, updated."""
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = _adaln(p["norm1"], temb, 6)
    c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = _adaln(p["norm1_context"], temb, 6)
    a, d = p["attn"], config.attention_head_dim
    qi, ki, vi = _project(a, _modulate(img, shift, scale), d, "to_q", "to_k", "to_v", "norm_q", "norm_k")
    qt, kt, vt = _project(
        a, _modulate(txt, c_shift, c_scale), d, "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"
    )
    joint = [jnp.concatenate(pair, axis=1) for pair in ((qt, qi), (kt, ki), (vt, vi))]  # text first
    out = _attend(*joint, rope, implementation, backend)
    txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1]:]

    img = img + gate[:, None] * layers.linear(a["to_out"]["0"], img_out)
    img = img + gate_mlp[:, None] * _mlp(p["ff"], _modulate(img, shift_mlp, scale_mlp))
    txt = txt + c_gate[:, None] * layers.linear(a["to_add_out"], txt_out)
    txt = txt + c_gate_mlp[:, None] * _mlp(p["ff_context"], _modulate(txt, c_shift_mlp, c_scale_mlp))
    return img, txt


def _single_block(p, x, temb, rope, *, config, implementation, backend):
    """FluxSingleTransformerBlock over the joint tokens [B, L_text + N, C] (text first).

    diffusers concatenates text and image before each single block and splits them after; every
    step but the attention is per token, so concatenating once for all single blocks is the same."""
    shift, scale, gate = _adaln(p["norm"], temb, 3)
    h = _modulate(x, shift, scale)
    mlp = _gelu_tanh(layers.linear(p["proj_mlp"], h))
    q, k, v = _project(p["attn"], h, config.attention_head_dim, "to_q", "to_k", "to_v", "norm_q", "norm_k")
    attn = _attend(q, k, v, rope, implementation, backend)
    return x + gate[:, None] * layers.linear(p["proj_out"], jnp.concatenate([attn, mlp], axis=-1))


def _check_ids(ids, tokens, what, axes_dims):
    ids = jnp.asarray(ids)
    if ids.shape != (tokens, len(axes_dims)):
        raise UserError(
            f"flux: {what}_ids of shape {tuple(ids.shape)} are not [{tokens}, {len(axes_dims)}] "
            f"(one row per {what} token, one column per RoPE axis)"
        )
    return ids


def _per_example(value, batch, name):
    value = jnp.asarray(value)
    if value.ndim > 1 or value.size not in (1, batch):
        raise UserError(f"flux: {name} of shape {tuple(value.shape)} is not one value or one per example ({batch})")
    return jnp.broadcast_to(value.reshape(-1), (batch,))


def apply(
    params,
    config,
    hidden_states,
    encoder_hidden_states,
    pooled_projections,
    timestep,
    img_ids,
    txt_ids,
    guidance=None,
    *,
    attention="auto",
    dtype=jnp.float32,
    remat=False,
    backend=None,
):
    """FluxTransformer2DModel.forward(...).sample: the transformer's output for packed latent tokens.

    Args:
      params: the diffusers-named tree (`weights.unflatten` of the state dict).
      config: FluxConfig (static under jit: hashable).
      hidden_states: [B, N, in_channels] packed latent tokens (`pack_latents`).
      encoder_hidden_states: [B, L, joint_attention_dim] T5 states.
      pooled_projections: [B, pooled_projection_dim] CLIP's pooled text embedding.
      timestep: [B] or a scalar, the flow-matching time in [0, 1] (scaled by 1000 here, as diffusers).
      img_ids: [N, len(axes_dims_rope)] image position ids (`latent_image_ids`).
      txt_ids: [L, len(axes_dims_rope)] text position ids (`text_ids`).
      guidance: [B] or a scalar, the distilled guidance scale, for a config with guidance_embeds
        ([dev]); scaled by 1000 here. Required there and refused without it (a UserError).
      attention: one of attention.IMPLEMENTATIONS, resolved per call by shape (every attention of
        the model has the same L + N queries and keys).
      dtype: compute dtype of activations (norm statistics, modulation, RoPE and softmax in float32;
        the sinusoidal embeddings of timestep and guidance too, so bf16 does not round t).
      remat: jax.checkpoint each double and single block: the same values and gradients, each
        block's activations recomputed in the backward pass instead of stored.
      backend: the platform the program is for, which `attention` resolves against (None:
        jax.default_backend()).
    Returns:
      [B, N, out_channels] in `dtype`.
    """
    if attention not in attn_lib.IMPLEMENTATIONS:
        raise UserError(f"--attention {attention!r}: choose one of {', '.join(attn_lib.IMPLEMENTATIONS)}")
    if config.guidance_embeds and guidance is None:
        raise UserError("flux: this transformer embeds guidance (FLUX.1 [dev]): pass guidance=[B] scales")
    if not config.guidance_embeds and guidance is not None:
        raise UserError("flux: this transformer has no guidance embedding (guidance_embeds false): pass guidance=None")
    backend = backend or jax.default_backend()
    img = jnp.asarray(hidden_states).astype(dtype)
    txt = jnp.asarray(encoder_hidden_states).astype(dtype)
    pooled = jnp.asarray(pooled_projections).astype(dtype)
    batch = img.shape[0]

    # temb: timestep (+ guidance) and pooled text
    te = params["time_text_embed"]
    t = _per_example(timestep, batch, "timestep").astype(jnp.float32) * TIME_SCALE
    temb = _time_embedding(te["timestep_embedder"], t, dtype)
    if config.guidance_embeds:
        g = _per_example(guidance, batch, "guidance").astype(jnp.float32) * TIME_SCALE
        temb = temb + _time_embedding(te["guidance_embedder"], g, dtype)
    text = te["text_embedder"]
    temb = temb + layers.linear(text["linear_2"], jax.nn.silu(layers.linear(text["linear_1"], pooled)))

    img = layers.linear(params["x_embedder"], img)
    txt = layers.linear(params["context_embedder"], txt)
    axes = config.axes_dims_rope
    ids = (_check_ids(txt_ids, txt.shape[1], "txt", axes), _check_ids(img_ids, img.shape[1], "img", axes))
    rope = rope_tables(jnp.concatenate(ids, axis=0), axes)  # text first, as the tokens

    def block(fn):
        fn = functools.partial(fn, config=config, implementation=attention, backend=backend)
        return jax.checkpoint(fn) if remat else fn

    for i in range(config.num_layers):
        img, txt = block(_double_block)(params["transformer_blocks"][str(i)], img, txt, temb, rope)
    x = jnp.concatenate([txt, img], axis=1)
    for i in range(config.num_single_layers):
        x = block(_single_block)(params["single_transformer_blocks"][str(i)], x, temb, rope)
    img = x[:, txt.shape[1]:]

    scale, shift = _adaln(params["norm_out"], temb, 2)  # AdaLayerNormContinuous: scale first
    return layers.linear(params["proj_out"], _modulate(img, shift, scale))
