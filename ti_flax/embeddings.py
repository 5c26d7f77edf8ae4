"""Reading a textual-inversion embedding from any file layout Stable Diffusion tools write.

`read_embedding` takes a file or a folder and returns an `Embedding`: the token (when the
file names one), the learned rows as float32 [num_vectors, width], the layout it was read
from and the training step when known. Layouts (see shared/FORMATS.md):

| source | layout | token from |
| --- | --- | --- |
| `.safetensors`, `.bin`, `.pt` | diffusers `{token: [N, D]}` | the key |
| `.pt`, `.bin`, `.safetensors` | A1111 `{"string_to_param": {"*": [N, D]}, "name", "step", ...}` | `name` |
| `.safetensors`, `.pt` | kohya / ComfyUI `{"emb_params": [N, D]}` | (none) |
| `.npy` | diffusers' Flax script: pickled `{token: row}` (needs allow_pickle) | the key |
| folder | ours / checkpoint-N / diffusers output: `learned_embeds.safetensors` or `.bin` | the key |
| folder | a saved pipeline: rows of `token, token_1, ...` from its text encoder | `token=` |

Only numpy and safetensors are needed, except for torch files (torch) and pipeline folders
(the tokenizer, through ti_flax.models).
"""

import dataclasses
import os
import re

import numpy as np

from . import files
from .errors import UserError

DIFFUSERS_FILE = "learned_embeds.safetensors"
DIFFUSERS_BIN = "learned_embeds.bin"
FLAX_NPY = "learned_embeds.npy"
KOHYA_KEY = "emb_params"
TORCH_EXTENSIONS = (".pt", ".bin", ".pth")
# Our A1111-layout safetensors marks itself in the metadata (safetensors holds no nested dicts).
A1111_LAYOUT = "a1111"


@dataclasses.dataclass(frozen=True, eq=False)
class Embedding:
    """A learned embedding read from a file.

    Attributes:
        token: the token the file names (diffusers key, A1111 `name`), the `token=` passed to
            `read_embedding`, or None when neither says (kohya files, bare tensors).
        rows: float32 [num_vectors, width], finite.
        format: the layout it was read from: "diffusers", "a1111", "kohya", "flax-npy",
            "pipeline", "npy" (a bare numeric array) or "tensor" (a bare torch tensor).
        step: training step, when the file or folder name says.
        path: the file (or pipeline folder) the rows came from.
    """

    token: str | None
    rows: np.ndarray
    format: str
    step: int | None = None
    path: str = ""

    @property
    def num_vectors(self):
        return self.rows.shape[0]

    @property
    def width(self):
        return self.rows.shape[1]


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


# --------------------------------------------------------------------------------------------
# Files


def _read_file(path, allow_pickle):
    ext = os.path.splitext(path)[1].lower()
    step = _step_from_name(path)
    if ext == ".safetensors":
        data, metadata = _load_safetensors(path)
        token, rows, fmt, file_step = _layout(path, data, metadata)
    elif ext in TORCH_EXTENSIONS:
        token, rows, fmt, file_step = _layout(path, _load_torch(path), None)
    elif ext == ".npy":
        token, rows, fmt, file_step = _read_npy(path, allow_pickle)
    else:
        raise UserError(f"{path}: unknown embedding file type {ext or '(no extension)'}; expected .safetensors, .pt, .bin or .npy")
    return Embedding(token, _as_rows(path, rows), fmt, file_step if file_step is not None else step, path)


def _step_from_name(path):
    # checkpoint-N/ (diffusers and our checkpoints) and learned_embeds-steps-N.safetensors.
    match = re.search(r"(?:checkpoint-|-steps-)(\d+)(?:\.\w+)?$", os.path.normpath(path))
    if match is None:
        match = re.search(r"checkpoint-(\d+)$", os.path.dirname(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def _load_safetensors(path):
    # bfloat16 files fail here too: numpy has no such dtype.
    return files.read_safetensors(path, metadata=True, advice="export or download it again")


def _load_torch(path):
    # weights_only: tensors and plain containers only, so the file cannot run code.
    return files.read_torch(path, advice="export or download it again")


def _read_npy(path, allow_pickle):
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise UserError(f"{path}: not a readable .npy file ({_first_line(err)})") from None
        if not allow_pickle:
            raise UserError(
                f"{path}: a pickled Python object (as diffusers' Flax script writes it); unpickling can run "
                "code: pass --allow-pickle (allow_pickle=True) only for files you trust"
            ) from None
        array = np.load(path, allow_pickle=True)
    except Exception as err:
        raise UserError(f"{path}: not a readable .npy file ({_first_line(err)})") from None
    if array.dtype != object:
        return None, array, "npy", None
    data = array.item() if array.shape == () else None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the pickled object is a {type(data).__name__}, not a {{token: row}} dict")
    token, rows, _, step = _layout(path, {k: np.asarray(v) for k, v in data.items()}, None)
    return token, rows, "flax-npy", step


def _layout(path, data, metadata):
    """(token, rows, format, step) of a loaded file: diffusers, A1111, kohya or a bare tensor."""
    if isinstance(data, np.ndarray):
        return None, data, "tensor", None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: no embedding layout recognised (found {_describe(data)})")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"{path}: A1111 embedding must hold exactly one tensor in string_to_param, found {_describe(params)}")
        name = data.get("name")
        step = data.get("step")
        return (str(name) if name is not None else None), next(iter(params.values())), "a1111", _int_or_none(step)
    if "clip_l" in data or "clip_g" in data:
        raise UserError(f"{path}: an SDXL embedding (clip_l / clip_g); ti_flax reads SD 1.x / 2.x embeddings with one tensor")
    if not any(isinstance(v, np.ndarray) for v in data.values()):
        raise UserError(f"{path}: no embedding layout recognised (no tensor among {_describe(data)})")
    if len(data) != 1:
        raise UserError(
            f"{path}: {len(data)} entries ({_keys(data)}) where one embedding tensor is expected; "
            "an embedding file holds {token: rows}, {'emb_params': rows} or an A1111 string_to_param dict"
        )
    (key, rows), = data.items()
    if not isinstance(rows, np.ndarray):
        raise UserError(f"{path}: entry {key!r} is a {type(rows).__name__}, not a tensor; no embedding layout recognised")
    if key == KOHYA_KEY:
        return None, rows, "kohya", None
    metadata = metadata or {}
    if metadata.get("layout") == A1111_LAYOUT:
        return metadata.get("name", key), rows, "a1111", _int_or_none(metadata.get("step"))
    return key, rows, "diffusers", None


def _as_rows(path, rows):
    rows = np.asarray(rows)
    if not np.issubdtype(rows.dtype, np.floating):
        raise UserError(f"{path}: embedding has dtype {rows.dtype}; expected floating-point values")
    if rows.ndim == 1:
        rows = rows.reshape(1, -1)  # one vector saved as [D]: diffusers and A1111 read it as [1, D]
    if rows.ndim != 2 or rows.size == 0:
        raise UserError(f"{path}: embedding has shape {list(rows.shape)}; expected [num_vectors, width] or [width]")
    bad = int(np.size(rows) - np.count_nonzero(np.isfinite(rows)))
    if bad:
        raise UserError(f"{path}: embedding holds {bad} NaN or Inf values; refusing to use it")
    return rows.astype(np.float32, copy=False)


def _int_or_none(value):
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _describe(obj):
    if isinstance(obj, dict):
        return f"{len(obj)} entries: {_keys(obj)}" if obj else "an empty dict"
    return f"a {type(obj).__name__}"


def _keys(data, limit=5):
    keys = [repr(k) for k in list(data)[:limit]]
    return ", ".join(keys) + (", ..." if len(data) > limit else "")


_first_line = files.first_line


# --------------------------------------------------------------------------------------------
# Folders


def _read_folder(folder, token, allow_pickle):
    for name in (DIFFUSERS_FILE, DIFFUSERS_BIN):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return _read_file(path, allow_pickle)
    is_pipeline = os.path.isdir(os.path.join(folder, "text_encoder")) and os.path.isdir(os.path.join(folder, "tokenizer"))
    if is_pipeline and token is not None:
        return _read_pipeline(folder, token)
    npy = os.path.join(folder, FLAX_NPY)
    if os.path.isfile(npy):
        if is_pipeline and not allow_pickle:
            # diffusers' Flax script saves both; the pipeline's rows need no unpickling.
            raise UserError(
                f"{folder}: output of diffusers' Flax script; pass --token TOKEN to read the rows from its "
                f"saved pipeline, or --allow-pickle to read {FLAX_NPY} (unpickling can run code: only for files you trust)"
            )
        return _read_file(npy, allow_pickle)
    if is_pipeline:
        learned = _learned_tokens(_pipeline_tokenizer(folder))
        raise UserError(
            f"{folder}: a pipeline folder; pass --token to choose which learned token to read "
            f"(added tokens there: {files.short_list(learned, 5) or 'none'})"
        )
    raise UserError(
        f"{folder}: no embedding found (expected {DIFFUSERS_FILE}, {DIFFUSERS_BIN}, {FLAX_NPY}, "
        "or a pipeline folder with text_encoder/ and tokenizer/)"
    )


def _pipeline_tokenizer(folder):
    from .models import load_tokenizer

    return load_tokenizer(os.path.join(folder, "tokenizer"))


def _added_ids(tokenizer):
    # Tokens added after the base vocabulary (CLIP's special tokens are inside it).
    return {t: i for t, i in tokenizer.get_added_vocab().items() if i >= tokenizer.vocab_size}


def _learned_tokens(tokenizer):
    added = _added_ids(tokenizer)
    return sorted(t for t in added if not (re.fullmatch(r"(.+)_\d+", t) and re.sub(r"_\d+$", "", t) in added))


def _read_pipeline(folder, token):
    """Rows of `token, token_1, ...` from a saved pipeline's text encoder."""
    tokenizer = _pipeline_tokenizer(folder)
    added = _added_ids(tokenizer)
    if token not in added:
        raise UserError(
            f"{folder}: {token!r} is not a token added to this pipeline's tokenizer "
            f"(added tokens: {files.short_list(_learned_tokens(tokenizer), 5) or 'none'})"
        )
    tokens = [token]
    while f"{token}_{len(tokens)}" in added:
        tokens.append(f"{token}_{len(tokens)}")
    ids = [added[t] for t in tokens]
    table = _pipeline_token_table(os.path.join(folder, "text_encoder"))
    if max(ids) >= table.shape[0]:
        raise UserError(f"{folder}: tokenizer has id {max(ids)} but the text encoder has only {table.shape[0]} rows")
    return Embedding(token, _as_rows(folder, table[ids]), "pipeline", None, folder)


def _pipeline_token_table(folder):
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
