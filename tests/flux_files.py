"""A FLUX.1 diffusers folder -> the files ComfyUI, Forge and kohya users keep apart: the transformer
in Black Forest Labs' names (flux1-dev.safetensors), clip_l.safetensors, t5xxl_fp16 / fp8, and
ae.safetensors; the tests' own mapping, written independently of ti_flax's loader
(ti_flax/models/flux_files.py, bfl_layout.py) so that loading the files back checks it.

Each writer returns (file state, what a correct loader reads back in diffusers' / transformers'
names, float32): the folder's weights rounded as the file stores them (fp16, bf16, fp8 upcast;
ComfyUI's scaled fp8: the fp8 weight times its scale, the scale being per fused tensor, so the
reference is computed on the file's tensors and mapped back).
"""

import json
import os

import numpy as np
import torch
from safetensors.numpy import load_file

from original_layout import vae_key

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def folder_state(model_dir, part):
    """{name: float32 array} of one component folder's safetensors, read directly."""
    folder = os.path.join(model_dir, part)
    return {k: np.asarray(v, np.float32) for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, name)).items()}


def folder_config(model_dir, part):
    with open(os.path.join(model_dir, part, "config.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# The transformer: diffusers <-> BFL

_LINEARS = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
            "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
            "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
_DOUBLE = [("norm1.linear", ["img_mod.lin"]), ("norm1_context.linear", ["txt_mod.lin"]),
           ("attn.to_out.0", ["img_attn.proj"]), ("attn.to_add_out", ["txt_attn.proj"]),
           ("ff.net.0.proj", ["img_mlp.0"]), ("ff.net.2", ["img_mlp.2"]),
           ("ff_context.net.0.proj", ["txt_mlp.0"]), ("ff_context.net.2", ["txt_mlp.2"])]
_DOUBLE_FUSED = {"img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
                 "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]}
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_SINGLE_FUSED = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def _blocks(state, prefix):
    return sorted({int(k.split(".")[1]) for k in state if k.startswith(prefix)})


def to_bfl(state):
    """diffusers FluxTransformer2DModel state -> BFL names (fused q/k/v, norm_out's halves swapped)."""
    out = {}
    for ours, theirs in _LINEARS.items():
        for leaf in ("weight", "bias"):
            if f"{ours}.{leaf}" in state:
                out[f"{theirs}.{leaf}"] = state[f"{ours}.{leaf}"]
    for leaf in ("weight", "bias"):
        scale, shift = np.split(state[f"norm_out.linear.{leaf}"], 2)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = np.concatenate([shift, scale])
    for i in _blocks(state, "transformer_blocks."):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for ours, (theirs,) in _DOUBLE:
            for leaf in ("weight", "bias"):
                out[f"{dst}{theirs}.{leaf}"] = state[f"{src}{ours}.{leaf}"]
        for theirs, parts in _DOUBLE_FUSED.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{theirs}.{leaf}"] = np.concatenate([state[f"{src}{p}.{leaf}"] for p in parts])
        for ours, theirs in _DOUBLE_NORMS.items():
            out[f"{dst}{theirs}.scale"] = state[f"{src}{ours}.weight"]
    for i in _blocks(state, "single_transformer_blocks."):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}linear1.{leaf}"] = np.concatenate([state[f"{src}{p}.{leaf}"] for p in _SINGLE_FUSED["linear1"]])
            for ours, theirs in _SINGLE.items():
                out[f"{dst}{theirs}.{leaf}"] = state[f"{src}{ours}.{leaf}"]
        for ours, theirs in _SINGLE_NORMS.items():
            out[f"{dst}{theirs}.scale"] = state[f"{src}{ours}.weight"]
    return out


def from_bfl(bfl, like):
    """The inverse of to_bfl: BFL state -> diffusers names, split as the diffusers state `like` is."""
    out = {}
    for ours, theirs in _LINEARS.items():
        for leaf in ("weight", "bias"):
            if f"{theirs}.{leaf}" in bfl:
                out[f"{ours}.{leaf}"] = bfl[f"{theirs}.{leaf}"]
    for leaf in ("weight", "bias"):
        shift, scale = np.split(bfl[f"final_layer.adaLN_modulation.1.{leaf}"], 2)
        out[f"norm_out.linear.{leaf}"] = np.concatenate([scale, shift])
    for i in _blocks(like, "transformer_blocks."):
        dst, src = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for ours, (theirs,) in _DOUBLE:
            for leaf in ("weight", "bias"):
                out[f"{dst}{ours}.{leaf}"] = bfl[f"{src}{theirs}.{leaf}"]
        for theirs, parts in _DOUBLE_FUSED.items():
            for leaf in ("weight", "bias"):
                sizes = np.cumsum([like[f"{dst}{p}.{leaf}"].shape[0] for p in parts])[:-1]
                for p, piece in zip(parts, np.split(bfl[f"{src}{theirs}.{leaf}"], sizes)):
                    out[f"{dst}{p}.{leaf}"] = piece
        for ours, theirs in _DOUBLE_NORMS.items():
            out[f"{dst}{ours}.weight"] = bfl[f"{src}{theirs}.scale"]
    for i in _blocks(like, "single_transformer_blocks."):
        dst, src = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        parts = _SINGLE_FUSED["linear1"]
        for leaf in ("weight", "bias"):
            sizes = np.cumsum([like[f"{dst}{p}.{leaf}"].shape[0] for p in parts])[:-1]
            for p, piece in zip(parts, np.split(bfl[f"{src}linear1.{leaf}"], sizes)):
                out[f"{dst}{p}.{leaf}"] = piece
            for ours, theirs in _SINGLE.items():
                out[f"{dst}{ours}.{leaf}"] = bfl[f"{src}{theirs}.{leaf}"]
        for ours, theirs in _SINGLE_NORMS.items():
            out[f"{dst}{ours}.weight"] = bfl[f"{src}{theirs}.scale"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# The text encoders and the autoencoder

def to_clip_l(state, rng, prefix=True, projection=True):
    """A CLIPTextModel state (transformers 5 saves it without `text_model.`) as ComfyUI's clip_l.safetensors:
    `text_model.*` (prefix=True), a `text_projection.weight` and `logit_scale` FLUX never reads, and the
    `position_ids` buffer transformers 4.x saved."""
    out = {("text_model." + k if prefix and not k.startswith("text_model.") else k): v for k, v in state.items()}
    hidden = state[next(k for k in state if k.endswith("final_layer_norm.weight"))].shape[0]
    out[("text_model." if prefix else "") + "embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    if projection:
        out["text_projection.weight"] = rng.standard_normal((768, hidden)).astype(np.float32)
        out["logit_scale"] = np.array(4.6, np.float32)
    return out


def to_ae(state):
    """A FLUX AutoencoderKL state (no quant convs) in the original LDM names, without first_stage_model."""
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks."))
    out = {}
    for name, value in state.items():
        key, was_conv = vae_key(name, levels)
        out[key] = value[:, :, None, None] if was_conv and value.ndim == 2 else value
    return out


# --------------------------------------------------------------------------------------------
# Storing: dtypes, fp8, ComfyUI's scaled fp8


def store(state, dtype, scaled=()):
    """({name: torch tensor} as a file stores `state`, {name: float32 array} a loader reads back).

    dtype: "float32", "float16", "bfloat16" or "float8_e4m3fn" for every float tensor. `scaled`:
    names of 2-D weights stored as ComfyUI's scaled fp8 (weight / scale in fp8, `.scale_weight`
    beside it, the `scaled_fp8` marker), whatever `dtype` is.
    """
    tensors, back = {}, {}
    for name, value in state.items():
        t = torch.from_numpy(np.ascontiguousarray(value))
        if not t.is_floating_point():
            tensors[name], back[name] = t, value
            continue
        if name in scaled:
            scale = (t.abs().max() / FP8_MAX).to(torch.float32)
            q = (t / scale).to(FP8)
            tensors[name], tensors[name[:-len("weight")] + "scale_weight"] = q, scale.reshape(())
            tensors[name[:-len("weight")] + "scale_input"] = torch.ones(())  # what ComfyUI's files carry
            back[name] = (q.float() * scale).numpy()
            continue
        stored = t.to(getattr(torch, dtype))
        tensors[name], back[name] = stored, stored.float().numpy()
    if scaled:
        tensors["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return tensors, back


def save(tensors, path, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def linear_weights(state):
    """The 2-D `.weight` names of a state (the Linears ComfyUI's scaled fp8 quantizes)."""
    return {k for k, v in state.items() if k.endswith(".weight") and np.ndim(v) == 2}


def prefixed(tensors, prefix):
    return {prefix + k: v for k, v in tensors.items()}
