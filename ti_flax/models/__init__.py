"""The frozen Stable Diffusion model, as the rest of ti_flax uses it: this face only re-exports.

ti_flax owns its model code: pure functions over parameter trees named like the PyTorch state
dicts (`weights.py`), with no diffusers or transformers model class (the tokenizer is
transformers' CLIPTokenizer).

| module | holds |
| --- | --- |
| `spec.py` | `ModelSpec` (what the model is), `Compute` (how a run computes with it), `LoadedModel` |
| `pretrained.py` | `load_model`: a diffusers folder, Hub id or single file -> `LoadedModel`; `read_spec`, `abstract_params` (no weights) |
| `forward.py` | running the parts inside jit: `condition`, `predict_noise`, `vae_moments`, `decode_latents` |
| `model_folder.py` | finding a model folder (local or Hub), its model_index.json, its family and parts |
| `tokenizers.py` | reading the CLIP tokenizer folder(s) |
| `component_weights.py` | reading one component's config and weights (`unet/`, `vae/`, `text_encoder/`) |
| `single_file.py`, `ldm_layout.py` | original single-file checkpoints: what a file is and loading it; each family's layout, configs from shapes, name tables |
| `flax_layout.py` | old Flax msgpack weights |
| `clip.py`, `unet.py`, `vae.py` | one network each; `attention.py`, `layers.py` their parts |
| `schedulers.py` | noise schedules and samplers |
"""

from .forward import (
    Condition, attention_sites, cast_params, condition, decode_latents, encode_text, predict_noise, resolve_attention,
    second_encoder_ids, token_table, token_tables, vae_moments, with_token_table,
)
from .model_folder import is_sdxl_dir, zeros_for_empty_negative
from .pretrained import abstract_params, load_model, read_spec
from .spec import Compute, LoadedModel, ModelSpec, default_size, spec_from, spec_from_configs
from .tokenizers import load_tokenizer

__all__ = [
    "Compute", "Condition", "LoadedModel", "ModelSpec", "abstract_params", "attention_sites", "cast_params", "condition",
    "decode_latents", "default_size", "encode_text", "is_sdxl_dir", "load_model",
    "load_tokenizer", "predict_noise", "read_spec", "resolve_attention", "second_encoder_ids", "spec_from", "spec_from_configs",
    "token_table", "token_tables", "vae_moments", "with_token_table", "zeros_for_empty_negative",
]
