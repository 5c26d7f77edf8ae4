"""Stand-in for `ti_flax.clip_vocab` (being added on the `vocab` branch) until it lands.

The real CLIP tokenizer, built offline the way scripts/make_tiny_model.py builds it: from open_clip's
BPE merges file (`pip install --no-deps open_clip_torch`). Same API: `build_tokenizer(pad_token)`
and `PAD_TOKENS` by family. Delete this file when `ti_flax/clip_vocab.py` is merged.
"""

import gzip
import importlib.util
import json
import os
import tempfile

from ..errors import UserError

PAD_TOKENS = {"sd1": "<|endoftext|>", "sd2": "!"}
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode():
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def build_tokenizer(pad_token="<|endoftext|>"):
    """The 49408-token CLIP tokenizer (transformers' CLIPTokenizer), padding with `pad_token`."""
    from transformers import CLIPTokenizer

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("a single-file model needs the CLIP vocabulary: `pip install --no-deps open_clip_torch`, "
                        "or pass --tokenizer_name with a tokenizer folder")
    bpe = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:_NUM_MERGES + 1]
    base = list(_bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77)
