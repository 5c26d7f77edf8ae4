"""Writing a whole model as a diffusers PyTorch-layout folder (`--save_as_full_pipeline`).

The folder is what `StableDiffusionPipeline.from_pretrained` (for SDXL,
`StableDiffusionXLPipeline.from_pretrained`) reads (safetensors weights, config files, the
tokenizer(s) holding the learned tokens, model_index.json), and what `load_model` reads back.
Every weight file goes through `files.write_bytes`, so a full disk is one line.
"""

import json
import os

import numpy as np

from .. import files
from .forward import split_rows, token_table, with_token_table
from .model_folder import zeros_for_empty_negative
from .spec import configs
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


def save_pipeline(model, tokenizer, rows, out_dir, tokenizer_2=None):
    """Write `model` with `rows` appended to its token table(s) into `out_dir` (which must exist).

    For SDXL, the folder is a `StableDiffusionXLPipeline`'s: each text encoder's table gets its
    part of the rows (`split_rows`: the CLIP-L part in text_encoder, the bigG part in
    text_encoder_2) and tokenizer_2 is saved beside tokenizer, both holding the new tokens.

    Args:
      model: a LoadedModel. tokenizer: its tokenizer, already holding the new tokens (one per row,
        in row order). rows: float32 [N, row_width] learned rows. out_dir: an existing folder.
      tokenizer_2: SDXL's second tokenizer holding the same new tokens with the same ids
        (default: `model.tokenizer_2`, which `run.prepare` gave them); unused otherwise.
    Returns:
      out_dir.
    """
    from ..tokens import merged_table

    spec, c = model.spec, configs(model.spec)
    encoders = [("text_encoder", c.text, tokenizer)]
    if spec.is_sdxl:
        encoders.append(("text_encoder_2", c.text_2, tokenizer_2 if tokenizer_2 is not None else model.tokenizer_2))
    parts = {}
    for (name, text, tok), part_rows in zip(encoders, split_rows(spec, rows)):
        table = merged_table(token_table(model.params[name]), part_rows)
        if len(tok) != table.shape[0]:  # a tokenizer without the tokens would save a folder that cannot load
            raise ValueError(f"{name}: {table.shape[0]} rows but its tokenizer has {len(tok)} tokens")
        text_config = dict(text.to_dict(), vocab_size=int(table.shape[0]), torch_dtype="float32")
        parts[name] = (text_config, with_token_table(model.params[name], table), "model.safetensors")
    parts.update({
        "unet": (dict(c.unet.to_dict(), _class_name="UNet2DConditionModel", _diffusers_version=_DIFFUSERS_VERSION),
                 model.params["unet"], "diffusion_pytorch_model.safetensors"),
        "vae": (dict(c.vae.to_dict(), _class_name="AutoencoderKL", _diffusers_version=_DIFFUSERS_VERSION),
                model.params["vae"], "diffusion_pytorch_model.safetensors"),
    })
    for name, (config, params, weights_file) in parts.items():
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        _write_json(os.path.join(folder, "config.json"), config)
        _write_weights(os.path.join(folder, weights_file), params)
    scheduler = _scheduler_config(model.scheduler_config)
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    _write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), scheduler)
    for (name, _, tok) in encoders:
        tok.save_pretrained(os.path.join(out_dir, name.replace("text_encoder", "tokenizer")))
    _write_json(os.path.join(out_dir, "model_index.json"), _model_index(model, scheduler["_class_name"]))
    return out_dir


def _model_index(model, scheduler_class):
    """model_index.json: StableDiffusionPipeline's, or StableDiffusionXLPipeline's for SDXL."""
    index = {
        "_diffusers_version": _DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if not model.spec.is_sdxl:
        return dict(index, _class_name="StableDiffusionPipeline", requires_safety_checker=False,
                    safety_checker=[None, None])
    return dict(
        index, _class_name="StableDiffusionXLPipeline", image_encoder=[None, None],
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"],
        # SDXL base zeroes the negative conditioning of an empty prompt; keep the model's choice.
        force_zeros_for_empty_prompt=zeros_for_empty_negative(model),
    )
