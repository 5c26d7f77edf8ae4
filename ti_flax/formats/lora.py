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
from ..errors import UserError
from ..models.lora import factor_shapes
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


def read(path, shapes, kohya_names):
    """The factors of a LoRA file in either layout, {module: {"lora_A", "lora_B"}} float32 numpy
    with each module's scale folded into lora_B (apply with scale 1).

    Args:
      path: a `.safetensors` file: diffusers' PEFT layout (`unet.<module>.lora_A.weight`, its
        alpha already in B) or kohya's (`lora_unet_<name>.lora_down.weight`, `.lora_up.weight`,
        `.alpha`: B times alpha / rank); bundled embeddings are skipped.
      shapes: {module: weight shape} of every module the model can adapt (the family's lora_targets
        of every name). kohya_names: {module: kohya name} of the same modules.
    Raises:
      UserError naming the file and the first key it cannot place (a text encoder's LoRA, another
      model's module) or a factor whose shape does not fit the module.
    """
    tensors = files.read_safetensors(path, advice=None)
    factors = {}
    if any(k.startswith(KOHYA_PREFIX) or k.startswith("lora_te") for k in tensors):
        by_name = {KOHYA_PREFIX + name.replace(".", "_"): module for module, name in kohya_names.items()}
        pairs, alphas, _ = split_kohya(tensors)
        for name, pair in pairs.items():
            module = by_name.get(name)
            if module is None or set(pair) != {"lora_A", "lora_B"}:
                what = "a text encoder's LoRA" if name.startswith("lora_te") else "no module of this model's UNet"
                raise UserError(f"{path}: {name} is {what}; only a LoRA of the UNet's attention, feed-forward and "
                                "projections can be applied")
            rank = pair["lora_A"].shape[0]
            scale = alphas.get(name, rank) / rank
            factors[module] = {"lora_A": pair["lora_A"], "lora_B": pair["lora_B"] * np.float32(scale)}
    else:
        for key, value in tensors.items():
            module, _, leaf = key.removeprefix("unet.").rpartition(".lora_")
            if not key.startswith("unet.") or leaf not in ("A.weight", "B.weight") or module not in shapes:
                raise UserError(f"{path}: {key} is not a LoRA weight of this model's UNet (diffusers' "
                                "unet.<module>.lora_A.weight / lora_B.weight, or kohya's lora_unet_* layout)")
            factors.setdefault(module, {})["lora_" + leaf[0]] = value
    for module, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise UserError(f"{path}: {module} has only {', '.join(pair)}; a LoRA needs both factors")
        rank = pair["lora_A"].shape[0]
        want = factor_shapes(shapes[module], rank)
        got = (tuple(pair["lora_A"].shape), tuple(pair["lora_B"].shape))
        if got != want:
            raise UserError(f"{path}: {module}'s factors are {got[0]} and {got[1]}, this model's needs {want[0]} and "
                            f"{want[1]}: a LoRA of another model")
        factors[module] = {k: np.asarray(v, np.float32) for k, v in pair.items()}
    if not factors:
        raise UserError(f"{path}: no LoRA weights in this file")
    return factors


def save(path, tensors, metadata=None):
    """Write `tensors` as safetensors at `path`, atomically (files.WriteFailed naming it)."""
    return files.atomic_write(path, files.safetensors_bytes(tensors, metadata))
