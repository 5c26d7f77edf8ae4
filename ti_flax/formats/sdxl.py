"""SDXL embeddings: rows for each of SDXL's two text encoders, in one of two layouts.

SDXL conditions on two text encoders, CLIP ViT-L (`text_encoder`, 768 wide) and OpenCLIP bigG
(`text_encoder_2`, 1280 wide); an SDXL embedding holds N rows for each. Widths are whatever the
file holds (tiny test models are narrower): clip_l is always the first text encoder, clip_g the
second. Read, either becomes `Embedding(rows=<clip_l rows>, more={"text_encoder_2": <clip_g rows>})`.

- `sdxl`: one file `{"clip_l": [N, D1], "clip_g": [N, D2]}` (`.safetensors`, or `torch.save`d
  to a `.pt`), what kohya sd-scripts writes and AUTOMATIC1111 / Forge, ComfyUI and InvokeAI
  read. It names no token: A1111 and ComfyUI call the embedding by its file name.
- `diffusers-sdxl`: two files, as diffusers' textual_inversion_sdxl.py writes them:
  `learned_embeds.safetensors` `{token: [N, D1]}` for the first text encoder and
  `learned_embeds_2.safetensors` `{token: [N, D2]}` for the second (diffusers loads each into
  its own text encoder and tokenizer). `learned_embeds-steps-S` pairs with
  `learned_embeds_2-steps-S` the same way.

Reading the pair: a folder holding both files, or either file with its partner beside it, reads
as one SDXL embedding. A `learned_embeds.safetensors` without a `learned_embeds_2` beside it is an
SD 1.x / 2.x diffusers file, read as before.
"""

import os
import re

import numpy as np

from .. import files
from ..errors import UserError
from . import diffusers
from .base import (
    TEXT_ENCODER, TEXT_ENCODER_2, Embedding, Layout, describe, file_content, keys, register, rows_read, rows_to_write,
)

CLIP_L, CLIP_G = "clip_l", "clip_g"  # the single file's keys: first and second text encoder
PAIR_FILE_2 = "learned_embeds_2.safetensors"
# learned_embeds[_2][-steps-S].safetensors / .bin: group 1 is "_2" in the second file.
_PAIR_NAME = re.compile(r"learned_embeds(_2)?((?:-steps-\d+)?\.(?:safetensors|bin))")


# --------------------------------------------------------------------------------------------
# One file: {"clip_l", "clip_g"}


def is_layout(data):
    """Whether a loaded dict is meant as an SDXL file (it has clip_l or clip_g)."""
    return CLIP_L in data or CLIP_G in data


def read(path, data):
    """(token, {text encoder: float32 rows}, step) of a `{"clip_l", "clip_g"}` dict from `path`.

    Raises:
        UserError naming `path`: one of the two keys missing, other keys beside them, an entry
            that is not a floating-point [N, D] tensor, NaN / Inf values, or different numbers
            of vectors for the two text encoders.
    """
    missing = [k for k in (CLIP_L, CLIP_G) if k not in data]
    if missing:
        (has,) = [k for k in (CLIP_L, CLIP_G) if k in data]
        raise UserError(
            f"{path}: an SDXL embedding holds rows for both text encoders (clip_l and clip_g), this file only {has}; "
            f"export it again with both from the tool that trained it"
        )
    extra = [k for k in data if k not in (CLIP_L, CLIP_G)]
    if extra:
        raise UserError(
            f"{path}: an SDXL embedding holds clip_l and clip_g only, this file also {keys(extra)}; "
            f"save only those two entries (found {describe(data)})"
        )
    parts = {}
    for part, key in ((TEXT_ENCODER, CLIP_L), (TEXT_ENCODER_2, CLIP_G)):
        if not isinstance(data[key], np.ndarray):
            raise UserError(f"{path}: entry {key!r} is a {type(data[key]).__name__}, not a tensor")
        parts[part] = rows_read(f"{path} ({key})", data[key])
    _check_counts(path, parts, CLIP_L, CLIP_G)
    return None, parts, None


def encode(embedding, name, path):
    """safetensors or torch bytes of `{"clip_l": rows, "clip_g": more["text_encoder_2"]}`, float32."""
    return file_content({CLIP_L: embedding.rows, CLIP_G: embedding.more[TEXT_ENCODER_2]}, path)


LAYOUT = register(Layout(
    "sdxl", '{"clip_l": [N, D1], "clip_g": [N, D2]} (kohya sd-scripts; A1111 / Forge, ComfyUI, InvokeAI read it)',
    extensions=(".safetensors", ".pt"), encode=encode, token_from=None, text_encoders=2,
))


def save_sdxl(path, rows, rows_2):
    """Write `{"clip_l": rows, "clip_g": rows_2}` (float32 [N, D1], [N, D2]) to `path`, atomically;
    safetensors or torch.save by its extension. Returns `path`.

    Raises UserError for rows of another shape, NaN / Inf values, or different numbers of
    vectors; `files.WriteFailed` when the disk refuses.
    """
    emb = _embedding_to_write(None, rows, rows_2, path)
    return files.atomic_write(path, encode(emb, None, path))


# --------------------------------------------------------------------------------------------
# diffusers' pair: learned_embeds.safetensors + learned_embeds_2.safetensors


def pair_paths(path):
    """(first file, second file) of the diffusers pair that `path` names either of, or None when
    its name is not `learned_embeds[_2][-steps-S].safetensors` (or `.bin`)."""
    folder, base = os.path.split(path)
    match = _PAIR_NAME.fullmatch(base)
    if match is None:
        return None
    rest = match.group(2)
    return os.path.join(folder, "learned_embeds" + rest), os.path.join(folder, "learned_embeds_2" + rest)


def join_pair(first, second):
    """The SDXL `Embedding` of the pair's two files, each read as a one-encoder `Embedding`.

    Raises:
        UserError naming the files: one is not in diffusers' `{token: rows}` layout, the
            tokens differ, or the numbers of vectors differ.
    """
    for emb in (first, second):
        if emb.format != diffusers.LAYOUT.name:
            raise UserError(
                f"{emb.path}: holds a {emb.format} embedding, but beside {_other(emb, first, second)} it is half of "
                f"diffusers' SDXL pair and must hold {{token: rows}}; move one of the two files away"
            )
    if first.token != second.token:
        raise UserError(
            f"{first.path}: token {first.token!r} but {os.path.basename(second.path)} beside it has {second.token!r}; "
            "diffusers' SDXL pair names one token in both files: move the file that does not belong away"
        )
    parts = {TEXT_ENCODER: first.rows, TEXT_ENCODER_2: second.rows}
    _check_counts(first.path, parts, os.path.basename(first.path), os.path.basename(second.path))
    return Embedding(first.token, first.rows, PAIR.name, first.step, first.path, more={TEXT_ENCODER_2: second.rows})


def split(path, embedding):
    """[(first file, its one-encoder embedding), (second file, ...)] for writing the pair at `path`."""
    paths = pair_paths(path)
    if paths is None or paths[0] != path:
        ext = os.path.splitext(path)[1] or ".safetensors"
        raise UserError(
            f"{path}: diffusers' SDXL pair is two files, learned_embeds{ext} and learned_embeds_2{ext}; "
            "give a folder to write them into (or a learned_embeds[-steps-N] file name)"
        )
    first = Embedding(embedding.token, embedding.rows, diffusers.LAYOUT.name, embedding.step)
    second = Embedding(embedding.token, embedding.more[TEXT_ENCODER_2], diffusers.LAYOUT.name, embedding.step)
    return [(paths[0], first), (paths[1], second)]


PAIR = register(Layout(
    "diffusers-sdxl", "two files {token: [N, D1]} + {token: [N, D2]}: learned_embeds.safetensors and "
    "learned_embeds_2.safetensors (diffusers' textual_inversion_sdxl.py)",
    extensions=(".safetensors", ".bin"), encode=diffusers.encode, token_from="token", text_encoders=2,
    folder_file=diffusers.DIFFUSERS_FILE, split=split,
))


def save_diffusers_sdxl(path, token, rows, rows_2):
    """Write diffusers' SDXL pair: two files, `path` (`learned_embeds[-steps-S].safetensors`)
    with `{token: rows}` for the first text encoder and its partner
    (`learned_embeds_2[-steps-S].safetensors`) with `{token: rows_2}` for the second.

    Each file is written atomically, the second first: a crash between the two leaves the
    second alone, never a new first file that would read as an SD 1.x / 2.x embedding. Returns
    both paths.

    Raises UserError for a path with another name, rows of another shape, NaN / Inf values or
    different numbers of vectors; `files.WriteFailed` when the disk refuses.
    """
    emb = _embedding_to_write(token, rows, rows_2, path)
    pieces = split(os.fspath(path), emb)
    for p, piece in reversed(pieces):
        files.atomic_write(p, diffusers.encode(piece, None, p))
    return tuple(p for p, _ in pieces)


# --------------------------------------------------------------------------------------------


def _embedding_to_write(token, rows, rows_2, path):
    parts = {TEXT_ENCODER: rows_to_write(rows), TEXT_ENCODER_2: rows_to_write(rows_2)}
    _check_counts(path, parts, "the first text encoder", "the second")
    return Embedding(token, parts[TEXT_ENCODER], LAYOUT.name, more={TEXT_ENCODER_2: parts[TEXT_ENCODER_2]})


def _check_counts(path, parts, first, second):
    n, n_2 = parts[TEXT_ENCODER].shape[0], parts[TEXT_ENCODER_2].shape[0]
    if n != n_2:
        raise UserError(
            f"{path}: {first} has {n} vectors but {second} has {n_2}; an SDXL embedding has the same number "
            "for both text encoders: the two do not belong together, export them again"
        )


def _other(emb, first, second):
    return os.path.basename((second if emb is first else first).path)
