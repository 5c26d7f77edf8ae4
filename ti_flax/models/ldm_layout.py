"""The original (LDM / Stability) layout of SD 1.x, 2.x and SDXL checkpoints, as single files hold it.

Each family's layout (`SingleFileLayout`, defined by the family in ti_flax/families/) says what its
weights cannot: head counts, activations, the noise schedule, the VAE's scaling, where each text
encoder sits (`EncoderLayout`). From a checkpoint's shapes (`single_file.Checkpoint`) and its layout
come the owned configs
(`unet_config`, `vae_config`, `text_config`), and from a config the name table of each part, our
(diffusers / transformers) name -> the file's (`unet_names`, `vae_names`, `text_names`), which
`convert` reads the file through. `single_file.py` tells what a file is and loads it.
"""

import dataclasses
import re

import numpy as np

from ..errors import UserError
from . import clip, unet, vae

UNET = "model.diffusion_model."
EMA = "model_ema."
VAE = "first_stage_model."
CLIP_L = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."
SDXL_CLIP_L = SDXL_PREFIX + "0.transformer."
SDXL_BIG_G = SDXL_PREFIX + "1.model."
REFINER_BIG_G = SDXL_PREFIX + "0.model."  # the SDXL refiner's one text encoder
LABEL_EMB = UNET + "label_emb.0."  # SDXL's added conditioning: pooled text and size ids
HEAD_DIM = 64  # CLIP ViT-L, OpenCLIP ViT-H / bigG and the SD 2.x / SDXL UNets all use 64-wide heads
TRANSPOSE = "T"  # a table entry whose file weight is stored transposed (OpenCLIP's text_projection)


@dataclasses.dataclass(frozen=True)
class EncoderLayout:
    """Where one text encoder sits in a file, and what its weights do not say."""

    prefix: str
    title: str  # for messages: "CLIP ViT-L", "OpenCLIP bigG"
    open_clip: bool  # OpenCLIP's names (resblocks, fused in_proj) rather than transformers' CLIP names
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768  # in the config only; with `with_projection`, read from text_projection
    dropped_layers: int = 0  # SD 2.x: a whole OpenCLIP tower's last block (see text_config)
    with_projection: bool = False  # SDXL's bigG: CLIPTextModelWithProjection
    pad: str = "sd1"  # its tokenizer's clip_vocab.PAD_TOKENS key


# The scheduler SD 1.x and 2.x were trained with (diffusers' SD 1.5 / 2.x scheduler configs).
SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
# SDXL base 1.0's scheduler config: the same noise schedule, sampled with Euler.
SDXL_SCHEDULER = dict(SCHEDULER, _class_name="EulerDiscreteScheduler", interpolation_type="linear",
                      use_karras_sigmas=False, sample_max_value=1.0)
SCALING_FACTOR = 0.18215


@dataclasses.dataclass(frozen=True)
class SingleFileLayout:
    """What a family's weights do not say, as its diffusers configs state it."""

    name: str  # the family's name (families.get)
    title: str
    text: str  # its text encoder(s), for messages
    unet: str  # how its UNet is told apart, for messages
    encoders: tuple  # EncoderLayout per text encoder, in the family's order
    linear_projection: bool  # the UNet's proj_in / proj_out: Linear (SD 2.x, SDXL) or 1x1 conv (SD 1.x)
    unet_heads: int = 0  # a head count for every block (SD 1.x: 8) ...
    unet_head_dim: int = 0  # ... or heads of this width (SD 2.x, SDXL: 64)
    added_conditioning: bool = False  # SDXL: label_emb (text_time)
    sample_size: int = 64  # latents: 512 px (SDXL: 128, 1024 px)
    scaling_factor: float = SCALING_FACTOR
    scheduler: tuple = tuple(SCHEDULER.items())
    # SD 2.x: a v-prediction file is the 768 px model (latents 96), and a file cannot say which
    # target it was trained for (so an unset --prediction_type is warned about).
    v_sample_size: int = 0
    prediction_unknown: bool = False


TEXT_PARTS = ("text_encoder", "text_encoder_2")  # the LoadedModel's parts for a layout's encoders, in order


def first_attention(ckpt):
    for k in range(1, 64):
        block = f"{UNET}input_blocks.{k}.1."
        if ckpt.has(block + "proj_in.weight"):
            return block
    if ckpt.has(f"{UNET}middle_block.1.proj_in.weight"):
        return f"{UNET}middle_block.1."
    raise UserError(f"{ckpt.path}: the UNet has no cross-attention blocks; not an SD 1.x/2.x or SDXL UNet")


# --------------------------------------------------------------------------------------------
# Configs from the shapes and the family


def unet_config(ckpt, family, sample_size, pooled_dim=None):
    """UNetConfig dict: block widths, depths and attention levels from the shapes; heads from the family.

    `pooled_dim`: SDXL's pooled text width (the second text encoder's projection), which with the
    added conditioning's input width gives the width of each of its six size ids' embeddings.
    """
    levels, level, k = [], None, 1
    while True:
        block = f"{UNET}input_blocks.{k}."
        if ckpt.has(block + "0.op.weight"):  # a downsampler closes the level
            levels.append(level)
            level = None
        elif ckpt.has(block + "0.in_layers.0.weight"):
            if level is None:
                level = {"channels": ckpt.shape(block + "0.out_layers.3.weight")[0], "layers": 0, "depth": 0}
            level["layers"] += 1
            level["depth"] = level["depth"] or ckpt.count(block + "1.transformer_blocks.{}.norm1.weight")
        else:
            break
        k += 1
    if level is not None:
        levels.append(level)
    if not levels or None in levels:
        raise UserError(f"{ckpt.path}: the UNet's input_blocks are not an SD 1.x/2.x or SDXL UNet's")
    channels = [lv["channels"] for lv in levels]
    attn = first_attention(ckpt)
    if family.unet_heads:
        heads = family.unet_heads
    else:
        bad = [c for c in channels if c % family.unet_head_dim]
        if bad:
            raise UserError(f"{ckpt.path}: a UNet block is {bad[0]} wide, not a multiple of {family.title}'s "
                            f"{family.unet_head_dim}-wide attention heads")
        heads = [c // family.unet_head_dim for c in channels]
    layers = [lv["layers"] for lv in levels]
    depths = [lv["depth"] or 1 for lv in levels]  # a level without attention: 1, as SDXL's config says
    temb = ckpt.shape(UNET + "time_embed.0.weight")[0]
    config = {
        "sample_size": sample_size,
        "in_channels": ckpt.shape(UNET + "input_blocks.0.0.weight")[1],
        "out_channels": ckpt.shape(UNET + "out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": ["CrossAttnDownBlock2D" if lv["depth"] else "DownBlock2D" for lv in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if lv["depth"] else "UpBlock2D" for lv in levels[::-1]],
        "cross_attention_dim": ckpt.shape(attn + "transformer_blocks.0.attn2.to_k.weight")[1],
        "attention_head_dim": heads,
        "use_linear_projection": family.linear_projection,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "time_embedding_dim": None if temb == 4 * channels[0] else temb,
    }
    if family.added_conditioning:
        added = ckpt.shape(LABEL_EMB + "0.weight")[1]
        if (added - pooled_dim) <= 0 or (added - pooled_dim) % 6:
            raise UserError(f"{ckpt.path}: the UNet's added conditioning takes {added} inputs, which is not the "
                            f"{pooled_dim}-wide pooled text and six size embeddings; the parts do not belong together")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(added - pooled_dim) // 6,
                      projection_class_embeddings_input_dim=added)
    return config


def vae_config(ckpt, scaling_factor):
    """VAEConfig dict of the file's first_stage_model.* VAE, from its shapes; the latents' scale
    (`scaling_factor`) is the model family's, which the weights cannot state."""
    p = VAE + "encoder."
    levels = ckpt.count(p + "down.{}.block.0.conv1.weight")
    channels = [ckpt.shape(p + f"down.{i}.block.0.conv2.weight")[0] for i in range(levels)]
    return {
        "in_channels": ckpt.shape(p + "conv_in.weight")[1],
        "out_channels": ckpt.shape(VAE + "decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": ckpt.count(p + "down.0.block.{}.conv1.weight"),
        "latent_channels": ckpt.shape(VAE + "decoder.conv_in.weight")[1],
        "norm_num_groups": 32,
        "scaling_factor": scaling_factor,
        "mid_block_add_attention": ckpt.has(p + "mid.attn_1.q.weight"),
        "use_quant_conv": ckpt.has(VAE + "quant_conv.weight"),
        "use_post_quant_conv": ckpt.has(VAE + "post_quant_conv.weight"),
    }


def text_config(ckpt, family, encoder):
    """CLIPTextConfig dict of one of the family's text encoders (a TextEncoder), from its shapes."""
    if not encoder.open_clip:
        p = encoder.prefix + "text_model."
        table, positions = p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight"
        layers = ckpt.count(p + "encoder.layers.{}.layer_norm1.weight")
        fc1 = p + "encoder.layers.0.mlp.fc1.weight"
    else:
        p = encoder.prefix
        table, positions = p + "token_embedding.weight", p + "positional_embedding"
        # SD 2.x conditions on OpenCLIP's penultimate layer: a whole OpenCLIP text tower (as the
        # original checkpoints hold it, text_projection included) has one block more than SD uses;
        # a file converted back from diffusers holds only the blocks SD uses, and no projection.
        # SDXL's bigG keeps every block (its pipeline reads the penultimate hidden state itself).
        whole_tower = ckpt.has(p + "text_projection")
        blocks = ckpt.count(p + "transformer.resblocks.{}.ln_1.weight")
        layers = blocks - (encoder.dropped_layers if whole_tower else 0)
        fc1 = p + "transformer.resblocks.0.mlp.c_fc.weight"
    needed = (table, positions, fc1) + ((p + "text_projection",) if encoder.with_projection else ())
    for name in needed:
        if not ckpt.has(name):
            raise UserError(f"{ckpt.path}: the text encoder has no {name}; not a complete {family.title} checkpoint")
    if layers < 1:
        raise UserError(f"{ckpt.path}: the {family.title} text encoder has too few layers")
    vocab_size, hidden = ckpt.shape(table)
    if hidden % HEAD_DIM:
        raise UserError(f"{ckpt.path}: the text encoder is {hidden} wide, not a multiple of {family.title}'s "
                        f"{HEAD_DIM}-wide attention heads")
    config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": ckpt.shape(fc1)[0],
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // HEAD_DIM,
        "max_position_embeddings": ckpt.shape(positions)[0],
        "hidden_act": encoder.hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": encoder.projection_dim,
        "eos_token_id": 2,  # what SD's configs say: pool at argmax(input_ids), the end token
    }
    if encoder.with_projection:  # OpenCLIP's text_projection is [hidden, projection]: x @ text_projection
        config.update(projection_dim=ckpt.shape(p + "text_projection")[1], with_projection=True)
    return config


# --------------------------------------------------------------------------------------------
# Name tables: our (diffusers / transformers) name -> (the file's name, how: None, the q/k/v part
# of a fused in_proj, or TRANSPOSE)

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_TRANSPOSED = {"text_projection.weight": "text_projection"}  # [hidden, projection] in the file
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def _rename(name, modules):
    """`name` with its longest module prefix in `modules` ({ours: (theirs, inner renames)}) replaced,
    and the first part of the rest renamed by that module's inner table."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in modules:
            theirs, inner = modules[head]
            rest = ".".join(parts[cut:])
            for ours_inner, theirs_inner in inner.items():
                if rest.startswith(ours_inner + "."):
                    rest = theirs_inner + rest[len(ours_inner):]
                    break
            return f"{theirs}.{rest}"
    return name


def unet_names(config):
    """{diffusers UNet name: (file name, None)} for an SD 1.x/2.x or SDXL UNet config."""
    modules = {"conv_in": ("input_blocks.0.0", {}), "time_embedding.linear_1": ("time_embed.0", {}),
               "time_embedding.linear_2": ("time_embed.2", {}), "conv_norm_out": ("out.0", {}),
               "conv_out": ("out.2", {}), "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
               "mid_block.attentions.0": ("middle_block.1", {}),
               "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
               "add_embedding.linear_1": ("label_emb.0.0", {}), "add_embedding.linear_2": ("label_emb.0.2", {})}
    n, k = config.num_blocks, 1
    for i in range(n):  # input_blocks: 0 is conv_in, then each level's resnets (+ attention), then its downsampler
        for j in range(config.layers[i]):
            modules[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", _UNET_RESNET)
            modules[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", {})
            k += 1
        if i < n - 1:
            modules[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", {})
            k += 1
    k = 0
    for i, kind in enumerate(config.up_block_types):  # output_blocks: resnet, attention, upsampler
        for j in range(config.layers[n - 1 - i] + 1):
            modules[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", _UNET_RESNET)
            modules[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", {})
            k += 1
        if i < n - 1:
            slot = 2 if kind == "CrossAttnUpBlock2D" else 1
            modules[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{k - 1}.{slot}.conv", {})
    return {name: (UNET + _rename(name, modules), None) for name in unet.param_shapes(config)}


def vae_names(config):
    """{diffusers VAE name: (file name, None)}; the mid-block attention's 1x1 convs fit our Linear shapes."""
    n = len(config.block_out_channels)
    modules = {"encoder.conv_norm_out": ("encoder.norm_out", {}), "decoder.conv_norm_out": ("decoder.norm_out", {})}
    for part in ("encoder", "decoder"):
        modules[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _VAE_RESNET)
        modules[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _VAE_RESNET)
        modules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
    for i in range(n):
        modules[f"encoder.down_blocks.{i}.downsamplers.0"] = (f"encoder.down.{i}.downsample", {})
        modules[f"decoder.up_blocks.{i}.upsamplers.0"] = (f"decoder.up.{n - 1 - i}.upsample", {})
        for j in range(config.layers_per_block + 1):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", _VAE_RESNET)
    return {name: (VAE + _rename(name, modules), None) for name in vae.param_shapes(config)}


def text_names(config, encoder):
    """{transformers CLIPTextModel(WithProjection) name: (file name, how)} for one TextEncoder."""
    shapes = clip.param_shapes(config)
    prefix = encoder.prefix
    if not encoder.open_clip:
        return {name: (prefix + name, None) for name in shapes}
    out = {}
    for name in shapes:
        if name in _OPEN_CLIP_TOP:
            out[name] = (prefix + _OPEN_CLIP_TOP[name], None)
            continue
        if name in _OPEN_CLIP_TRANSPOSED:
            out[name] = (prefix + _OPEN_CLIP_TRANSPOSED[name], TRANSPOSE)
            continue
        match = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        layer, module, leaf = match.groups()
        block = f"{prefix}transformer.resblocks.{layer}."
        if module in _QKV:
            out[name] = (f"{block}attn.in_proj_{leaf}", _QKV[module])
        else:
            out[name] = (f"{block}{_OPEN_CLIP_LAYER[module]}.{leaf}", None)
    return out


# --------------------------------------------------------------------------------------------
# Converting


def convert(ckpt, table, expected, what):
    """{our name: float32 array} of one part, read from the file through `table`.

    UserError naming the file's first missing or misshapen weight.
    """
    missing = sorted({theirs for theirs, _ in table.values() if not ckpt.has(theirs)})
    if missing:
        raise UserError(f"{ckpt.path}: {what} weight {missing[0]} is missing ({len(missing)} missing in all); "
                        "the file is incomplete or not this model family")
    arrays = ckpt.read([ckpt.name(theirs) for theirs, _ in table.values()])
    out = {}
    for ours, (theirs, part) in table.items():
        array = arrays[ckpt.name(theirs)]
        want = tuple(expected[ours])
        if part == TRANSPOSE:
            array = array.T
        elif part is not None:  # a fused [3 * d, ...] in_proj: q, k, v stacked along the first axis
            d = want[0]
            if array.shape[0] != 3 * d:
                raise UserError(f"{ckpt.path}: {theirs} has shape {array.shape}, but q, k and v need {3 * d} rows")
            array = array[part * d:(part + 1) * d]
        if array.shape != want and array.size == int(np.prod(want)) and array.shape[:len(want)] == want:
            array = array.reshape(want)  # the VAE attention's 1x1 convs [c, c, 1, 1] as Linear [c, c]
        if array.shape != want:
            raise UserError(f"{ckpt.path}: {theirs} has shape {array.shape}, but this {what} needs {want}")
        out[ours] = np.ascontiguousarray(array)
    return out


def check_unet_covered(ckpt, table):
    """A UNet weight the table does not read means the UNet is not the one the config describes."""
    if ckpt.unet_from_ema:
        return
    used = {theirs for theirs, _ in table.values()}
    extra = sorted(k for k in ckpt.shapes if k.startswith(UNET) and k not in used)
    if extra:
        raise UserError(f"{ckpt.path}: unexpected UNet weight {extra[0]} ({len(extra)} in all); "
                        "not an SD 1.x/2.x or SDXL UNet")
