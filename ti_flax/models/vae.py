"""diffusers' AutoencoderKL (the Stable Diffusion 1.x / 2.x / XL VAE) as pure functions.

Parameters are the PyTorch state dict as a nested dict (see weights.py), in PyTorch layouts
(Conv2d [out, in, kh, kw], Linear [out, in]); activations are NHWC.

    encoder: conv_in, down blocks (ResnetBlock2D x layers_per_block, then a stride-2 conv except in
             the last block), mid block (resnet, self-attention, resnet), GroupNorm, SiLU, conv_out
             -> 2 * latent_channels, quant_conv (1x1) -> mean, logvar
    decoder: post_quant_conv (1x1), conv_in, mid block, up blocks (ResnetBlock2D x (layers_per_block
             + 1), then nearest x2 + conv except in the last block), GroupNorm, SiLU, conv_out

    >>> config, params = component_weights.load_component("sd-model/vae", "vae")  # doctest: +SKIP
    >>> mean, logvar = encode(params, config, pixels)          # pixels NHWC in [-1, 1]
    >>> pixels = decode(params, config, mean)                  # latents unscaled (no scaling_factor)
"""

import dataclasses

import jax
import jax.numpy as jnp

from ..errors import UserError
from . import attention as attn_lib, layers
from .weights import flatten

GROUP_NORM_EPS = 1e-6  # every norm of the diffusers VAE (resnets, attention, conv_norm_out)
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def _tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL's constructor arguments (defaults as diffusers'); hashable, a jit static argument."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: object = 32
    scaling_factor: float = 0.18215
    shift_factor: float = None
    latents_mean: tuple = None
    latents_std: tuple = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d):
        """From a vae/config.json dict: unknown keys ignored, lists made tuples; UserError if unusable."""
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: _tuple(v) for k, v in dict(d).items() if k in known})
        config.validate()
        return config

    def to_dict(self):
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    def validate(self):
        n = len(self.block_out_channels)
        for name, types, supported in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                       ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            bad = [t for t in types if t != supported]
            if bad:
                raise UserError(f"VAE config: {name} {bad[0]!r} is not supported (only {supported})")
            if len(types) != n:
                raise UserError(f"VAE config: {len(types)} {name} for {n} block_out_channels")
        if self.act_fn not in _ACTIVATIONS:
            raise UserError(f"VAE config: act_fn {self.act_fn!r} is not one of {', '.join(_ACTIVATIONS)}")
        for channels in set(self.block_out_channels):
            if channels % self.norm_num_groups:
                raise UserError(f"VAE config: block_out_channels {channels} is not a multiple of "
                                f"norm_num_groups {self.norm_num_groups}")

    @property
    def scale_factor(self):
        """Pixels per latent along each side (2 ** number of downsamplings)."""
        return 2 ** (len(self.block_out_channels) - 1)


# --------------------------------------------------------------------------------------------
# Parameter shapes


def _conv(out, inp, k):
    return {"weight": (out, inp, k, k), "bias": (out,)}


def _norm(channels):
    return {"weight": (channels,), "bias": (channels,)}


def _resnet_shapes(cin, cout):
    shapes = {"norm1": _norm(cin), "conv1": _conv(cout, cin, 3), "norm2": _norm(cout), "conv2": _conv(cout, cout, 3)}
    if cin != cout:
        shapes["conv_shortcut"] = _conv(cout, cin, 1)
    return shapes


def _mid_shapes(config, channels):
    mid = {"resnets": {"0": _resnet_shapes(channels, channels), "1": _resnet_shapes(channels, channels)}}
    if config.mid_block_add_attention:
        linear = {"weight": (channels, channels), "bias": (channels,)}
        mid["attentions"] = {"0": {"group_norm": _norm(channels), "to_q": linear, "to_k": linear,
                                   "to_v": linear, "to_out": {"0": linear}}}
    return mid


def param_shapes(config):
    """{"encoder.conv_in.weight": shape, ...}: AutoencoderKL's state-dict names and shapes."""
    ch, latent, per_block = config.block_out_channels, config.latent_channels, config.layers_per_block
    encoder = {"conv_in": _conv(ch[0], config.in_channels, 3), "down_blocks": {}}
    for i, cout in enumerate(ch):
        cin = ch[max(i - 1, 0)]
        block = {"resnets": {str(j): _resnet_shapes(cin if j == 0 else cout, cout) for j in range(per_block)}}
        if i < len(ch) - 1:
            block["downsamplers"] = {"0": {"conv": _conv(cout, cout, 3)}}
        encoder["down_blocks"][str(i)] = block
    encoder["mid_block"] = _mid_shapes(config, ch[-1])
    encoder["conv_norm_out"] = _norm(ch[-1])
    encoder["conv_out"] = _conv(2 * latent, ch[-1], 3)

    rev = ch[::-1]
    decoder = {"conv_in": _conv(rev[0], latent, 3), "mid_block": _mid_shapes(config, rev[0]), "up_blocks": {}}
    for i, cout in enumerate(rev):
        cin = rev[max(i - 1, 0)]
        block = {"resnets": {str(j): _resnet_shapes(cin if j == 0 else cout, cout) for j in range(per_block + 1)}}
        if i < len(rev) - 1:
            block["upsamplers"] = {"0": {"conv": _conv(cout, cout, 3)}}
        decoder["up_blocks"][str(i)] = block
    decoder["conv_norm_out"] = _norm(ch[0])
    decoder["conv_out"] = _conv(config.out_channels, ch[0], 3)

    tree = {"encoder": encoder, "decoder": decoder}
    if config.use_quant_conv:
        tree["quant_conv"] = _conv(2 * latent, 2 * latent, 1)
    if config.use_post_quant_conv:
        tree["post_quant_conv"] = _conv(latent, latent, 1)
    return flatten(tree)


# --------------------------------------------------------------------------------------------
# Layers (NHWC activations, PyTorch-layout weights)


def _group_norm(p, x, groups):
    return layers.group_norm(p, x, groups, GROUP_NORM_EPS)


def resnet(p, x, config):
    """ResnetBlock2D without a time embedding: x + conv2(act(norm2(conv1(act(norm1(x))))))."""
    act, groups = _ACTIVATIONS[config.act_fn], config.norm_num_groups
    h = layers.conv2d(p["conv1"], act(_group_norm(p["norm1"], x, groups)))
    h = layers.conv2d(p["conv2"], act(_group_norm(p["norm2"], h, groups)))  # dropout is 0 / eval
    if "conv_shortcut" in p:
        x = layers.conv2d(p["conv_shortcut"], x)
    return x + h


def attention(p, x, config, backend=None):
    """The mid block's single-head self-attention over all H*W positions, with a residual
    (diffusers' Attention with group_norm, heads = channels // attention_head_dim = 1)."""
    b, h, w, c = x.shape
    tokens = _group_norm(p["group_norm"], x, config.norm_num_groups).reshape(b, h * w, c)
    q, k, v = (layers.linear(p[name], tokens).reshape(b, h * w, 1, c) for name in ("to_q", "to_k", "to_v"))
    # One head of all C channels (512 in SD): "auto" chunks the 4096-token (512 px) attention on
    # CPU; the fused kernels are not tried with heads that wide.
    impl = attn_lib.resolve("auto", backend=backend or jax.default_backend(), dtype=q.dtype, q_len=h * w, kv_len=h * w,
                            head_dim=c)
    impl = impl if impl in ("dense", "chunked") else "dense"
    out = layers.linear(p["to_out"]["0"], attn_lib.attention(q, k, v, implementation=impl).reshape(b, h * w, c))
    return x + out.reshape(b, h, w, c)


def mid_block(p, x, config, backend=None):
    x = resnet(p["resnets"]["0"], x, config)
    if "attentions" in p:
        x = attention(p["attentions"]["0"], x, config, backend)
    return resnet(p["resnets"]["1"], x, config)


def downsample(p, x):
    # Downsample2D(padding=0): pad bottom and right by one (F.pad (0, 1, 0, 1)), then a 3x3 stride-2
    # conv without padding.
    return layers.conv2d(p["conv"], x, stride=2, padding=((0, 1), (0, 1)))


def upsample(p, x):
    # Upsample2D: nearest-neighbour x2 (F.interpolate mode="nearest"), then a 3x3 conv.
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return layers.conv2d(p["conv"], x)


# --------------------------------------------------------------------------------------------
# Encoder / decoder


def encode(params, config, pixels, *, dtype=jnp.float32, backend=None):
    """Posterior moments of the VAE for pixels.

    Args:
      params: the VAE's nested params. config: VAEConfig.
      pixels: [B, H, W, in_channels] in [-1, 1] (H, W multiples of config.scale_factor).
      dtype: activation dtype (group norm and softmax statistics stay float32).
      backend: the platform the program is for (None: jax.default_backend()).
    Returns:
      (mean, logvar), each [B, H/f, W/f, latent_channels] in dtype; logvar clipped to [-30, 20]
      as diffusers' DiagonalGaussianDistribution does. The UNet's latents are mean (or a sample)
      times config.scaling_factor.
    """
    act = _ACTIVATIONS[config.act_fn]
    p = params["encoder"]
    x = layers.conv2d(p["conv_in"], pixels.astype(dtype))
    for i in range(len(config.block_out_channels)):
        block = p["down_blocks"][str(i)]
        for j in range(config.layers_per_block):
            x = resnet(block["resnets"][str(j)], x, config)
        if "downsamplers" in block:
            x = downsample(block["downsamplers"]["0"], x)
    x = mid_block(p["mid_block"], x, config, backend)
    x = layers.conv2d(p["conv_out"], act(_group_norm(p["conv_norm_out"], x, config.norm_num_groups)))
    if config.use_quant_conv:
        x = layers.conv2d(params["quant_conv"], x)
    mean, logvar = jnp.split(x, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def decode(params, config, latents, *, dtype=jnp.float32):
    """Pixels [B, H*f, W*f, out_channels], about [-1, 1], from UNscaled latents [B, H, W, latent_channels]
    (divide the UNet's latents by config.scaling_factor first)."""
    act = _ACTIVATIONS[config.act_fn]
    x = latents.astype(dtype)
    if config.use_post_quant_conv:
        x = layers.conv2d(params["post_quant_conv"], x)
    p = params["decoder"]
    x = layers.conv2d(p["conv_in"], x)
    x = mid_block(p["mid_block"], x, config)
    for i in range(len(config.block_out_channels)):
        block = p["up_blocks"][str(i)]
        for j in range(config.layers_per_block + 1):
            x = resnet(block["resnets"][str(j)], x, config)
        if "upsamplers" in block:
            x = upsample(block["upsamplers"]["0"], x)
    return layers.conv2d(p["conv_out"], act(_group_norm(p["conv_norm_out"], x, config.norm_num_groups)))


# --------------------------------------------------------------------------------------------
# Loading

# Checkpoints saved before diffusers 0.14 name the mid-block attention's weights query / key /
# value / proj_attn; diffusers renames them when it loads such a file (ModelMixin.
# _fix_state_dict_keys_on_load), and so do we. The shapes are the same Linear [C, C].
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def convert_old_attention_names(state_dict):
    """A copy of a flat state dict with `<...>.attentions.N.query.weight`-style names renamed to
    today's `to_q` / `to_k` / `to_v` / `to_out.0`."""
    out = {}
    for name, value in state_dict.items():
        parts = name.split(".")
        if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in _OLD_ATTENTION_NAMES:
            name = ".".join(parts[:-2] + [_OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
        out[name] = value
    return out
