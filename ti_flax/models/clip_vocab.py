"""The CLIP tokenizer, built offline from OpenAI's BPE merges file bundled with ti_flax.

Single-file Stable Diffusion checkpoints carry no tokenizer. Every text encoder of SD 1.x, SD 2.x
and SDXL uses the same 49408-token byte-level BPE vocabulary (OpenAI CLIP's, MIT licensed, in
`ti_flax/vocab/` with its licence); they differ only in the pad token. This module writes that
vocabulary as a transformers tokenizer folder and loads it, in transformers 4.x and 5.x alike.

    >>> tokenizer = build_tokenizer(PAD_TOKENS["sd2"])  # doctest: +SKIP
    >>> tokenizer("a photo of a cat").input_ids  # doctest: +SKIP
    [49406, 320, 1125, 539, 320, 2368, 49407]
"""

import functools
import gzip
import importlib.resources
import json
import os
import tempfile

# The pad token of each text encoder's tokenizer folder on the Hub: SD 1.x's (openai/clip-vit-large-
# patch14) and SDXL's `tokenizer` pad with <|endoftext|>; SD 2.x's OpenCLIP tokenizer and SDXL's
# `tokenizer_2` pad with "!" (id 0), as diffusers' single-file conversion sets it (pad_token="!").
PAD_TOKENS = {"sd1": "<|endoftext|>", "sd2": "!", "sdxl": "<|endoftext|>", "sdxl_2": "!"}

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI's SimpleTokenizer reads only the first 49152 - 256 - 2 merges of the file: 256 bytes, 256
# end-of-word bytes, the merges and 2 specials make the 49408-token vocabulary.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 512 + NUM_MERGES + 2


def bytes_to_unicode():
    """{byte: printable character}, the byte-level alphabet of the CLIP (and GPT-2) BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map in
    order to the characters from U+0100 on, so every byte has a visible, non-space symbol. The
    dict's order (printable bytes first) is the order of the first 256 vocabulary ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _merges_file():
    """The bundled merges file as an importlib.resources Traversable (it has `read_bytes()`)."""
    return importlib.resources.files("ti_flax") / "vocab" / MERGES_FILE


@functools.cache
def _all_merges():
    # The first line is a header ("bpe_simple_vocab_16e6.txt#version: 0.2"); the merges follow.
    text = gzip.decompress(_merges_file().read_bytes()).decode("utf-8")
    return tuple(text.split("\n")[1 : NUM_MERGES + 1])


def _vocabulary(num_merges=None):
    """(tokens in id order, merges) of the CLIP vocabulary with its first `num_merges` merges.

    Args:
      num_merges: how many merges to keep, 0 to NUM_MERGES (None: all of them). Fewer merges give a
        smaller vocabulary, 512 + num_merges + 2 tokens, with the same ids for the bytes and the
        two specials last.
    Returns:
      (list of str, list of str "a b").
    """
    num_merges = NUM_MERGES if num_merges is None else num_merges
    if not 0 <= num_merges <= NUM_MERGES:
        raise ValueError(f"num_merges must be between 0 and {NUM_MERGES}, got {num_merges}")
    merges = list(_all_merges()[:num_merges])
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return tokens, merges


def write_tokenizer_files(out_dir, num_merges=None, pad_token=EOS_TOKEN):
    """Write a CLIP tokenizer folder: vocab.json, merges.txt, tokenizer_config.json and
    special_tokens_map.json, the files of a Stable Diffusion `tokenizer/` folder on the Hub.

    Args:
      out_dir: the folder (created if missing; existing files of these names are replaced).
      num_merges: see `_vocabulary`; None for the full 49408-token vocabulary.
      pad_token: PAD_TOKENS[family]; "<|endoftext|>" (SD 1.x) or "!" (SD 2.x, SDXL's second).
    Returns:
      out_dir. `CLIPTokenizer.from_pretrained(out_dir)` then has model_max_length 77, bos
      <|startoftext|>, eos and unk <|endoftext|>, and `pad_token`.
    """
    tokens, merges = _vocabulary(num_merges)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    # One merge a line after the header (no empty line: transformers 5 rejects one).
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH, **specials}
    for name, content in [("tokenizer_config.json", config), ("special_tokens_map.json", specials)]:
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
    return out_dir


def build_tokenizer(pad_token=EOS_TOKEN):
    """A fresh transformers `CLIPTokenizer` with the full CLIP vocabulary and `pad_token`.

    Built offline from the bundled merges file (written to a temporary folder and loaded, the
    path transformers 4.x and 5.x share); each call returns a new tokenizer, so adding
    placeholder tokens to one leaves the others as they were.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="ti_flax_clip_vocab_") as folder:
        return CLIPTokenizer.from_pretrained(write_tokenizer_files(folder, pad_token=pad_token))
