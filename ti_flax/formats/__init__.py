"""Every embedding file layout ti_flax reads or writes, each with its reader beside its writer.

| layout | module | written as | token from |
| --- | --- | --- | --- |
| diffusers `{token: [N, D]}` | `diffusers.py` | `.safetensors`, `.bin` | the key |
| A1111 `{"string_to_param": {"*": [N, D]}, "name", "step", ...}` | `a1111.py` | `.pt`, `.safetensors` | `name` |
| kohya / ComfyUI `{"emb_params": [N, D]}` | `kohya.py` | `.safetensors`, `.pt` | (none) |
| diffusers' Flax script: pickled `{token: row}` | `npy.py` | (read only) `.npy` | the key |
| a bare numeric array | `npy.py` | (read only) `.npy` | (none) |
| a saved pipeline: rows of `token, token_1, ...` | `pipeline.py` | (read only) folder | `token=` |
| a bare torch tensor | here | (read only) `.pt`, `.bin` | (none) |

Each layout registers a `Layout` by name (`get`, `names`, `ALIASES`): its file types and its
writer. `read_embedding` takes any file or folder: the container is chosen by the extension
(safetensors, torch, npy), the layout by what the file holds. `write` puts an embedding in a
layout, and `check_written` reads a written file back and compares (the exporter does both).

Only numpy and safetensors are needed, except for torch files (torch) and pipeline folders
(the tokenizer, through ti_flax.models).
"""

import dataclasses
import os
import re

import numpy as np

from .. import files
from ..errors import UserError
# Each module registers its layout on import; this order is the registry's (and the exporter's).
from . import diffusers, a1111, kohya, npy, pipeline  # noqa: I001
from .base import ALIASES, Embedding, Layout, describe, get, keys, names, register, rows_read
from .diffusers import DIFFUSERS_BIN, DIFFUSERS_FILE, load_diffusers, save_diffusers, save_diffusers_bin
from .npy import FLAX_NPY

__all__ = [
    "ALIASES", "DIFFUSERS_BIN", "DIFFUSERS_FILE", "Embedding", "FLAX_NPY", "Layout", "check_embedding_fits",
    "check_written", "get", "load_diffusers", "names", "read_embedding", "register", "save_diffusers",
    "save_diffusers_bin", "write",
]

TORCH_EXTENSIONS = (".pt", ".bin", ".pth")
TENSOR = register(Layout("tensor", "a bare torch tensor [N, D] or [D] in a .pt or .bin"))


def read_embedding(path, token=None, allow_pickle=False):
    """Read an embedding file or folder in any supported layout.

    Args:
        path: a .safetensors / .pt / .bin / .npy file, an output or checkpoint-N folder
            (holding learned_embeds.safetensors), or a saved pipeline folder.
        token: for a pipeline folder, the learned token to read (its rows are those of
            `token, token_1, ...`); for a file, replaces the token the file names.
        allow_pickle: permit unpickling a `.npy` that holds a Python object (the diffusers Flax
            script's `learned_embeds.npy`). Unpickling can run code: only for trusted files.

    Returns:
        An `Embedding`.

    Raises:
        UserError: missing file, unknown extension, unrecognised or ambiguous layout, a shape
            other than [N, D] or [D], non-finite values, or a pickle without allow_pickle.

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


def check_embedding_fits(rows, num_vectors, width, what="--initial_embeddings"):
    """Check that embedding rows fit a run: `num_vectors` rows of the text encoder's width.

    Args:
        rows: an `Embedding` or an array [N, D].
        num_vectors: the number of vectors the run trains, or None to accept any.
        width: the text encoder's hidden size.
        what: how to name the embedding in the error (a flag or a path).

    Returns:
        The rows as float32 [N, D].

    Raises:
        UserError: when the width or the number of vectors differs.
    """
    rows = rows.rows if isinstance(rows, Embedding) else np.asarray(rows, dtype=np.float32)
    n, d = rows.shape
    if d != width:
        raise UserError(
            f"{what}: embedding width is {d} but the text encoder's width is {width}; "
            "the embedding was made for a different model"
        )
    if num_vectors is not None and n != num_vectors:
        raise UserError(f"{what}: embedding has {n} vectors but --num_vectors is {num_vectors}; pass --num_vectors {n}")
    return rows


def write(path, layout, embedding, name=None):
    """Write `embedding` to `path` in the registered `layout` (a name or an alias).

    Args:
        path: the file; its extension picks safetensors or torch.save. Not atomic: write to a
            temporary name and rename (or use `files.atomic_write` with the layout's `encode`).
        layout: e.g. "diffusers", "a1111", "kohya" or "comfyui".
        embedding: an `Embedding`; its token is the diffusers key.
        name: the A1111 name.
    """
    get(layout).write(path, embedding, name)


def check_written(written, path, rows, token):
    """Read the file `written` back; UserError naming `path` unless it holds `rows` and `token`."""
    back = read_embedding(written)
    if back.rows.shape != rows.shape or not np.array_equal(back.rows, rows) or back.token != token:
        raise UserError(f"{path}: reading the written file back gave different rows or token; nothing was written")


# --------------------------------------------------------------------------------------------
# Files


def _read_file(path, allow_pickle):
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
    return Embedding(token, rows_read(path, rows), fmt, file_step if file_step is not None else step, path)


def _step_from_name(path):
    # checkpoint-N/ (diffusers and our checkpoints) and learned_embeds-steps-N.safetensors.
    match = re.search(r"(?:checkpoint-|-steps-)(\d+)(?:\.\w+)?$", os.path.normpath(path))
    if match is None:
        match = re.search(r"checkpoint-(\d+)$", os.path.dirname(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def _recognise(path, data, metadata):
    """(token, rows, step, layout name) of what a file held: a dict in some layout, or a tensor.

    The order of the checks decides between layouts that could claim the same file: A1111's
    nested dict first, then the one-tensor layouts (kohya's key, our tagged A1111 safetensors,
    and diffusers for any other key).
    """
    if isinstance(data, np.ndarray):
        return None, data, None, TENSOR.name
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: no embedding layout recognised (found {describe(data)})")
    if a1111.is_pickled_layout(data):
        return (*a1111.read_pickled(path, data), a1111.LAYOUT.name)
    if "clip_l" in data or "clip_g" in data:
        raise UserError(f"{path}: an SDXL embedding (clip_l / clip_g); ti_flax reads SD 1.x / 2.x embeddings with one tensor")
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
            f"(added tokens there: {files.short_list(pipeline.learned_tokens(folder), 5) or 'none'})"
        )
    raise UserError(
        f"{folder}: no embedding found (expected {DIFFUSERS_FILE}, {DIFFUSERS_BIN}, {FLAX_NPY}, "
        "or a pipeline folder with text_encoder/ and tokenizer/)"
    )
