"""The concepts of a run: one per placeholder token, each with its own images and start.

A run trains one concept from the single-concept flags (`--placeholder_token`,
`--train_data_dir`, ...), or several listed in a `--concepts` file, TOML:

    [[concepts]]
    placeholder_token = "<my-dog>"
    train_data_dir = "dog_photos"
    initializer_token = "dog"

    [[concepts]]
    placeholder_token = "<wc>"
    train_data_dir = "watercolours"
    initializer_token = "painting"
    learnable_property = "style"
    weight = 0.5

or JSON, `{"concepts": [{...}, ...]}` or a bare list `[{...}, ...]` of the same entries.
An entry's keys are `Concept`'s fields. Relative paths are relative to the file's folder, so a
concepts file travels with its images. Everything is checked here, before any model is loaded,
and each problem is one line naming the file, the concept and the key. This module imports
nothing heavy: `TrainConfig.validate()` calls it.
"""

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from typing import Optional

from ..errors import UserError
from ..tokens import placeholder_tokens
from .choices import LEARNABLE_PROPERTIES, one_of


def is_file_extension(text):
    """Whether `text` is a file extension like ".txt" or ".tar.gz": the caption files' suffix.

    One check for --caption_extension and each concept's caption_extension: a dot, then parts
    without whitespace, slashes or empty pieces, so it only ever names a file beside an image.
    """
    return re.fullmatch(r"\.[^\s/\\.]+(\.[^\s/\\.]+)*", text) is not None


@dataclasses.dataclass(frozen=True)
class Concept:
    """One placeholder token to learn, and what to learn it from.

    Attributes:
      placeholder_token: the new token, e.g. "<cat-toy>"; its outputs go in output_dir/<token>/.
      train_data_dir: the folder of its images (resolved: relative to the concepts file's folder).
      initializer_token: a word whose row starts the training; exactly one of this and
        initial_embeddings is set.
      initial_embeddings: an embedding file to continue from, or None.
      num_vectors: vectors for this concept (tokens tok, tok_1, ...).
      learnable_property: "object" or "style": which templates show its images.
      caption_extension: e.g. ".txt": its images' caption files; None: templates only.
      repeats: times each of its images appears per epoch.
      weight: its share of each global batch, relative to the other concepts' weights.
    """

    placeholder_token: str
    train_data_dir: str
    initializer_token: str = ""
    initial_embeddings: Optional[str] = None
    num_vectors: int = 1
    learnable_property: str = "object"
    caption_extension: Optional[str] = None
    repeats: int = 100
    weight: float = 1.0

    def to_dict(self) -> dict:
        """Every field, as JSON-able values: what `parse` reads back into an equal Concept."""
        return dataclasses.asdict(self)

    @property
    def tokens(self) -> list:
        """Its placeholder tokens: ["<a>", "<a>_1", ...], one per vector."""
        return placeholder_tokens(self.placeholder_token, self.num_vectors)


FIELDS = tuple(f.name for f in dataclasses.fields(Concept))
# The entry keys a run's flags give defaults to; the other keys belong to one concept only.
CONFIG_DEFAULTS = ("num_vectors", "learnable_property", "caption_extension", "repeats")
PATHS = ("train_data_dir", "initial_embeddings")
# The type an entry's value must have; None is allowed (JSON null) only for the Optional fields.
TYPES = {"placeholder_token": str, "train_data_dir": str, "initializer_token": str, "initial_embeddings": str,
         "num_vectors": int, "learnable_property": str, "caption_extension": str, "repeats": int, "weight": float}
OPTIONAL = ("initial_embeddings", "caption_extension")
LAYOUTS = (".json", ".toml")


def from_config(config) -> tuple:
    """The run's concepts.

    Args:
      config: a TrainConfig (or anything with its fields). `config.concepts` None: one Concept
        from the single-concept flags (placeholder_token, train_data_dir, initializer_token,
        initial_embeddings, num_vectors, learnable_property, caption_extension, repeats;
        weight 1.0), unchecked (TrainConfig.validate checks those flags). A str: the path of a
        .json or .toml file, read with `read_file`. A list or tuple of dicts (the notebook/API
        form): parsed like a file's entries, relative paths taken from the current directory.
    Returns:
      A tuple of Concepts, in the order given.
    Raises:
      UserError: one line naming the file, the concept and the key at fault.
    """
    if config.concepts is None:
        return (Concept(**{name: getattr(config, name) for name in FIELDS if name != "weight"}),)
    defaults = {name: getattr(config, name) for name in CONFIG_DEFAULTS}
    if isinstance(config.concepts, str):
        return read_file(config.concepts, defaults)
    if isinstance(config.concepts, (list, tuple)):
        return parse(config.concepts, defaults, source="TrainConfig.concepts", base_dir="")
    raise UserError(
        f"TrainConfig.concepts must be the path of a .json or .toml file (a str) or a list of concept dicts, "
        f"got {type(config.concepts).__name__}"
    )


def read_file(path, defaults: Optional[Mapping] = None) -> tuple:
    """The concepts listed in a .json or .toml file.

    Args:
      path: the file. JSON: {"concepts": [{...}, ...]} or a bare list [{...}, ...]; TOML:
        [[concepts]] tables. The extension chooses the parser.
      defaults: values for the keys of CONFIG_DEFAULTS that an entry leaves out (a run's
        flags); None: Concept's own defaults.
    Returns:
      A tuple of Concepts, relative paths resolved against the file's folder.
    Raises:
      UserError: naming the file (and the concept and key) for a missing, unreadable or
        malformed file and for every bad entry.
    """
    path = os.fspath(path)
    layout = os.path.splitext(path)[1].lower()
    if layout not in LAYOUTS:
        raise UserError(f"{path}: a concepts file must be .json or .toml, not {layout or 'without an extension'}")
    if not os.path.exists(path):
        raise UserError(f"{path}: no such concepts file")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else err  # strerror: without the path again
        raise UserError(
            f"{path}: cannot read the concepts file ({type(err).__name__}: {reason}); make it a readable UTF-8 file"
        ) from None
    try:
        data = json.loads(text) if layout == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"{path}: not valid {layout[1:].upper()}: {err}") from None
    return parse(_entries(data, path, layout), defaults, source=path, base_dir=os.path.dirname(path))


def _entries(data, source, layout):
    """The list of entries in a parsed file: its "concepts" list, or (JSON) the whole of it."""
    if isinstance(data, dict):
        extra = sorted(set(data) - {"concepts"})
        if extra:
            hint = "[[concepts]] tables" if layout == ".toml" else 'a "concepts" list'
            raise UserError(f"{source}: unexpected top-level key {extra[0]!r}{_did_you_mean(extra[0], ['concepts'])}; "
                            f"the file holds only {hint}")
        if "concepts" not in data:
            shape = "[[concepts]] tables" if layout == ".toml" else '{"concepts": [...]} or a list [...]'
            raise UserError(f"{source}: no concepts; list them as {shape}")
        return data["concepts"]
    return data


def parse(entries: Sequence, defaults: Optional[Mapping] = None, source: str = "concepts", base_dir: str = "") -> tuple:
    """Concepts from a list of entries, each a dict of Concept's fields.

    Args:
      entries: the parsed file's list, or the API's list of dicts.
      defaults: values for the keys of CONFIG_DEFAULTS that an entry leaves out; None: Concept's.
      source: what the messages name, e.g. the file's path.
      base_dir: the folder relative paths (train_data_dir, initial_embeddings) are taken from;
        "" is the current directory. Absolute paths are kept; "~" is expanded.
    Returns:
      A tuple of Concepts, paths resolved and normalised, checked one by one and for distinct
      tokens (counting each concept's extra vector tokens).
    Raises:
      UserError: "SOURCE, concept N (<token>): KEY ..." for the first problem (N counts from 1).
    """
    if not isinstance(entries, (list, tuple)):
        raise UserError(f"{source}: concepts must be a list of concepts, got {_type_name(entries)}")
    if not entries:
        raise UserError(f"{source}: the concepts list is empty; list at least one concept")
    defaults = {**{name: getattr(Concept, name) for name in CONFIG_DEFAULTS}, **(defaults or {})}
    concepts = tuple(_concept(entry, index, defaults, source, base_dir) for index, entry in enumerate(entries, 1))
    _check_distinct(concepts, source)
    return concepts


def _concept(entry, index, defaults, source, base_dir):
    """One checked, path-resolved Concept from entry `index` (counted from 1)."""
    where = f"{source}, concept {index}"
    if not isinstance(entry, Mapping):
        raise UserError(f"{where}: must be a table of keys (TOML [[concepts]]) or a JSON object, got {_type_name(entry)}")
    token = entry.get("placeholder_token")
    if isinstance(token, str) and token:
        where += f" ({token})"
    for key in entry:
        if key not in FIELDS:
            raise UserError(f"{where}: unknown key {key!r}{_did_you_mean(key, FIELDS)}; the keys are {', '.join(FIELDS)}")
    for key, value in entry.items():
        _check_type(where, key, value)
    for key in ("placeholder_token", "train_data_dir"):
        if not entry.get(key):
            raise UserError(f"{where}: {key} is required")
    if bool(entry.get("initializer_token")) == bool(entry.get("initial_embeddings")):
        given = "both" if entry.get("initializer_token") else "neither"
        raise UserError(f"{where}: give exactly one of initializer_token (a word whose row starts the training) and "
                        f"initial_embeddings (an embedding file to continue from), not {given}")
    values = {**defaults, "weight": 1.0, **entry}
    values["weight"] = float(values["weight"])
    values["initializer_token"] = values.get("initializer_token") or ""
    values["initial_embeddings"] = values.get("initial_embeddings") or None
    for key in PATHS:
        if values[key] is not None:
            values[key] = os.path.normpath(os.path.join(base_dir, os.path.expanduser(values[key])))
    concept = Concept(**values)
    problem = _problem(concept)
    if problem:
        raise UserError(f"{where}: {problem}")
    return concept


def _check_type(where, key, value):
    """UserError unless `value` has the type TYPES gives `key` (bool is no number here)."""
    expected = TYPES[key]
    if value is None and key in OPTIONAL:
        return
    if expected is float:
        ok, name = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif expected is int:
        ok, name = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        ok, name = isinstance(value, str), "a string"
    if not ok:
        raise UserError(f"{where}: {key} must be {name}, got {_type_name(value)} {value!r}")


def _problem(concept):
    """What is wrong with a well-typed concept's values, or "" when nothing is."""
    token = concept.placeholder_token
    if any(ch.isspace() for ch in token):
        return f"placeholder_token {token!r} must be one word without spaces, like <cat-toy>"
    # Each concept's outputs go in output_dir/<token>/, so the token must be one folder name.
    if "/" in token or "\\" in token or token in (".", ".."):
        return f"placeholder_token {token!r} names its output folder: no / or \\, and not . or .."
    checks = [
        (concept.num_vectors >= 1, f"num_vectors must be at least 1, got {concept.num_vectors}"),
        one_of("learnable_property", concept.learnable_property, LEARNABLE_PROPERTIES),
        (concept.caption_extension is None or is_file_extension(concept.caption_extension),
         f"caption_extension must be a file extension starting with a dot, like .txt or .caption, "
         f"got {concept.caption_extension!r}"),
        (concept.repeats >= 1, f"repeats must be at least 1, got {concept.repeats}"),
        (math.isfinite(concept.weight) and concept.weight > 0,
         f"weight must be a positive number (its share of each batch), got {concept.weight}"),
    ]
    return next((message for ok, message in checks if not ok), "")


def _check_distinct(concepts, source):
    """UserError naming both concepts when two of them would add the same token."""
    owner = {}
    for index, concept in enumerate(concepts, 1):
        for token in concept.tokens:
            if token in owner:
                first = owner[token]
                raise UserError(
                    f"{source}: concept {first} ({concepts[first - 1].placeholder_token}) and concept {index} "
                    f"({concept.placeholder_token}) both use the token {token}; give each its own placeholder_token "
                    f"(a concept with num_vectors N also owns <token>_1 .. <token>_N-1)"
                )
            owner[token] = index


def _did_you_mean(key, options):
    close = difflib.get_close_matches(str(key), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(value):
    """A value's type in the file's own words: a TOML table / JSON object reads as "a table"."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    return names.get(type(value), type(value).__name__)
