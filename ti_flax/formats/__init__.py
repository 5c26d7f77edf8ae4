"""Every embedding file layout ti_flax reads or writes, each with its reader beside its writer.

| layout | module | written as | token from |
| --- | --- | --- | --- |
| diffusers `{token: [N, D]}` | `diffusers.py` | `.safetensors`, `.bin` | the key |
| A1111 `{"string_to_param": {"*": [N, D]}, "name", "step", ...}` | `a1111.py` | `.pt`, `.safetensors` | `name` |
| kohya / ComfyUI `{"emb_params": [N, D]}` | `kohya.py` | `.safetensors`, `.pt` | (none) |
| SDXL `{"clip_l": [N, D1], "clip_g": [N, D2]}` (kohya, A1111, ComfyUI) | `sdxl.py` | `.safetensors`, `.pt` | (none) |
| diffusers' SDXL pair `learned_embeds.safetensors` + `learned_embeds_2.safetensors` | `sdxl.py` | two files | the key |
| FLUX.1 `{"clip_l": [N, 768], "t5xxl": [N, 4096], "t5": the same}` (ComfyUI, OneTrainer) | `flux.py` | `.safetensors`, `.pt` | (none) |
| diffusers' Flax script: pickled `{token: row}` | `npy.py` | (read only) `.npy` | the key |
| a bare numeric array | `npy.py` | (read only) `.npy` | (none) |
| a saved pipeline: rows of `token, token_1, ...` | `pipeline.py` | a whole folder, by a family's `save_pipeline` (not `write`) | `token=` |
| a bare torch tensor | here | (read only) `.pt`, `.bin` | (none) |

Each layout registers a `Layout` by name (`get`, `names`, `ALIASES`): its file types and its
writer. `read_embedding` takes any file or folder: the container is chosen by the extension
(safetensors, torch, npy), the layout by what the file holds. `write` puts an embedding in a
layout, and `check_written` reads a written file back and compares (the exporter does both).

SDXL embeddings hold rows for two text encoders (`Embedding.more["text_encoder_2"]`); only the
SDXL layouts take them, and the SD 1.x / 2.x layouts refuse them (`check_fits`).

Only numpy and safetensors are needed, except for torch files (torch) and pipeline folders
(the tokenizer and the model, through ti_flax.models).
"""

import dataclasses
import os
import re

import numpy as np

from .. import files
from ..errors import UserError, short_list
# Each module registers its layout on import; this order is the registry's (and the exporter's).
from . import diffusers, a1111, kohya, sdxl, flux, npy, pipeline  # noqa: I001
from .base import (
    ALIASES, TEXT_ENCODER, TEXT_ENCODER_2, Embedding, Layout, check_fits, describe, get, keys, names, register, rows_read,
)
from .diffusers import DIFFUSERS_BIN, DIFFUSERS_FILE, load_diffusers, save_diffusers, save_diffusers_bin
from .npy import FLAX_NPY
from .sdxl import PAIR_FILE_2, save_diffusers_sdxl, save_sdxl

__all__ = [
    "ALIASES", "DIFFUSERS_BIN", "DIFFUSERS_FILE", "Embedding", "FLAX_NPY", "Layout", "PAIR_FILE_2", "TEXT_ENCODER",
    "TEXT_ENCODER_2", "check_embedding_fits", "check_fits", "check_written", "get", "load_diffusers", "names",
    "read_embedding", "register", "save_diffusers", "save_diffusers_bin", "save_diffusers_sdxl",
    "save_sdxl", "sdxl_file_name", "write",
]

TORCH_EXTENSIONS = (".pt", ".bin", ".pth")
TENSOR = register(Layout("tensor", "a bare torch tensor [N, D] or [D] in a .pt or .bin"))


def read_embedding(path, token=None, allow_pickle=False):
    """Read an embedding file or folder in any supported layout.

    Args:
        path: a .safetensors / .pt / .bin / .npy file, an output or checkpoint-N folder
            (holding learned_embeds.safetensors), or a saved pipeline folder. A folder holding
            diffusers' SDXL pair (learned_embeds.safetensors and learned_embeds_2.safetensors),
            or either file of the pair with the other beside it, reads as one SDXL embedding.
        token: for a pipeline folder, the learned token to read (its rows are those of
            `token, token_1, ...`); for a file, replaces the token the file names.
        allow_pickle: permit unpickling a `.npy` that holds a Python object (the diffusers Flax
            script's `learned_embeds.npy`). Unpickling can run code: only for trusted files.

    Returns:
        An `Embedding`; for an SDXL embedding, `rows` holds the first text encoder's (clip_l)
        rows and `more["text_encoder_2"]` the second's (clip_g).

    Raises:
        UserError: missing file, unknown extension, unrecognised or ambiguous layout, a shape
            other than [N, D] or [D], non-finite values, a pickle without allow_pickle, or an
            SDXL file with one text encoder's rows only or different numbers of vectors.

    Example:
        >>> from ti_flax.formats import read_embedding
        >>> emb = read_embedding("out/checkpoint-500")  # doctest: +SKIP
        >>> emb.token, emb.rows.shape, emb.format, emb.step  # doctest: +SKIP
        ('<cat-toy>', (1, 768), 'diffusers', 500)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        emb = _read_folder(path, token, allow_pickle)
    elif os.path.isfile(path):
        emb = _read_file(path, allow_pickle)
    else:
        raise UserError(f"{path}: no such embedding file or folder")
    if token is not None and emb.token != token:
        emb = dataclasses.replace(emb, token=token)
    return emb


def sdxl_file_name(token, step=None):
    """The `{clip_l, clip_g}` file a run writes for `token`: A1111 and ComfyUI call an embedding by
    its file name, so the token without <> ("<cat-toy>" -> "cat-toy.safetensors"; at an
    intermediate `step`, "cat-toy-steps-500.safetensors")."""
    name = re.sub(r"[^\w.\-]", "_", token.strip("<>")).strip(".") or "embedding"
    return name + ("" if step is None else f"-steps-{step}") + ".safetensors"


def check_embedding_fits(rows, num_vectors, width, what="--initial_embeddings"):
    """Check that embedding rows fit a run: `num_vectors` rows of each text encoder's width.

    Args:
        rows: an `Embedding` or an array [N, D].
        num_vectors: the number of vectors the run trains, or None to accept any.
        width: the text encoder's hidden size; or a tuple of each text encoder's width
            (ModelSpec.text_widths: both for SDXL).
        what: how to name the embedding in the error (a flag; the file's path is added when
            `what` does not hold it).

    Returns:
        The rows as float32 [N, D]; with a tuple `width`, a tuple of [N, D_i], one per encoder.

    Raises:
        UserError: when the number of text encoders, a width or the number of vectors differs.
    """
    emb = rows if isinstance(rows, Embedding) else Embedding(None, np.asarray(rows, dtype=np.float32), "npy")
    widths = tuple(width) if isinstance(width, (tuple, list)) else (width,)
    if emb.path and emb.path not in what:
        what = f"{what} {emb.path}"
    if len(emb.parts) != len(widths):
        if len(emb.parts) > len(widths):
            raise UserError(f"{what}: is an SDXL embedding (clip_l/clip_g); this model has one text encoder: "
                            "pass an embedding made for SD 1.x / 2.x")
        raise UserError(f"{what}: is an SD 1.x / 2.x embedding (one text encoder); this model has {len(widths)} "
                        "(SDXL): pass an SDXL embedding (clip_l/clip_g)")
    for (name, part), want in zip(emb.parts.items(), widths):
        if part.shape[1] != want:
            encoder = "the text encoder's" if len(widths) == 1 else f"{name}'s"
            raise UserError(
                f"{what}: embedding width is {part.shape[1]} but {encoder} width is {want}; "
                "the embedding was made for a different model"
            )
    n = emb.num_vectors
    if num_vectors is not None and n != num_vectors:
        raise UserError(f"{what}: embedding has {n} vectors but --num_vectors is {num_vectors}; pass --num_vectors {n}")
    parts = tuple(emb.parts.values())
    return parts if isinstance(width, (tuple, list)) else parts[0]


def write(path, layout, embedding, name=None):
    """Write `embedding` to `path` in the registered `layout` (a name or an alias).

    Args:
        path: the file; its extension picks safetensors or torch.save. For diffusers' SDXL pair
            ("diffusers-sdxl"), the first file (learned_embeds.safetensors): its partner
            learned_embeds_2.safetensors is written beside it. Not atomic: write to a temporary
            name and rename (or use `files.atomic_write` with the layout's `encode`).
        layout: e.g. "diffusers", "a1111", "kohya", "comfyui", "sdxl" or "diffusers-sdxl".
        embedding: an `Embedding`; its token is the diffusers key.
        name: the A1111 name.

    Raises:
        UserError: an SDXL embedding for a one-encoder layout, or the reverse (`check_fits`).
    """
    get(layout).write(path, embedding, name)


def check_written(written, path, expected, token):
    """Read the file `written` back; UserError naming `path` unless it holds `expected` (an
    `Embedding`, every text encoder's rows compared, or an array of rows) and `token`."""
    back = read_embedding(written)
    want = expected.parts if isinstance(expected, Embedding) else {TEXT_ENCODER: np.asarray(expected)}
    same = back.parts.keys() == want.keys() and all(
        back.parts[k].shape == want[k].shape and np.array_equal(back.parts[k], want[k]) for k in want
    )
    if not same or back.token != token:
        raise UserError(f"{path}: reading the written file back gave different rows or token; nothing was written")


# --------------------------------------------------------------------------------------------
# Files


def _read_file(path, allow_pickle):
    # Either file of diffusers' SDXL pair, with the other beside it, reads as the pair.
    pair = sdxl.pair_paths(path)
    if pair is None or not all(os.path.isfile(p) for p in pair):
        return _read_one_file(path, allow_pickle)
    return sdxl.join_pair(*(_read_one_file(p, allow_pickle) for p in pair))


def _read_one_file(path, allow_pickle):
    ext = os.path.splitext(path)[1].lower()
    step = _step_from_name(path)
    if ext == ".safetensors":
        data, metadata = files.read_safetensors(path, metadata=True, advice="export or download it again")
        token, rows, file_step, fmt = _recognise(path, data, metadata)
    elif ext in TORCH_EXTENSIONS:
        # weights_only: tensors and plain containers only, so the file cannot run code.
        token, rows, file_step, fmt = _recognise(path, files.read_torch(path, advice="export or download it again"), None)
    elif ext == ".npy":
        data = npy.load(path, allow_pickle)
        if isinstance(data, np.ndarray):
            token, rows, file_step, fmt = None, data, None, npy.BARE.name
        else:
            token, rows, file_step, _ = _recognise(path, data, None)
            fmt = npy.FLAX.name
    else:
        raise UserError(f"{path}: unknown embedding file type {ext or '(no extension)'}; expected .safetensors, .pt, .bin or .npy")
    step = file_step if file_step is not None else step
    if isinstance(rows, dict):  # one file holding several text encoders' rows (SDXL), each read already
        first, *more = rows
        return Embedding(token, rows[first], fmt, step, path, more={k: rows[k] for k in more})
    return Embedding(token, rows_read(path, rows), fmt, step, path)


def _step_from_name(path):
    # checkpoint-N/ (diffusers and our checkpoints) and learned_embeds-steps-N.safetensors.
    match = re.search(r"(?:checkpoint-|-steps-)(\d+)(?:\.\w+)?$", os.path.normpath(path))
    if match is None:
        match = re.search(r"checkpoint-(\d+)$", os.path.dirname(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def _recognise(path, data, metadata):
    """(token, rows, step, layout name) of what a file held: a dict in some layout, or a tensor.
    `rows` is an array, or {text encoder: float32 rows} for an SDXL file.

    The order of the checks decides between layouts that could claim the same file: A1111's
    nested dict first, then FLUX.1's clip_l / t5xxl, SDXL's clip_l / clip_g, then the one-tensor layouts (kohya's key, our
    tagged A1111 safetensors, and diffusers for any other key).
    """
    if isinstance(data, np.ndarray):
        return None, data, None, TENSOR.name
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: no embedding layout recognised (found {describe(data)})")
    if a1111.is_pickled_layout(data):
        return (*a1111.read_pickled(path, data), a1111.LAYOUT.name)
    if flux.is_layout(data):  # before SDXL's: it holds clip_l too
        return (*flux.read(path, data), flux.LAYOUT.name)
    if sdxl.is_layout(data):
        return (*sdxl.read(path, data), sdxl.LAYOUT.name)
    if not any(isinstance(v, np.ndarray) for v in data.values()):
        raise UserError(f"{path}: no embedding layout recognised (no tensor among {describe(data)})")
    if len(data) != 1:
        raise UserError(
            f"{path}: {len(data)} entries ({keys(data)}) where one embedding tensor is expected; "
            "an embedding file holds {token: rows}, {'emb_params': rows} or an A1111 string_to_param dict"
        )
    (key, rows), = data.items()
    if not isinstance(rows, np.ndarray):
        raise UserError(f"{path}: entry {key!r} is a {type(rows).__name__}, not a tensor; no embedding layout recognised")
    if key == kohya.KEY:
        return (*kohya.read(key, rows), kohya.LAYOUT.name)
    if a1111.is_tagged(metadata):
        return (*a1111.read_tagged(key, rows, metadata), a1111.LAYOUT.name)
    return (*diffusers.read(key, rows), diffusers.LAYOUT.name)


# --------------------------------------------------------------------------------------------
# Folders


def _read_folder(folder, token, allow_pickle):
    for name in (DIFFUSERS_FILE, DIFFUSERS_BIN):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return _read_file(path, allow_pickle)
    is_pipeline = pipeline.is_pipeline(folder)
    if is_pipeline and token is not None:
        return pipeline.read(folder, token)
    flax_npy = os.path.join(folder, FLAX_NPY)
    if os.path.isfile(flax_npy):
        if is_pipeline and not allow_pickle:
            # diffusers' Flax script saves both; the pipeline's rows need no unpickling.
            raise UserError(
                f"{folder}: output of diffusers' Flax script; pass --token TOKEN to read the rows from its "
                f"saved pipeline, or --allow-pickle to read {FLAX_NPY} (unpickling can run code: only for files you trust)"
            )
        return _read_file(flax_npy, allow_pickle)
    if is_pipeline:
        raise UserError(
            f"{folder}: a pipeline folder; pass --token to choose which learned token to read "
            f"(added tokens there: {short_list(pipeline.learned_tokens(folder), 5) or 'none'})"
        )
    raise UserError(
        f"{folder}: no embedding found (expected {DIFFUSERS_FILE}, {DIFFUSERS_BIN}, {FLAX_NPY}, "
        "or a pipeline folder with text_encoder/ and tokenizer/)"
    )
