"""What every embedding layout shares: the `Embedding` read from a file, the `Layout` registry,
and the checks of rows on their way in and out.

A layout registers itself by name when its module is imported (see `formats/__init__.py`);
`get(name)` and `names()` look them up. An embedding holds one array of rows per text encoder:
`rows` for the first, `more` for any further one (empty for SD 1.x / 2.x; SDXL's second
encoder's rows under `text_encoder_2`). A layout holds the rows of a fixed number of text
encoders (`Layout.text_encoders`), and `check_fits` refuses an embedding with another number.
"""

import dataclasses
import os
from typing import Callable, Mapping

import numpy as np

from .. import files
from ..errors import UserError

TEXT_ENCODER = "text_encoder"  # the name of `rows` among `Embedding.parts`, as in a pipeline folder
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second text encoder (OpenCLIP bigG), as in a pipeline folder


@dataclasses.dataclass(frozen=True, eq=False)
class Embedding:
    """A learned embedding read from a file.

    Attributes:
        token: the token the file names (diffusers key, A1111 `name`), the `token=` passed to
            `read_embedding`, or None when neither says (kohya files, bare tensors).
        rows: float32 [num_vectors, width], finite: the rows for the (first) text encoder.
        format: the registered layout it was read from: "diffusers", "a1111", "kohya", "sdxl",
            "diffusers-sdxl", "flax-npy", "pipeline", "npy" (a bare numeric array) or "tensor"
            (a bare torch tensor).
        step: training step, when the file or folder name says.
        path: the file (or pipeline folder) the rows came from; for diffusers' SDXL pair, its
            first file (`learned_embeds.safetensors`).
        more: rows for further text encoders, keyed by their folder name in a pipeline
            (`text_encoder_2`), with the same number of vectors as `rows`; empty for models
            with one text encoder.
    """

    token: str | None
    rows: np.ndarray
    format: str
    step: int | None = None
    path: str = ""
    more: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def parts(self):
        """{text encoder folder name: rows}, the first text encoder's `rows` first."""
        return {TEXT_ENCODER: self.rows, **self.more}

    @property
    def num_vectors(self):
        return self.rows.shape[0]

    @property
    def width(self):
        return self.rows.shape[1]

    def shape_text(self):
        """"3 x 768" (one text encoder) or "3 x 768 + 1280" (SDXL): for messages."""
        return f"{self.num_vectors} x " + " + ".join(str(rows.shape[1]) for rows in self.parts.values())


@dataclasses.dataclass(frozen=True)
class Layout:
    """One embedding file layout.

    Attributes:
        name: the registry key, also `Embedding.format` of what is read from it.
        description: one line on what the file holds.
        extensions: the file types it is written as, the default first; () when ti_flax only
            reads it.
        encode: `encode(embedding, name, path) -> bytes`, the content of a file written to
            `path` (its extension picks safetensors or torch; `name` is the A1111 name); None
            when ti_flax only reads it.
        token_from: where a reader finds the token in a written file: "token" (the embedding's
            token), "name" (the A1111 name) or None (the file does not say).
        text_encoders: how many text encoders' rows it holds: 1 (SD 1.x / 2.x) or 2 (SDXL).
        folder_file: the file name the exporter gives it in a folder, when the layout has a
            fixed one (diffusers' learned_embeds.safetensors); None for NAME + extension.
        split: for a layout written as several files, `split(path, embedding)` ->
            [(file path, the one-file `Embedding` it holds)], `path` the first; each is written
            with `encode`. None for a layout written as one file.
    """

    name: str
    description: str
    extensions: tuple = ()
    encode: Callable | None = None
    token_from: str | None = None
    text_encoders: int = 1
    folder_file: str | None = None
    split: Callable | None = None

    @property
    def writable(self):
        return self.encode is not None

    def pieces(self, path, embedding):
        """[(file path, the `Embedding` it holds)]: `[(path, embedding)]` unless the layout is
        written as several files."""
        return self.split(path, embedding) if self.split else [(path, embedding)]

    def write(self, path, embedding, name=None):
        """Write `embedding` in this layout to `path` (safetensors or torch by its extension),
        and to the other files of a layout written as several (see `pieces`).

        Not atomic: callers write to a temporary name (or use `files.atomic_write`) and rename.
        """
        check_fits(self, embedding)
        for piece_path, piece in self.pieces(path, embedding):
            self.write_file(piece_path, piece, name)

    def write_file(self, path, embedding, name=None):
        """Write one file of this layout: `embedding` as `pieces` gives it. Not atomic."""
        files.write_bytes(path, self.encode(embedding, name, path))

    def token_on_reload(self, token, name):
        """The token `read_embedding` finds in a file written with this token and A1111 name."""
        return {"token": token, "name": name, None: None}[self.token_from]


_REGISTRY = {}
ALIASES = {}  # another tool's name for a layout -> the layout


def register(layout, aliases=()):
    """Add `layout` under its name (and `aliases`); a name registered twice is a bug."""
    for key in (layout.name, *aliases):
        if key in _REGISTRY or key in ALIASES:
            raise ValueError(f"embedding layout {key!r} registered twice")
    _REGISTRY[layout.name] = layout
    ALIASES.update((alias, layout.name) for alias in aliases)
    return layout


def get(name):
    """The `Layout` registered as `name` or under an alias of it; KeyError when there is none."""
    return _REGISTRY[ALIASES.get(name, name)]


def names(writable=None, text_encoders=None):
    """Registered layout names in registration order; `writable=True` keeps those ti_flax writes,
    `text_encoders=2` those that hold SDXL's two text encoders."""
    return tuple(
        n for n, layout in _REGISTRY.items()
        if (writable is None or layout.writable == writable)
        and (text_encoders is None or layout.text_encoders == text_encoders)
    )


def check_fits(layout, embedding, what=None):
    """UserError naming the embedding's file unless `layout` holds as many text encoders' rows as
    `embedding` has: SDXL's two in an SDXL layout, one elsewhere. `what` names the layout in the
    message (default "layout NAME"; the exporter passes "--format NAME")."""
    have = len(embedding.parts)
    if have == layout.text_encoders:
        return
    what = what or f"layout {layout.name}"
    where = f"{embedding.path}: " if embedding.path else ""
    fit = ", ".join(names(writable=True, text_encoders=have)) or "none"
    if have > layout.text_encoders:
        raise UserError(
            f"{where}is an SDXL embedding (clip_l/clip_g, {embedding.shape_text()}); {what} holds one text "
            f"encoder's rows (SD 1.x / 2.x): choose one of the SDXL layouts: {fit}"
        )
    raise UserError(
        f"{where}is an SD 1.x / 2.x embedding (one text encoder, {embedding.shape_text()}); {what} needs rows for "
        f"SDXL's two text encoders (clip_l and clip_g): choose one of {fit}"
    )


# --------------------------------------------------------------------------------------------
# Rows in and out


def rows_to_write(rows):
    """float32 [N, D] of `rows`, or UserError when it has another shape or NaN / Inf values."""
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise UserError(f"embedding must be [num_vectors, hidden], got shape {rows.shape}")
    if not np.all(np.isfinite(rows)):
        raise UserError("embedding holds NaN or Inf values; refusing to write it")
    return rows


def rows_read(path, rows):
    """float32 [N, D] of rows read from `path` ([D] is one vector), or UserError naming `path`."""
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


def int_or_none(value):
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def describe(obj):
    """"3 entries: 'a', 'b', 'c'" for a dict, "a list" for anything else: for error messages."""
    if isinstance(obj, dict):
        return f"{len(obj)} entries: {keys(obj)}" if obj else "an empty dict"
    return f"a {type(obj).__name__}"


def keys(data, limit=5):
    shown = [repr(k) for k in list(data)[:limit]]
    return ", ".join(shown) + (", ..." if len(data) > limit else "")


# --------------------------------------------------------------------------------------------
# File content


def file_content(data, path, metadata=None):
    """The bytes of `data` for `path`: safetensors when it ends in .safetensors, else torch.save.

    safetensors files get the metadata format=pt that PyTorch loaders expect, plus `metadata`.
    """
    if path.endswith(".safetensors"):
        return safetensors_content(data, metadata)
    return torch_content(data, path)


def safetensors_content(tensors, metadata=None):
    """safetensors bytes of {name: array} with metadata format=pt (plus `metadata`)."""
    return files.safetensors_bytes(tensors, {"format": "pt", **(metadata or {})})


def torch_content(data, path):
    """`torch.save` bytes of `data` for `path` (named if torch is missing), numpy arrays (also
    inside dicts) turned into tensors."""
    torch = require_torch(f"writing {os.path.basename(path)}")

    def to_torch(obj):
        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj.copy())
        return {k: to_torch(v) for k, v in obj.items()} if isinstance(obj, dict) else obj

    return files.torch_bytes(to_torch(data))


def require_torch(what, alternative=""):
    try:
        import torch
    except ImportError:
        raise UserError(f"{what} needs torch: `pip install torch`{', ' + alternative if alternative else ''}") from None
    return torch
