"""Writing a whole model as a diffusers PyTorch-layout folder (`--save_as_full_pipeline`).

The folder is what `StableDiffusionPipeline.from_pretrained` reads (safetensors weights, config
files, the tokenizer holding the learned tokens, model_index.json), and what `load_model` reads
back. Every weight file goes through `files.write_bytes`, so a full disk is one line.
"""

import json
import os

import numpy as np

from .. import files
from . import configs, token_table, with_token_table
from .weights import flatten

# diffusers reads `_diffusers_version` only to warn about configs from much older releases.
_DIFFUSERS_VERSION = "0.30.0"


def _write_json(path, data):
    files.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_weights(path, params):
    tensors = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in flatten(params).items()}
    files.write_bytes(path, files.safetensors_bytes(tensors, metadata={"format": "pt"}))


def _scheduler_config(config):
    config = dict(config)
    name = str(config.get("_class_name", "PNDMScheduler"))
    config["_class_name"] = name[4:] if name.startswith("Flax") else name
    config.setdefault("_diffusers_version", _DIFFUSERS_VERSION)
    return config


def save_pipeline(model, tokenizer, rows, out_dir):
    """Write `model` with `rows` appended to its token table into `out_dir` (which must exist).

    Args:
      model: a LoadedModel. tokenizer: its tokenizer, already holding the new tokens (one per row,
        in row order). rows: float32 [N, hidden] learned rows. out_dir: an existing folder.
    Returns:
      out_dir.
    """
    from ..tokens import merged_table

    c = configs(model.spec)
    table = merged_table(token_table(model.params["text_encoder"]), rows)
    text_config = dict(c.text.to_dict(), vocab_size=int(table.shape[0]), torch_dtype="float32")
    parts = {
        "text_encoder": (text_config, with_token_table(model.params["text_encoder"], table), "model.safetensors"),
        "unet": (dict(c.unet.to_dict(), _class_name="UNet2DConditionModel", _diffusers_version=_DIFFUSERS_VERSION),
                 model.params["unet"], "diffusion_pytorch_model.safetensors"),
        "vae": (dict(c.vae.to_dict(), _class_name="AutoencoderKL", _diffusers_version=_DIFFUSERS_VERSION),
                model.params["vae"], "diffusion_pytorch_model.safetensors"),
    }
    for name, (config, params, weights_file) in parts.items():
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        _write_json(os.path.join(folder, "config.json"), config)
        _write_weights(os.path.join(folder, weights_file), params)
    scheduler = _scheduler_config(model.scheduler_config)
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    _write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), scheduler)
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    _write_json(os.path.join(out_dir, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    return out_dir
