"""FLUX.1 embeddings: rows for CLIP ViT-L (768 wide) and T5-XXL (4096), in one file.

- `flux`: `{"clip_l": [N, D1], "t5xxl": [N, D2], "t5": [N, D2]}` (`.safetensors`, or `torch.save`d
  to a `.pt`). ComfyUI reads each tokenizer's rows by its key, `clip_l` and `t5xxl` (a file
  without its key has its first tensor taken, and dropped where the width differs: OneTrainer's
  files lose their T5 part there, OneTrainer#514); OneTrainer reads `clip_l` and `t5`. The file
  carries both T5 keys, the same rows, so either tool reads it whole. It names no token: ComfyUI and
  OneTrainer call an embedding by its file name.
- Reading: a file with `clip_l` and `t5xxl` (or OneTrainer's `clip_l` and `t5`) reads as
  `Embedding(rows=<clip_l rows>, more={"text_encoder_2": <T5 rows>})`; with both T5 keys they
  must agree. diffusers' pair (learned_embeds + learned_embeds_2, formats/sdxl.py) holds the same
  rows for `FluxPipeline.load_textual_inversion`, one call per encoder.
"""

import numpy as np

from .. import files
from ..errors import UserError
from .base import TEXT_ENCODER, TEXT_ENCODER_2, Embedding, Layout, describe, file_content, keys, register, rows_read
from .base import rows_to_write

CLIP_L, T5XXL, T5 = "clip_l", "t5xxl", "t5"  # ComfyUI's keys, and OneTrainer's for T5


def is_layout(data):
    """Whether a loaded dict is meant as a FLUX.1 file (it has T5 rows under either key)."""
    return T5XXL in data or T5 in data


def read(path, data):
    """(token, {text encoder: float32 rows}, step) of a FLUX.1 dict from `path`.

    Raises UserError naming `path`: no clip_l, other keys, an entry that is not a [N, D] float
    tensor, NaN / Inf values, the two T5 copies differing, or different numbers of vectors.
    """
    extra = [k for k in data if k not in (CLIP_L, T5XXL, T5)]
    if extra:
        raise UserError(f"{path}: a FLUX.1 embedding holds clip_l and t5xxl (or t5) only, this file also "
                        f"{keys(extra)}; save only those entries (found {describe(data)})")
    if CLIP_L not in data:
        raise UserError(f"{path}: a FLUX.1 embedding holds rows for both text encoders (clip_l and t5xxl), this file "
                        "only T5's; export it again with both from the tool that trained it")
    for key in data:
        if not isinstance(data[key], np.ndarray):
            raise UserError(f"{path}: entry {key!r} is a {type(data[key]).__name__}, not a tensor")
    t5_rows = {key: rows_read(f"{path} ({key})", data[key]) for key in (T5XXL, T5) if key in data}
    if len(t5_rows) == 2 and not np.array_equal(t5_rows[T5XXL], t5_rows[T5]):
        raise UserError(f"{path}: its t5xxl and t5 entries (the same rows, for ComfyUI and for OneTrainer) differ; "
                        "export the embedding again")
    parts = {TEXT_ENCODER: rows_read(f"{path} ({CLIP_L})", data[CLIP_L]), TEXT_ENCODER_2: next(iter(t5_rows.values()))}
    n, n_2 = parts[TEXT_ENCODER].shape[0], parts[TEXT_ENCODER_2].shape[0]
    if n != n_2:
        raise UserError(f"{path}: clip_l has {n} vectors but the T5 rows {n_2}; a FLUX.1 embedding has the same "
                        "number for both text encoders: export it again")
    return None, parts, None


def encode(embedding, name, path):
    """safetensors or torch bytes of `{"clip_l", "t5xxl", "t5"}` (the T5 rows under both keys), float32."""
    t5_rows = embedding.more[TEXT_ENCODER_2]
    return file_content({CLIP_L: embedding.rows, T5XXL: t5_rows, T5: t5_rows}, path)


LAYOUT = register(Layout(
    "flux", '{"clip_l": [N, 768], "t5xxl": [N, 4096], "t5": the same} (FLUX.1: ComfyUI reads clip_l and t5xxl, '
    "OneTrainer clip_l and t5)",
    extensions=(".safetensors", ".pt"), encode=encode, token_from=None, text_encoders=2,
))


def save(path, rows, rows_2):
    """Write `{"clip_l": rows, "t5xxl": rows_2, "t5": rows_2}` (float32 [N, D1], [N, D2]) to `path`,
    atomically; safetensors or torch.save by its extension. Returns `path`.

    Raises UserError for rows of another shape, NaN / Inf values, or different numbers of vectors;
    `files.WriteFailed` when the disk refuses.
    """
    first, second = rows_to_write(rows), rows_to_write(rows_2)
    if first.shape[0] != second.shape[0]:
        raise UserError(f"{path}: CLIP-L has {first.shape[0]} vectors but T5 {second.shape[0]}; a FLUX.1 embedding "
                        "has the same number for both text encoders")
    emb = Embedding(None, first, LAYOUT.name, more={TEXT_ENCODER_2: second})
    return files.atomic_write(path, encode(emb, None, path))
