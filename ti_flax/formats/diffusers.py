"""diffusers' layout: `{token: float32 [N, D]}`.

Written as `learned_embeds.safetensors` (metadata format=pt), what
`StableDiffusionPipeline.load_textual_inversion` reads (N > 1 loads as tok, tok_1, ...), or
with `--no_safe_serialization` the same dict `torch.save`d to `learned_embeds.bin`, as diffusers'
PyTorch script writes it. Read back from any file holding one tensor under a key that no other
layout claims: the key is the token.
"""

import numpy as np

from .. import files
from ..errors import UserError
from .base import Layout, file_content, register, require_torch, rows_to_write, safetensors_content, torch_content

DIFFUSERS_FILE = "learned_embeds.safetensors"
DIFFUSERS_BIN = "learned_embeds.bin"


def read(key, rows):
    """(token, rows, step) of a one-tensor file in this layout: the key is the token."""
    return key, rows, None


def encode(embedding, name, path):
    """safetensors or torch bytes of `{embedding.token: rows}`, by `path`'s extension."""
    return file_content({embedding.token: embedding.rows}, path)


LAYOUT = register(Layout(
    "diffusers", "{token: [N, D]} (diffusers' load_textual_inversion)",
    extensions=(".safetensors", ".bin"), encode=encode, token_from="token", folder_file=DIFFUSERS_FILE,
))


def save_diffusers(path, token, rows):
    """Write `{token: float32 rows [N, D]}` to a safetensors `path`, atomically; returns `path`.

    Raises UserError for rows of another shape or with NaN / Inf values, `files.WriteFailed`
    when the disk refuses.
    """
    rows = rows_to_write(rows)
    return files.atomic_write(path, safetensors_content({token: rows}))


def save_diffusers_bin(path, token, rows):
    """The same as `save_diffusers`, `torch.save`d to a `.bin` `path` (needs torch)."""
    require_torch("writing learned_embeds.bin", "or drop --no_safe_serialization")
    rows = rows_to_write(rows)
    return files.atomic_write(path, torch_content({token: rows}, path))


def load_diffusers(path):
    """(token, float32 rows [N, D]) from a diffusers-layout safetensors file."""
    tensors = files.read_safetensors(path)
    if len(tensors) != 1:
        raise UserError(f"{path}: expected one token in a diffusers embedding file, found {sorted(tensors)}")
    (token, rows), = tensors.items()
    rows = np.asarray(rows, dtype=np.float32)
    return token, rows.reshape(1, -1) if rows.ndim == 1 else rows
