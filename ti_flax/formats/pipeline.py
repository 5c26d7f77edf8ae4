"""Saved pipeline folders (text_encoder/ and tokenizer/): the learned rows are those of the
tokens `token, token_1, ...` added to the tokenizer, read from the text encoder's table.

Read side only: `ti_flax.models.pipeline` writes full pipelines. The tokenizer is loaded through
ti_flax.models, imported only when a pipeline is read.
"""

import os
import re

import numpy as np

from .. import files
from ..errors import UserError, short_list
from .base import Embedding, Layout, register, rows_read


def is_pipeline(folder):
    """Whether `folder` has the text_encoder/ and tokenizer/ folders a pipeline's rows come from."""
    return os.path.isdir(os.path.join(folder, "text_encoder")) and os.path.isdir(os.path.join(folder, "tokenizer"))


def read(folder, token):
    """The `Embedding` of `token, token_1, ...` in a saved pipeline's text encoder.

    Raises:
        UserError: `token` was not added to the tokenizer, the table is too short for its
            ids, or the text encoder's weights are missing or damaged.
    """
    tokenizer = _tokenizer(folder)
    added = _added_ids(tokenizer)
    if token not in added:
        raise UserError(
            f"{folder}: {token!r} is not a token added to this pipeline's tokenizer "
            f"(added tokens: {short_list(_learned_tokens(tokenizer), 5) or 'none'})"
        )
    tokens = [token]
    while f"{token}_{len(tokens)}" in added:
        tokens.append(f"{token}_{len(tokens)}")
    ids = [added[t] for t in tokens]
    table = _token_table(os.path.join(folder, "text_encoder"))
    if max(ids) >= table.shape[0]:
        raise UserError(f"{folder}: tokenizer has id {max(ids)} but the text encoder has only {table.shape[0]} rows")
    return Embedding(token, rows_read(folder, table[ids]), LAYOUT.name, None, folder)


def learned_tokens(folder):
    """The learned tokens of a pipeline folder (`tok`, not `tok_1`), sorted."""
    return _learned_tokens(_tokenizer(folder))


def _tokenizer(folder):
    from ..models import load_tokenizer

    return load_tokenizer(os.path.join(folder, "tokenizer"))


def _added_ids(tokenizer):
    # Tokens added after the base vocabulary (CLIP's special tokens are inside it).
    return {t: i for t, i in tokenizer.get_added_vocab().items() if i >= tokenizer.vocab_size}


def _learned_tokens(tokenizer):
    added = _added_ids(tokenizer)
    return sorted(t for t in added if not (re.fullmatch(r"(.+)_\d+", t) and re.sub(r"_\d+$", "", t) in added))


def _token_table(folder):
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


LAYOUT = register(Layout("pipeline", "a saved pipeline folder: the rows of token, token_1, ... in its text encoder"))
