"""diffusers' UNet2DConditionModel forward pass, for Stable Diffusion 1.x, 2.x and XL configs.

Pure functions over a parameter tree named and shaped like the PyTorch state dict
(`params["down_blocks"]["0"]["attentions"]["0"]["transformer_blocks"]["0"]["attn1"]["to_q"]["weight"]`,
Linear [out, in], Conv2d [out, in, kh, kw]); latents NHWC. Supported, from a `config.json`:

  SD 1.x  CrossAttnDownBlock2D/DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D/CrossAttnUpBlock2D,
          1x1-conv proj_in/proj_out (use_linear_projection False), one head count for all blocks.
  SD 2.x  Linear proj_in/proj_out, a head count per block.
  SDXL    transformer_layers_per_block, addition_embed_type "text_time" (pooled text embeds and
          six size/crop ids added to the time embedding), no attention in the outer level.

diffusers' `attention_head_dim` is, for these models, the number of heads (a naming mistake
diffusers kept for compatibility: `num_attention_heads = num_attention_heads or attention_head_dim`);
each head has channels // heads dimensions. Everything else a config can ask for (ControlNet,
class embeddings, LCM's time_cond_proj_dim, SD3/Flux transformers, ...) is a UserError.
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
from . import attention as attn_lib, layers

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID = ("UNetMidBlock2DCrossAttn",)
_CLASS_NAMES = ("UNet2DConditionModel", "FlaxUNet2DConditionModel")
# Config keys we read only to refuse anything but the value SD 1.x/2.x/XL use.
_FIXED = {
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
# Keys that only other model families have, and what they are.
_FOREIGN = {
    "conditioning_embedding_out_channels": "a ControlNet",
    "controlnet_conditioning_channel_order": "a ControlNet",
    "joint_attention_dim": "an SD3/Flux transformer",
    "patch_size": "a transformer (DiT/SD3/Flux)",
}


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The UNet2DConditionModel config.json fields we support (defaults as diffusers' constructor).

    Lists are stored as tuples, so the config is hashable and can be a static jit argument.
    """

    FOLDER: ClassVar[str] = "unet"  # the component's folder (and params key) in a model
    sample_size: object = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: object = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: object = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0  # inference only: dropout is the identity
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: object = 1280
    transformer_layers_per_block: object = 1
    attention_head_dim: object = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False  # softmax is float32 here anyway
    mid_block_only_cross_attention: object = None
    addition_embed_type: object = None
    addition_time_embed_dim: object = None
    projection_class_embeddings_input_dim: object = None
    addition_embed_type_num_heads: int = 64  # unused by "text_time"; kept for round trips
    time_embedding_dim: object = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @classmethod
    def from_dict(cls, d):
        """From a config.json dict; unknown keys ignored, unsupported families a UserError."""
        d = dict(d)
        name = d.get("_class_name")
        if name is not None and name not in _CLASS_NAMES:
            raise UserError(
                f"unet config: _class_name {name!r} is not a UNet2DConditionModel; "
                "only SD 1.x/2.x/XL UNets are supported"
            )
        for key, what in _FOREIGN.items():
            if key in d:
                raise UserError(f"unet config: key {key!r} belongs to {what}, not a Stable Diffusion UNet")
        for key, want in _FIXED.items():
            if _tuples(d.get(key, want)) != want:
                raise UserError(f"unet config: {key}={d[key]!r} is not supported (only {want!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: _tuples(v) for k, v in d.items() if k in names})
        config._validate()
        return config

    def to_dict(self):
        """The config.json fields (tuples as lists), so from_dict(to_dict()) round-trips."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = json.loads(json.dumps(value))  # tuples -> lists, deep
        return out

    # -- per-block values, as diffusers expands them ----------------------------------------

    @property
    def num_blocks(self):
        return len(self.block_out_channels)

    @property
    def latent_multiple(self):
        """Latent sides must be multiples of this: each down block but the last halves them."""
        return 2 ** (self.num_blocks - 1)

    def _per_block(self, name):
        value = getattr(self, name)
        if isinstance(value, tuple):
            if len(value) != self.num_blocks:
                raise UserError(f"unet config: {name} has {len(value)} entries for {self.num_blocks} blocks")
            return value
        return (value,) * self.num_blocks

    @property
    def heads(self):
        """Attention heads per down block (diffusers' `attention_head_dim` naming quirk)."""
        return self._per_block("attention_head_dim")

    @property
    def layers(self):
        return self._per_block("layers_per_block")

    @property
    def transformer_layers(self):
        return self._per_block("transformer_layers_per_block")

    @property
    def cross_dims(self):
        return self._per_block("cross_attention_dim")

    @property
    def time_embed_dim(self):
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def _validate(self):
        n = self.num_blocks
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise UserError(
                f"unet config: {len(self.down_block_types)} down and {len(self.up_block_types)} up blocks "
                f"for {n} block_out_channels"
            )
        for key, value, allowed in (
            *(("down_block_types", t, _DOWN) for t in self.down_block_types),
            *(("up_block_types", t, _UP) for t in self.up_block_types),
            ("mid_block_type", self.mid_block_type, _MID),
            ("act_fn", self.act_fn, ("silu", "swish")),
            ("addition_embed_type", self.addition_embed_type, (None, "text_time")),
        ):
            if value not in allowed:
                raise UserError(f"unet config: {key} {value!r} is not supported (only {', '.join(map(repr, allowed))})")
        if self.norm_num_groups is None:
            raise UserError("unet config: norm_num_groups None is not supported")
        if self.mid_block_only_cross_attention not in (None, False) or any(
            (self.only_cross_attention,) if isinstance(self.only_cross_attention, bool) else self.only_cross_attention
        ):
            raise UserError("unet config: only_cross_attention is not supported (SD UNets use self-attention)")
        if self.downsample_padding not in (0, 1):
            raise UserError(f"unet config: downsample_padding={self.downsample_padding} is not supported (only 0 or 1)")
        if any(isinstance(t, tuple) for t in self.transformer_layers):
            raise UserError("unet config: per-layer transformer_layers_per_block (asymmetric UNets) is not supported")
        if self.addition_embed_type == "text_time" and None in (
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ):
            raise UserError(
                "unet config: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        for i, (c, h) in enumerate(zip(self.block_out_channels, self.heads)):
            if c % h:
                raise UserError(f"unet config: block {i} has {c} channels, not divisible into {h} attention heads")
        for name in ("layers_per_block", "cross_attention_dim"):
            self._per_block(name)  # a per-block list must have one entry per block


# --------------------------------------------------------------------------------------------
# Parameter names and shapes (no PyTorch)


def _linear_shapes(prefix, d_in, d_out, bias=True):
    out = {f"{prefix}.weight": (d_out, d_in)}
    if bias:
        out[f"{prefix}.bias"] = (d_out,)
    return out


def _conv_shapes(prefix, c_in, c_out, k):
    return {f"{prefix}.weight": (c_out, c_in, k, k), f"{prefix}.bias": (c_out,)}


def _norm_shapes(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _resnet_shapes(prefix, c_in, c_out, temb):
    s = {
        **_norm_shapes(f"{prefix}.norm1", c_in),
        **_conv_shapes(f"{prefix}.conv1", c_in, c_out, 3),
        **_linear_shapes(f"{prefix}.time_emb_proj", temb, c_out),
        **_norm_shapes(f"{prefix}.norm2", c_out),
        **_conv_shapes(f"{prefix}.conv2", c_out, c_out, 3),
    }
    if c_in != c_out:
        s.update(_conv_shapes(f"{prefix}.conv_shortcut", c_in, c_out, 1))
    return s


def _transformer_shapes(prefix, config, c, level):
    """Transformer2DModel at down level `level` (the mid block is level -1)."""
    cross_dim, num_layers = config.cross_dims[level], config.transformer_layers[level]
    proj = _linear_shapes if config.use_linear_projection else (lambda p, i, o: _conv_shapes(p, i, o, 1))
    s = {**_norm_shapes(f"{prefix}.norm", c), **proj(f"{prefix}.proj_in", c, c)}
    for j in range(num_layers):
        b = f"{prefix}.transformer_blocks.{j}"
        for name, ctx in (("attn1", c), ("attn2", cross_dim)):
            s.update(_linear_shapes(f"{b}.{name}.to_q", c, c, bias=False))
            s.update(_linear_shapes(f"{b}.{name}.to_k", ctx, c, bias=False))
            s.update(_linear_shapes(f"{b}.{name}.to_v", ctx, c, bias=False))
            s.update(_linear_shapes(f"{b}.{name}.to_out.0", c, c))
        for n in ("norm1", "norm2", "norm3"):
            s.update(_norm_shapes(f"{b}.{n}", c))
        s.update(_linear_shapes(f"{b}.ff.net.0.proj", c, 8 * c))  # GEGLU: value and gate, 4c each
        s.update(_linear_shapes(f"{b}.ff.net.2", 4 * c, c))
    s.update(proj(f"{prefix}.proj_out", c, c))
    return s


def param_shapes(config):
    """{"dotted.name": shape} of the PyTorch state dict this config describes."""
    ch, temb = config.block_out_channels, config.time_embed_dim
    n = config.num_blocks
    s = {
        **_conv_shapes("conv_in", config.in_channels, ch[0], config.conv_in_kernel),
        **_linear_shapes("time_embedding.linear_1", ch[0], temb),
        **_linear_shapes("time_embedding.linear_2", temb, temb),
    }
    if config.addition_embed_type == "text_time":
        s.update(_linear_shapes("add_embedding.linear_1", config.projection_class_embeddings_input_dim, temb))
        s.update(_linear_shapes("add_embedding.linear_2", temb, temb))
    c_out = ch[0]
    for i, kind in enumerate(config.down_block_types):
        c_in, c_out = c_out, ch[i]
        for j in range(config.layers[i]):
            s.update(_resnet_shapes(f"down_blocks.{i}.resnets.{j}", c_in if j == 0 else c_out, c_out, temb))
            if kind == "CrossAttnDownBlock2D":
                s.update(_transformer_shapes(f"down_blocks.{i}.attentions.{j}", config, c_out, i))
        if i < n - 1:
            s.update(_conv_shapes(f"down_blocks.{i}.downsamplers.0.conv", c_out, c_out, 3))
    s.update(_resnet_shapes("mid_block.resnets.0", ch[-1], ch[-1], temb))
    s.update(_transformer_shapes("mid_block.attentions.0", config, ch[-1], -1))
    s.update(_resnet_shapes("mid_block.resnets.1", ch[-1], ch[-1], temb))
    for i, kind in enumerate(config.up_block_types):
        r = n - 1 - i  # the down level this up block mirrors
        # diffusers: prev_output_channel, output_channel, input_channel (the last resnet's skip)
        prev, c_out, c_skip_in = ch[min(r + 1, n - 1)], ch[r], ch[max(r - 1, 0)]
        for j in range(config.layers[r] + 1):
            res_in = prev if j == 0 else c_out
            skip = c_skip_in if j == config.layers[r] else c_out
            s.update(_resnet_shapes(f"up_blocks.{i}.resnets.{j}", res_in + skip, c_out, temb))
            if kind == "CrossAttnUpBlock2D":
                s.update(_transformer_shapes(f"up_blocks.{i}.attentions.{j}", config, c_out, r))
        if i < n - 1:
            s.update(_conv_shapes(f"up_blocks.{i}.upsamplers.0.conv", c_out, c_out, 3))
    s.update(_norm_shapes("conv_norm_out", ch[0]))
    s.update(_conv_shapes("conv_out", ch[0], config.out_channels, config.conv_out_kernel))
    return s


# --------------------------------------------------------------------------------------------
# Layers. x is NHWC (or [B, L, C]) in the compute dtype; weights are cast to it.


def timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """diffusers' sinusoidal embedding: [N] -> [N, dim] float32 (cos first when flipped)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _resnet(p, x, temb, config, scale=1.0):
    g, eps = config.norm_num_groups, config.norm_eps
    h = layers.conv2d(p["conv1"], jax.nn.silu(layers.group_norm(p["norm1"], x, g, eps)))
    h = h + layers.linear(p["time_emb_proj"], jax.nn.silu(temb))[:, None, None, :]
    h = layers.conv2d(p["conv2"], jax.nn.silu(layers.group_norm(p["norm2"], h, g, eps)))  # dropout: identity
    if "conv_shortcut" in p:
        x = layers.conv2d(p["conv_shortcut"], x)
    return (x + h) / scale if scale != 1 else x + h


def _attention(p, x, context, heads, implementation, backend):
    """diffusers' Attention (to_q/k/v without bias, to_out.0 with): [B, L, C] -> [B, L, C]."""
    q, k, v = layers.linear(p["to_q"], x), layers.linear(p["to_k"], context), layers.linear(p["to_v"], context)
    b, lq, c = q.shape
    lk, d = k.shape[1], c // heads
    impl = attn_lib.resolve(
        implementation, backend=backend, dtype=q.dtype, q_len=lq, kv_len=lk, head_dim=d
    )
    out = attn_lib.attention(
        q.reshape(b, lq, heads, d), k.reshape(b, lk, heads, d), v.reshape(b, lk, heads, d), implementation=impl,
        backend=backend,
    )
    return layers.linear(p["to_out"]["0"], out.reshape(b, lq, c))


def _basic_transformer_block(p, x, context, heads, implementation, backend):
    h = layers.layer_norm(p["norm1"], x)
    x = x + _attention(p["attn1"], h, h, heads, implementation, backend)
    x = x + _attention(p["attn2"], layers.layer_norm(p["norm2"], x), context, heads, implementation, backend)
    value, gate = jnp.split(layers.linear(p["ff"]["net"]["0"]["proj"], layers.layer_norm(p["norm3"], x)), 2, axis=-1)
    return x + layers.linear(p["ff"]["net"]["2"], value * jax.nn.gelu(gate, approximate=False))  # GEGLU, exact GELU


def _transformer(p, x, context, config, level, implementation, backend):
    """Transformer2DModel over NHWC: GroupNorm(eps 1e-6), proj_in, blocks, proj_out, residual.

    `level`: the down level whose head count and depth it has (the mid block is level -1)."""
    heads, num_layers = config.heads[level], config.transformer_layers[level]
    b, h, w, c = x.shape
    y = layers.group_norm(p["norm"], x, config.norm_num_groups, 1e-6)
    if config.use_linear_projection:
        y = layers.linear(p["proj_in"], y.reshape(b, h * w, c))
    else:
        y = layers.conv2d(p["proj_in"], y).reshape(b, h * w, c)
    for j in range(num_layers):
        y = _basic_transformer_block(p["transformer_blocks"][str(j)], y, context, heads, implementation, backend)
    if config.use_linear_projection:
        y = layers.linear(p["proj_out"], y).reshape(b, h, w, c)
    else:
        y = layers.conv2d(p["proj_out"], y.reshape(b, h, w, c))
    return y + x


def _downsample(p, x, padding):
    if padding == 0:  # diffusers pads right and bottom by one, then convolves unpadded
        return layers.conv2d(p, x, stride=2, padding=[(0, 1), (0, 1)])
    return layers.conv2d(p, x, stride=2, padding=padding)


def _upsample(p, x, size):
    """Nearest-neighbour to `size` (x2 unless a skip connection has an odd side), then conv 3x3."""
    h, w = x.shape[1:3]
    if size == (2 * h, 2 * w):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    else:  # torch's "nearest": source index floor(dst * in / out)
        rows = np.minimum(np.floor(np.arange(size[0]) * (h / size[0])).astype(np.int32), h - 1)
        cols = np.minimum(np.floor(np.arange(size[1]) * (w / size[1])).astype(np.int32), w - 1)
        x = x[:, rows][:, :, cols]
    return layers.conv2d(p["conv"], x)


# --------------------------------------------------------------------------------------------
# Blocks: static structure from (config, block index), arrays as arguments (so jax.checkpoint
# can wrap them).


def _down_block(p, x, temb, context, *, config, i, implementation, backend):
    skips = []
    for j in range(config.layers[i]):
        x = _resnet(p["resnets"][str(j)], x, temb, config)
        if config.down_block_types[i] == "CrossAttnDownBlock2D":
            x = _transformer(p["attentions"][str(j)], x, context, config, i, implementation, backend)
        skips.append(x)
    if i < config.num_blocks - 1:
        x = _downsample(p["downsamplers"]["0"]["conv"], x, config.downsample_padding)
        skips.append(x)
    return x, tuple(skips)


def _mid_block(p, x, temb, context, *, config, implementation, backend):
    scale = config.mid_block_scale_factor
    x = _resnet(p["resnets"]["0"], x, temb, config, scale)
    x = _transformer(p["attentions"]["0"], x, context, config, -1, implementation, backend)
    return _resnet(p["resnets"]["1"], x, temb, config, scale)


def _up_block(p, x, temb, context, skips, *, config, i, upsample_size, implementation, backend):
    r = config.num_blocks - 1 - i
    for j in range(config.layers[r] + 1):
        x = jnp.concatenate([x, skips[-1 - j]], axis=-1)  # skip connections, last first
        x = _resnet(p["resnets"][str(j)], x, temb, config)
        if config.up_block_types[i] == "CrossAttnUpBlock2D":
            x = _transformer(p["attentions"][str(j)], x, context, config, r, implementation, backend)
    if upsample_size is not None:
        x = _upsample(p["upsamplers"]["0"], x, upsample_size)
    return x


def apply(
    params,
    config,
    sample,
    timesteps,
    encoder_hidden_states,
    *,
    added_cond=None,
    attention="dense",
    remat=False,
    dtype=jnp.float32,
    backend=None,
):
    """The UNet's prediction (epsilon or v, per the model) for NHWC latents.

    Args:
      params: the PyTorch-named tree (`component_weights.load_component`, or `weights.unflatten`
        of a state dict).
      config: UNetConfig (static under jit: hashable).
      sample: [B, H, W, in_channels] latents.
      timesteps: [B] (or a scalar), int or float.
      encoder_hidden_states: [B, L, cross_attention_dim] text-encoder states.
      added_cond: SDXL only: {"text_embeds": [B, E], "time_ids": [B, 6]}.
      attention: one of attention.IMPLEMENTATIONS, resolved per call site by shape
        (cross-attention over 77 tokens never chunks).
      remat: wrap each down, mid and up block in jax.checkpoint: same values and gradients,
        activations recomputed in the backward pass instead of stored.
      dtype: compute dtype of activations (norm and softmax statistics stay float32).
      backend: the platform the program is for, which `attention` resolves against (None:
        jax.default_backend(); "tpu" when compiling for a TPU from another machine).
    Returns:
      [B, H, W, out_channels] in `dtype`.
    """
    if attention not in attn_lib.IMPLEMENTATIONS:
        raise UserError(f"--attention {attention!r}: choose one of {', '.join(attn_lib.IMPLEMENTATIONS)}")
    backend = backend or jax.default_backend()
    x = jnp.asarray(sample).astype(dtype)
    batch = x.shape[0]
    context = jnp.asarray(encoder_hidden_states).astype(dtype)
    if config.center_input_sample:
        x = 2 * x - 1.0
    t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))

    # Time embedding (+ SDXL's pooled-text and size/crop embedding).
    ch = config.block_out_channels
    t_emb = timestep_embedding(t, ch[0], config.flip_sin_to_cos, config.freq_shift).astype(dtype)
    te = params["time_embedding"]
    temb = layers.linear(te["linear_2"], jax.nn.silu(layers.linear(te["linear_1"], t_emb)))
    if config.addition_embed_type == "text_time":
        if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
            raise UserError("this SDXL UNet needs added_cond={'text_embeds': [B, E], 'time_ids': [B, 6]}")
        time_ids = jnp.asarray(added_cond["time_ids"])
        time_embeds = timestep_embedding(
            time_ids.reshape(-1), config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift
        ).reshape(batch, -1)
        add = jnp.concatenate([jnp.asarray(added_cond["text_embeds"]).astype(dtype), time_embeds.astype(dtype)], -1)
        a = params["add_embedding"]
        temb = temb + layers.linear(a["linear_2"], jax.nn.silu(layers.linear(a["linear_1"], add)))

    def block(fn, **static):
        fn = functools.partial(fn, config=config, implementation=attention, backend=backend, **static)
        return jax.checkpoint(fn) if remat else fn

    x = layers.conv2d(params["conv_in"], x)
    skips = [x]
    for i in range(config.num_blocks):
        x, new = block(_down_block, i=i)(params["down_blocks"][str(i)], x, temb, context)
        skips.extend(new)
    x = block(_mid_block)(params["mid_block"], x, temb, context)
    for i in range(config.num_blocks):
        n_skip = config.layers[config.num_blocks - 1 - i] + 1
        mine, skips = skips[-n_skip:], skips[:-n_skip]
        # Upsample to the next skip's size: x2, except where an odd side was rounded down.
        size = tuple(skips[-1].shape[1:3]) if i < config.num_blocks - 1 else None
        x = block(_up_block, i=i, upsample_size=size)(params["up_blocks"][str(i)], x, temb, context, tuple(mine))
    x = jax.nn.silu(layers.group_norm(params["conv_norm_out"], x, config.norm_num_groups, config.norm_eps))
    return layers.conv2d(params["conv_out"], x)


def attention_sites(config, latent_size, context_length):
    """Every attention call of one forward pass at `latent_size` (h, w), in the order `apply` makes them.

    Returns:
      a list of (kind, q_len, kv_len, head_dim): kind "self" or "cross", the query and key
      lengths and each head's size, as `_attention` sees them (what `attention.resolve` decides by).
    """
    h, w = latent_size
    sides = [(h, w)]
    for _ in range(config.num_blocks - 1):  # each downsampler halves, rounding up
        sides.append((-(-sides[-1][0] // 2), -(-sides[-1][1] // 2)))

    def transformer(level):
        tokens = sides[level][0] * sides[level][1]
        head_dim = config.block_out_channels[level] // config.heads[level]
        return [("self", tokens, tokens, head_dim), ("cross", tokens, context_length, head_dim)] * (
            config.transformer_layers[level])

    sites = []
    for i in range(config.num_blocks):
        if config.down_block_types[i] == "CrossAttnDownBlock2D":
            sites += transformer(i) * config.layers[i]
    sites += transformer(config.num_blocks - 1)
    for i in range(config.num_blocks):
        r = config.num_blocks - 1 - i
        if config.up_block_types[i] == "CrossAttnUpBlock2D":
            sites += transformer(r) * (config.layers[r] + 1)
    return sites
