"""The frozen models (Stable Diffusion, FLUX.1), as the rest of ti_flax uses them: this face only re-exports.

ti_flax owns its model code: pure functions over parameter trees named like the PyTorch state
dicts (`weights.py`), with no diffusers or transformers model class (the tokenizer is
transformers' CLIPTokenizer, and its T5Tokenizer for FLUX.1).

| module | holds |
| --- | --- |
| `spec.py` | `ModelSpec` (what the model is), `Compute` (how a run computes with it), `LoadedModel` |
| `pretrained.py` | what every family reads alike: single file or not, the noise schedule, another VAE, `abstract_params` (no weights) |
| `forward.py` | running the parts inside jit: `encode_text`, `predict_noise`, `vae_moments`, `decode_latents` |
| `model_folder.py` | finding a model folder (local or Hub), its model_index.json, pipelines ti_flax does not train |
| `tokenizers.py`, `clip_vocab.py` | reading the CLIP tokenizer folder(s); the bundled CLIP vocabulary |
| `component_weights.py` | reading one component's config and weights (`unet/`, `vae/`, `text_encoder/`) |
| `single_file.py`, `ldm_layout.py` | original single-file checkpoints: which family's layout a file is in, and loading it; configs from shapes, name tables |
| `flax_layout.py` | old Flax msgpack weights |
| `flux_files.py`, `bfl_layout.py` | FLUX.1's folder and the files kept apart (Black Forest Labs' transformer, clip_l, t5xxl, ae; fp8): configs from shapes, name tables, refusals |
| `clip.py`, `unet.py`, `vae.py`, `t5.py`, `flux.py` | one network each (FLUX.1's transformer and its 2x2 packing in `flux.py`); `attention.py`, `layers.py` their parts |
| `schedulers.py` | DDPM noise schedules and samplers |
| `flow_match.py` | rectified flow (FLUX.1): the time draws, the forward process, the Euler sampler's sigmas |
"""

from .forward import (
    Condition, attention_sites, cast_params, decode_latents, encode_text, predict_noise, resolve_attention, token_table,
    token_tables, vae_moments, with_token_table,
)
from .pretrained import abstract_params
from .spec import Compute, LoadedModel, ModelSpec, default_size, spec_from
from .tokenizers import load_tokenizer

__all__ = [
    "Compute", "Condition", "LoadedModel", "ModelSpec", "abstract_params", "attention_sites", "cast_params",
    "decode_latents", "default_size", "encode_text", "load_tokenizer", "predict_noise", "resolve_attention",
    "spec_from", "token_table", "token_tables", "vae_moments", "with_token_table",
]
