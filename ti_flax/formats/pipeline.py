"""Saved pipeline folders: a whole model as a diffusers PyTorch-layout folder, with the learned
tokens in its tokenizer(s) and their rows in its text encoder(s).

`save_pipeline` writes one (`--save_as_full_pipeline`): what `StableDiffusionPipeline.from_pretrained`
(for SDXL, `StableDiffusionXLPipeline.from_pretrained`) reads (safetensors weights, config files, the
tokenizer(s) holding the learned tokens, model_index.json), and what `families.load_model` reads back.
Every weight file goes through `files.write_bytes`, so a full disk is one line.

`read` takes the rows of the tokens `token, token_1, ...` back out of a folder's text_encoder/ and
tokenizer/. ti_flax.models (and with it jax) is imported only when a pipeline is written or read,
so reading and exporting embedding files stays light; models never imports formats.
"""

import json
import os
import re

import numpy as np

from .. import files
from ..errors import UserError, short_list
from ..tokens import merged_table, split_rows
from .base import Embedding, Layout, register, rows_read


def is_pipeline(folder):
    """Whether `folder` has the text_encoder/ and tokenizer/ folders a pipeline's rows come from."""
    return os.path.isdir(os.path.join(folder, "text_encoder")) and os.path.isdir(os.path.join(folder, "tokenizer"))


def read(folder, token):
    """The `Embedding` of `token, token_1, ...` in a saved pipeline's text encoder.

    Raises:
        UserError: `token` was not added to the tokenizer, the table is too short for its
            ids, or the text encoder's weights are missing or damaged.
    """
    tokenizer = _tokenizer(folder)
    added = _added_ids(tokenizer)
    if token not in added:
        raise UserError(
            f"{folder}: {token!r} is not a token added to this pipeline's tokenizer "
            f"(added tokens: {short_list(_learned_tokens(tokenizer), 5) or 'none'})"
        )
    tokens = [token]
    while f"{token}_{len(tokens)}" in added:
        tokens.append(f"{token}_{len(tokens)}")
    ids = [added[t] for t in tokens]
    table = _token_table(os.path.join(folder, "text_encoder"))
    if max(ids) >= table.shape[0]:
        raise UserError(f"{folder}: tokenizer has id {max(ids)} but the text encoder has only {table.shape[0]} rows")
    return Embedding(token, rows_read(folder, table[ids]), LAYOUT.name, None, folder)


def learned_tokens(folder):
    """The learned tokens of a pipeline folder (`tok`, not `tok_1`), sorted."""
    return _learned_tokens(_tokenizer(folder))


def _tokenizer(folder):
    from .. import models  # jax: only when a pipeline is read (see the module docstring)

    return models.load_tokenizer(os.path.join(folder, "tokenizer"))


def _added_ids(tokenizer):
    # Tokens added after the base vocabulary (CLIP's special tokens are inside it).
    return {t: i for t, i in tokenizer.get_added_vocab().items() if i >= tokenizer.vocab_size}


def _learned_tokens(tokenizer):
    added = _added_ids(tokenizer)
    return sorted(t for t in added if not (re.fullmatch(r"(.+)_\d+", t) and re.sub(r"_\d+$", "", t) in added))


def _token_table(folder):
    st = os.path.join(folder, "model.safetensors")
    if os.path.isfile(st):
        key = "text_model.embeddings.token_embedding.weight"
        return files.read_safetensors(st, keys=[key])[key]
    msgpack = os.path.join(folder, "flax_model.msgpack")  # an old Flax pipeline
    if os.path.isfile(msgpack):
        tree = files.read_msgpack(msgpack)
        tree = tree.get("clip", tree) if "text_model" not in tree else tree
        try:
            return np.asarray(tree["text_model"]["embeddings"]["token_embedding"]["embedding"])
        except (KeyError, TypeError):
            raise files.DamagedFile(msgpack, "holds no CLIP token embedding (text_model.embeddings.token_embedding)") from None
    raise UserError(f"{folder}: no text encoder weights (model.safetensors or flax_model.msgpack)")


LAYOUT = register(Layout("pipeline", "a saved pipeline folder: the rows of token, token_1, ... in its text encoder"))


# --------------------------------------------------------------------------------------------
# Writing a whole pipeline

# diffusers reads `_diffusers_version` only to warn about configs from much older releases.
_DIFFUSERS_VERSION = "0.30.0"


def _write_json(path, data):
    files.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_weights(path, state_dict):
    tensors = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in state_dict.items()}
    files.write_bytes(path, files.safetensors_bytes(tensors, metadata={"format": "pt"}))


def scheduler_config(config):
    """A model's scheduler config as a saved pipeline's scheduler_config.json holds it (PyTorch class names)."""
    config = dict(config)
    name = str(config.get("_class_name", "PNDMScheduler"))
    config["_class_name"] = name[4:] if name.startswith("Flax") else name
    config.setdefault("_diffusers_version", _DIFFUSERS_VERSION)
    return config


def model_index(scheduler_class):
    """The model_index.json entries every Stable Diffusion pipeline folder has; a family adds its
    class name and its own parts (ModelFamily.model_index)."""
    return {
        "_diffusers_version": _DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_pipeline(model, encoders, rows, out_dir, scheduler, index):
    """Write `model` with `rows` appended to its token table(s) into `out_dir` (which must exist).

    Each text encoder's table gets its part of the rows (`tokens.split_rows`), and each tokenizer,
    already holding the new tokens, is saved beside it. A family chooses the parts and the index
    (ModelFamily.save_pipeline).

    Args:
      model: a LoadedModel. encoders: (params key, tokenizer folder, tokenizer) per text encoder,
        in row order; each tokenizer holds the new tokens (one per row, in row order).
      rows: float32 [N, row_width] learned rows. out_dir: an existing folder.
      scheduler: the scheduler_config.json to write (`scheduler_config`). index: model_index.json.
    Returns:
      out_dir.
    """
    from .. import models  # jax: only when a pipeline is written (see the module docstring)
    from ..models.weights import flatten

    spec = model.spec
    parts = {}
    for (name, _, tok), text, part_rows in zip(encoders, spec.text_configs, split_rows(rows, spec.text_widths)):
        table = merged_table(models.token_table(model.params[name]), part_rows)
        if len(tok) != table.shape[0]:  # a tokenizer without the tokens would save a folder that cannot load
            raise ValueError(f"{name}: {table.shape[0]} rows but its tokenizer has {len(tok)} tokens")
        text_config = dict(text.to_dict(), vocab_size=int(table.shape[0]), torch_dtype="float32")
        parts[name] = (text_config, models.with_token_table(model.params[name], table), "model.safetensors")
    parts.update({
        "unet": (dict(spec.denoiser.to_dict(), _class_name="UNet2DConditionModel", _diffusers_version=_DIFFUSERS_VERSION),
                 model.params["unet"], "diffusion_pytorch_model.safetensors"),
        "vae": (dict(spec.vae.to_dict(), _class_name="AutoencoderKL", _diffusers_version=_DIFFUSERS_VERSION),
                model.params["vae"], "diffusion_pytorch_model.safetensors"),
    })
    for name, (config, params, weights_file) in parts.items():
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        _write_json(os.path.join(folder, "config.json"), config)
        _write_weights(os.path.join(folder, weights_file), flatten(params))
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    _write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), scheduler)
    for _, folder, tok in encoders:
        tok.save_pretrained(os.path.join(out_dir, folder))
    _write_json(os.path.join(out_dir, "model_index.json"), index)
    return out_dir
