"""Placeholder tokens and their rows of the CLIP token-embedding table(s).

The learned rows live apart from the frozen table: `rows[i]` is the embedding of token id
`base_vocab_size + i`. This module names the tokens, adds them to the tokenizer(s), picks the
initial rows, and merges rows into a full table when a whole pipeline is saved.

It is the one place that knows SDXL's row layout: a vector is ONE row holding its CLIP-L row and
its bigG row side by side ([N, 768 + 1280]), so the learned rows stay one leaf (AdamW and
global-norm clipping treat it exactly as two). `split_rows` gives each text encoder its part,
`join_rows` puts parts side by side; both take the encoders' widths (ModelSpec.text_widths, or a
checkpoint's meta["text_widths"]), so this module needs no model.
"""

import numpy as np

from .errors import UserError


def placeholder_tokens(token, num_vectors):
    """Token names for `num_vectors` vectors: `tok`, `tok_1`, ..., `tok_{n-1}`.

    This is the naming diffusers' `load_textual_inversion` gives a [n, D] embedding, and the
    one its `maybe_convert_prompt` expands "tok" into at inference.
    """
    if num_vectors < 1:
        raise UserError(f"--num_vectors must be at least 1, got {num_vectors}")
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def placeholder_text(tokens):
    """The prompt text that stands for the concept: all its tokens, space separated."""
    return " ".join(tokens)


def expand_placeholders(ids, groups):
    """Token ids with each concept's first token expanded to all of its tokens.

    Args:
      ids: token ids of a text, without BOS/EOS.
      groups: one id list per concept, e.g. [[id("<cat>"), id("<cat>_1"), id("<cat>_2")]].
    Returns:
      The ids with every lone first id replaced by its whole group, as diffusers'
      `maybe_convert_prompt` expands "<cat>" into "<cat> <cat>_1 <cat>_2" (and as the training
      templates are filled); a group already spelled out in full is kept as it is.
    """
    by_first = {group[0]: list(group) for group in groups}
    out = []
    for i, token_id in enumerate(ids):
        group = by_first.get(token_id)
        if group and list(ids[i : i + len(group)]) != group:
            out.extend(group)
        else:
            out.append(token_id)
    return out


def add_placeholder_tokens(tokenizer, tokens):
    """Add `tokens` to `tokenizer` (in place) and return their ids, which follow the base vocab.

    Raises UserError if any token is already in the vocabulary, before changing anything.
    """
    if not tokens[0].strip() or any(ch.isspace() for ch in tokens[0]):
        raise UserError(f"--placeholder_token {tokens[0]!r}: must be one word without spaces, like <cat-toy>")
    vocab = tokenizer.get_vocab()
    # Exact vocabulary entries, and words that already tokenize to one entry ("cat", "sks"):
    # adding those would silently take the word over in every prompt.
    taken = [t for t in tokens if t in vocab or len(tokenizer.encode(t, add_special_tokens=False)) == 1]
    if taken:
        raise UserError(
            f"--placeholder_token: {', '.join(taken)} already in the tokenizer's vocabulary; "
            "choose a new token, for example <my-concept>"
        )
    base = len(tokenizer)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(base, base + len(tokens))):
        raise UserError(f"--placeholder_token: tokenizer gave ids {ids} for {tokens}, expected them after the vocabulary")
    # Each placeholder must survive tokenization of a prompt as exactly one id.
    for token, token_id in zip(tokens, ids):
        if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
            raise UserError(f"--placeholder_token {token!r} does not tokenize to a single token")
    return ids


def add_to_tokenizers(tokenizers, tokens):
    """Add `tokens` to every tokenizer of a model (one, or SDXL's and FLUX's two; in place); their ids
    in the first. In each tokenizer they follow its own vocabulary (add_placeholder_tokens): the
    same ids where the tokenizers share one (SDXL's), each row i of the learned rows at
    `len(tokenizer) + i` in every tokenizer either way."""
    return [add_placeholder_tokens(tokenizer, tokens) for tokenizer in tokenizers][0]


def initializer_id(tokenizer, initializer_token):
    """The id of the single token `initializer_token`; UserError if it is not exactly one token."""
    ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise UserError(
            f"--initializer_token {initializer_token!r} must be a single token, but it splits into "
            f"{len(ids)}: {pieces}; pick one word, such as 'toy' or 'painting'"
        )
    return ids[0]


def initial_rows(table, init_id, num_vectors):
    """`num_vectors` copies of row `init_id` of the frozen table, as float32 [n, D]."""
    return np.repeat(np.asarray(table[init_id], dtype=np.float32)[None], num_vectors, axis=0)


def merged_table(table, rows):
    """The frozen table with the learned rows appended: the token table of a saved pipeline."""
    table = np.asarray(table)
    return np.concatenate([table, np.asarray(rows, dtype=table.dtype)], axis=0)


def split_rows(rows, widths):
    """Each text encoder's part of learned rows [..., sum(widths)]: (rows,) for one encoder; for
    SDXL's two, (rows[..., :D1], rows[..., D1:]) (numpy or jax arrays, traced ones included)."""
    if len(widths) == 1:
        return (rows,)
    first = widths[0]
    return rows[..., :first], rows[..., first:]


def join_rows(parts):
    """One row per vector from each text encoder's rows [..., D_i], side by side: [..., sum(D_i)]
    (the inverse of `split_rows`; numpy in, numpy out; jax arrays, traced ones included, likewise)."""
    xp = parts[0].__array_namespace__() if hasattr(parts[0], "__array_namespace__") else np
    return xp.concatenate(parts, axis=-1)


def median_norm(table):
    """The median L2 norm of a token table's rows [vocab, D] (numpy's median, of float32 norms):
    the default target of --embedding_norm and --embedding_norm_decay."""
    return float(np.median(np.linalg.norm(np.asarray(table, np.float32), axis=1)))
