"""Pivotal tuning's LoRA files: diffusers/PEFT's and kohya's, the embedding bundled in kohya's.

- diffusers / PEFT (`pytorch_lora_weights.safetensors`, loaded by `pipe.load_lora_weights(dir)`):
  `unet.<module>.lora_A.weight` [rank, in(, kh, kw)] and `unet.<module>.lora_B.weight`
  [out, rank(, 1, 1)], `<module>` the UNet's diffusers name. The file carries no alpha (diffusers
  then reads alpha = rank, a scale of 1), so lora_B is written times alpha / rank.
- kohya (`<token>_lora.safetensors`, for kohya sd-scripts, A1111 / Forge and ComfyUI):
  `lora_unet_<name>.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha` (a scalar), `<name>`
  the module's kohya name with "_" for "." (ModelFamily.kohya_lora_names: diffusers' names for SD
  1.x/2.x, the original block names for SDXL), with kohya's `ss_*` metadata. The embedding is
  bundled as A1111 (PR 13568) and SD.Next read it: `bundle_emb.<token>.string_to_param.*` for one
  text encoder, `bundle_emb.<token>.clip_l` / `.clip_g` for SDXL. diffusers refuses a file with
  `bundle_emb.*` keys and ComfyUI ignores them: those load the diffusers file and the embedding.
"""

import json

import numpy as np

from .. import files
from .sdxl import CLIP_G, CLIP_L

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_PREFIX = "lora_unet_"
BUNDLE_PREFIX = "bundle_emb."


def kohya_file(token):
    """The kohya-layout file's name for a concept's token: "<cat-toy>" -> "cat-toy_lora.safetensors"."""
    stem = "".join(ch for ch in token if ch.isalnum() or ch in "-_") or "concept"
    return f"{stem}_lora.safetensors"


def diffusers_tensors(factors, scale):
    """{key: float32 array} of diffusers' PEFT layout for `factors` ({module: {"lora_A", "lora_B"}})."""
    out = {}
    for module, pair in factors.items():
        out[f"unet.{module}.lora_A.weight"] = np.asarray(pair["lora_A"], np.float32)
        out[f"unet.{module}.lora_B.weight"] = np.asarray(pair["lora_B"], np.float32) * np.float32(scale)
    return out


def kohya_tensors(factors, alpha, names):
    """{key: float32 array} of kohya's layout; `names` {module: kohya name}."""
    out = {}
    for module, pair in factors.items():
        key = KOHYA_PREFIX + names[module].replace(".", "_")
        out[f"{key}.lora_down.weight"] = np.asarray(pair["lora_A"], np.float32)
        out[f"{key}.lora_up.weight"] = np.asarray(pair["lora_B"], np.float32)
        out[f"{key}.alpha"] = np.asarray(alpha, np.float32)
    return out


def bundle(token, parts):
    """The bundled embedding's keys for `token`: one text encoder's rows [N, D] as A1111's
    string_to_param, or SDXL's two (clip_l's, clip_g's) under their keys."""
    parts = [np.asarray(p, np.float32) for p in parts]
    if len(parts) == 1:
        return {f"{BUNDLE_PREFIX}{token}.string_to_param.*": parts[0]}
    if len(parts) == 2:
        return {f"{BUNDLE_PREFIX}{token}.{CLIP_L}": parts[0], f"{BUNDLE_PREFIX}{token}.{CLIP_G}": parts[1]}
    raise ValueError(f"a bundled embedding has one or two text encoders' rows, got {len(parts)}")


def kohya_metadata(rank, alpha, base_model, resolution, steps, name):
    """kohya's `ss_*` metadata, which kohya's tools and A1111's extra-networks page show."""
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": base_model, "ss_resolution": json.dumps([resolution, resolution]),
            "ss_steps": str(steps), "ss_output_name": name, "ss_training_comment": "ti_flax pivotal tuning"}


def split_kohya(tensors):
    """(factors {kohya name: {"lora_A", "lora_B"}}, alphas {kohya name: float}, bundled {key: rows})
    of a kohya-layout file's tensors."""
    factors, alphas, bundled = {}, {}, {}
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            bundled[key] = value
            continue
        name, _, leaf = key.partition(".")
        if leaf == "lora_down.weight":
            factors.setdefault(name, {})["lora_A"] = value
        elif leaf == "lora_up.weight":
            factors.setdefault(name, {})["lora_B"] = value
        elif leaf == "alpha":
            alphas[name] = float(np.asarray(value))
    return factors, alphas, bundled


def save(path, tensors, metadata=None):
    """Write `tensors` as safetensors at `path`, atomically (files.WriteFailed naming it)."""
    return files.atomic_write(path, files.safetensors_bytes(tensors, metadata))
