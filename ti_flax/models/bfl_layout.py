"""The layouts of FLUX.1's files as Black Forest Labs (and ComfyUI, Forge, kohya) keep them: the
transformer in BFL's own names, and the T5 encoder in transformers' names; the configs their shapes
imply, and name tables to our (diffusers / transformers) names.

BFL transformer (flux1-dev.safetensors, flux1-schnell.safetensors; C = heads * 128):

  file                                          ours (diffusers' FluxTransformer2DModel)
  img_in                   [C, 64]              x_embedder
  txt_in                   [C, 4096]            context_embedder
  time_in.in_layer / .out_layer                 time_text_embed.timestep_embedder.linear_1 / _2
  vector_in.in_layer / .out_layer  [C, 768]...  time_text_embed.text_embedder.linear_1 / _2
  guidance_in.in_layer / .out_layer             time_text_embed.guidance_embedder.linear_1 / _2  ([dev] only)
  double_blocks.N.img_mod.lin / txt_mod.lin     transformer_blocks.N.norm1.linear / norm1_context.linear
  double_blocks.N.img_attn.qkv   [3C, C]        transformer_blocks.N.attn.to_q, to_k, to_v (rows in that order)
  double_blocks.N.txt_attn.qkv   [3C, C]        transformer_blocks.N.attn.add_q_proj, add_k_proj, add_v_proj
  double_blocks.N.img_attn.norm.query_norm.scale / key_norm.scale   ...attn.norm_q / norm_k .weight
  double_blocks.N.txt_attn.norm.query_norm.scale / key_norm.scale   ...attn.norm_added_q / norm_added_k .weight
  double_blocks.N.img_attn.proj / txt_attn.proj ...attn.to_out.0 / attn.to_add_out
  double_blocks.N.img_mlp.0 / .2, txt_mlp.0 / .2   ...ff.net.0.proj / ff.net.2, ff_context.net.0.proj / .net.2
  single_blocks.N.linear1        [3C + 4C, C]   single_transformer_blocks.N.attn.to_q, to_k, to_v, proj_mlp
  single_blocks.N.linear2        [C, C + 4C]    single_transformer_blocks.N.proj_out
  single_blocks.N.norm.query_norm.scale / key_norm.scale   ...attn.norm_q / norm_k .weight
  single_blocks.N.modulation.lin                single_transformer_blocks.N.norm.linear
  final_layer.linear                            proj_out
  final_layer.adaLN_modulation.1 [2C, C]        norm_out.linear, its two halves swapped (BFL: shift then
                                                scale; diffusers' AdaLayerNormContinuous: scale then shift)

Every Linear has its .weight and .bias under the same renaming. The config from the shapes: C from
img_in's rows, the head width from a q/k norm's scale (128, FLUX.1's; its RoPE axes (16, 56, 56) are
in no file), the block counts, the input widths of txt_in and vector_in, and [dev] vs [schnell] from
guidance_in: present in [dev] (guidance-distilled), absent in [schnell]. ComfyUI's all-in-one files
put the transformer under `model.diffusion_model.`; flux_files.py strips it before these tables.

T5 (t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors): transformers' T5EncoderModel names, the
token table as `shared.weight` and/or its tied copy `encoder.embed_tokens.weight`; heads and buckets
from the relative-position bias [buckets, heads], gated-GELU (T5 v1.1) from `wi_0` / `wi_1`.

`convert` reads a file through a table one weight at a time, converting each to the asked dtype
as it goes (FLUX.1 [dev] is 12B weights: a float32 copy on the way to bf16 would be 48 GB).
"""

import numpy as np

from ..errors import UserError
from . import t5

HEAD_DIM = 128  # every FLUX.1 transformer's attention heads
AXES_DIMS_ROPE = (16, 56, 56)  # FLUX.1's RoPE axes (t, h, w); they add up to HEAD_DIM
LATENT_INPUTS = 64  # 16 latent channels packed 2x2: what img_in takes in [dev] and [schnell]
SWAP = "swap"  # a table entry whose file weight holds our weight's two halves the other way round

_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2"}
_GUIDANCE = {"guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
_DOUBLE = {"img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",),
           "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
           "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
           "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
           "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
           "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",)}
_DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                 "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                 "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                 "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
           "modulation.lin": ("norm.linear",)}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}

# What tells a BFL transformer's parts apart, for the config and the messages.
IMG_IN, TXT_IN, VECTOR_IN, GUIDANCE_IN = "img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", \
    "guidance_in.in_layer.weight"
QUERY_NORM = "double_blocks.0.img_attn.norm.query_norm.scale"
FINAL = "final_layer.linear.weight"

T5_TABLES = (t5.TABLE, t5.TIED_COPY)  # shared.weight, encoder.embed_tokens.weight
T5_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
T5_RELATIVE_MAX_DISTANCE = 128  # T5 v1.1's, in no file
T5_LAYER_NORM_EPSILON = 1e-6


def _need(ckpt, names, what):
    for name in names:
        if not ckpt.has(name):
            raise UserError(f"{ckpt.path}: no {name}; not {what}")


# --------------------------------------------------------------------------------------------
# The transformer


def transformer_config(ckpt):
    """flux.FluxConfig dict of a BFL transformer (`ckpt`: a single_file.Checkpoint-like view whose
    names have no prefix), from its shapes and FLUX.1's fixed head width and RoPE axes."""
    what = "a FLUX.1 transformer"
    _need(ckpt, (IMG_IN, TXT_IN, VECTOR_IN, QUERY_NORM, FINAL), what)
    width, inputs = ckpt.shape(IMG_IN)
    head_dim = ckpt.shape(QUERY_NORM)[0]
    if head_dim != HEAD_DIM or width % head_dim:
        raise UserError(f"{ckpt.path}: attention heads {head_dim} wide in a {width}-wide transformer; FLUX.1's "
                        f"heads are {HEAD_DIM} wide (its RoPE axes {list(AXES_DIMS_ROPE)} add up to that)")
    outputs = ckpt.shape(FINAL)[0]
    return {
        "patch_size": 1,
        "in_channels": inputs,
        "out_channels": None if outputs == inputs else outputs,  # as FLUX.1's config.json: null, i.e. in_channels
        "num_layers": ckpt.count("double_blocks.{}.img_attn.qkv.weight"),
        "num_single_layers": ckpt.count("single_blocks.{}.linear1.weight"),
        "attention_head_dim": head_dim,
        "num_attention_heads": width // head_dim,
        "joint_attention_dim": ckpt.shape(TXT_IN)[1],
        "pooled_projection_dim": ckpt.shape(VECTOR_IN)[1],
        "guidance_embeds": ckpt.has(GUIDANCE_IN),
        "axes_dims_rope": list(AXES_DIMS_ROPE),
    }


def transformer_names(config):
    """{BFL file name: (our names, how)} of every weight of a flux.FluxConfig: `how` None stacks our
    weights along the first axis in order (one name: the weight itself), SWAP swaps its halves."""
    modules = dict(_TOP, **(_GUIDANCE if config.guidance_embeds else {}))
    table = {f"{theirs}.{leaf}": ((f"{ours}.{leaf}",), None) for theirs, ours in modules.items()
             for leaf in ("weight", "bias")}
    for leaf in ("weight", "bias"):
        table[f"final_layer.adaLN_modulation.1.{leaf}"] = ((f"norm_out.linear.{leaf}",), SWAP)
    blocks = ((config.num_layers, "double_blocks", "transformer_blocks", _DOUBLE, _DOUBLE_NORMS),
              (config.num_single_layers, "single_blocks", "single_transformer_blocks", _SINGLE, _SINGLE_NORMS))
    for count, theirs_block, ours_block, linears, norms in blocks:
        for i in range(count):
            theirs, ours = f"{theirs_block}.{i}.", f"{ours_block}.{i}."
            for name, parts in linears.items():
                for leaf in ("weight", "bias"):
                    table[f"{theirs}{name}.{leaf}"] = (tuple(f"{ours}{p}.{leaf}" for p in parts), None)
            for name, part in norms.items():
                table[theirs + name] = ((ours + part,), None)
    return table


# --------------------------------------------------------------------------------------------
# T5


def t5_table_name(ckpt):
    """The name a T5 file keeps its token table under: `shared.weight`, else its tied copy."""
    return next((n for n in T5_TABLES if ckpt.has(n)), T5_TABLES[0])


def t5_config(ckpt):
    """t5.T5Config dict of a T5 encoder file in transformers' names, from its shapes (the relative
    positions' max distance and the norms' epsilon are T5 v1.1's, which no file states)."""
    what = "a T5 encoder"
    table = t5_table_name(ckpt)
    attn, ff = "encoder.block.0.layer.0.SelfAttention.", "encoder.block.0.layer.1.DenseReluDense."
    gated = ckpt.has(ff + "wi_0.weight")
    _need(ckpt, (table, T5_BIAS, attn + "q.weight", ff + ("wi_0.weight" if gated else "wi.weight")), what)
    vocab_size, d_model = ckpt.shape(table)
    buckets, heads = ckpt.shape(T5_BIAS)
    inner = ckpt.shape(attn + "q.weight")[0]
    if inner % heads:
        raise UserError(f"{ckpt.path}: {inner}-wide attention for {heads} heads; not {what}")
    return {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "d_kv": inner // heads,
        "d_ff": ckpt.shape(ff + ("wi_0.weight" if gated else "wi.weight"))[0],
        "num_layers": ckpt.count("encoder.block.{}.layer.0.SelfAttention.q.weight"),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": T5_RELATIVE_MAX_DISTANCE,
        "layer_norm_epsilon": T5_LAYER_NORM_EPSILON,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
    }


def t5_names(config, table_name=t5.TABLE):
    """{file name: (our names, None)}: transformers' names, the token table read from `table_name`."""
    return {(table_name if ours == t5.TABLE else ours): ((ours,), None) for ours in t5.param_shapes(config)}


# --------------------------------------------------------------------------------------------
# Converting


def file_shape(ours, how, expected):
    """The shape the file's weight must have to hold our weights `ours` (see transformer_names)."""
    shapes = [tuple(expected[name]) for name in ours]
    if how == SWAP or len(shapes) == 1:
        return shapes[0]
    return (sum(s[0] for s in shapes),) + shapes[0][1:]


def convert(ckpt, table, expected, what, dtype):
    """{our name: array in `dtype`} read from `ckpt` through `table` (transformer_names, t5_names).

    Args:
      ckpt: a view with has / shape / read_as (flux_files.WeightFile); `ckpt.path` names the file
        (and its flag) in messages.
      expected: {our name: shape} (flux.param_shapes, t5.param_shapes).
      what: the part, for messages ("FLUX.1 transformer").
      dtype: the numpy dtype of the result.
    Every file weight is looked up by name and its shape checked before any is read, so a file that
    does not fit is one UserError naming the weight; then one weight is read and converted at a time.
    """
    missing = sorted(name for name in table if not ckpt.has(name))
    if missing:
        raise UserError(f"{ckpt.path}: {what} weight {missing[0]} is missing ({len(missing)} missing in all); "
                        "the file is incomplete or not this model")
    for name, (ours, how) in table.items():
        want, got = file_shape(ours, how, expected), ckpt.shape(name)
        if got != want:
            raise UserError(f"{ckpt.path}: {what} weight {name} has shape {got}, but this {what} needs {want}")
    out = {}
    for name, (ours, how) in table.items():
        array = ckpt.read_as([name], dtype)[name]
        if how == SWAP:
            half = array.shape[0] // 2
            out[ours[0]] = np.concatenate([array[half:], array[:half]])
            continue
        start = 0
        for part in ours:
            rows = expected[part][0]
            out[part] = np.ascontiguousarray(array[start:start + rows])
            start += rows
    return out

