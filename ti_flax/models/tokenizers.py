"""A model's CLIP tokenizer folders, checked file by file before transformers reads them.

`load_tokenizer` reads `tokenizer/` (or a --tokenizer_name folder); `load_second_tokenizer` reads
SDXL's `tokenizer_2/` and checks it differs from the first in padding only.
"""

import os

from .. import files
from ..errors import UserError

TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def load_tokenizer(folder):
    """A CLIP tokenizer from `folder`; DamagedFile naming the file when one of them is damaged.

    The folder holds vocab.json + merges.txt (transformers 4.x saves these) and/or tokenizer.json
    (what transformers 5 saves); each file present is checked before transformers reads it.
    """
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such tokenizer folder")
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    fast_file = os.path.join(folder, "tokenizer.json")
    if os.path.exists(fast_file):
        if not isinstance(files.read_json(fast_file, "a tokenizers JSON file").get("model"), dict):
            raise files.DamagedFile(fast_file, "not a tokenizers file (no model section)")
    if os.path.exists(vocab_file) or not os.path.exists(fast_file):
        vocab = files.read_json(vocab_file, "a CLIP vocabulary (JSON)")
        bad = [k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool)]
        if not vocab or bad:
            raise files.DamagedFile(vocab_file, "not a CLIP vocabulary (expected {token: id} with integer ids)")
    if os.path.exists(merges_file) or not os.path.exists(fast_file):
        files.read_text(merges_file, "a BPE merges text file")
    for name in TOKENIZER_CONFIGS:
        if os.path.exists(os.path.join(folder, name)):
            files.read_json(os.path.join(folder, name), "a JSON tokenizer config")
    import transformers
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    # transformers 4.x's CLIPTokenizer (Python) needs vocab.json + merges.txt; its fast twin reads
    # tokenizer.json. In 5.x CLIPTokenizer reads either.
    cls = transformers.CLIPTokenizer
    if not os.path.exists(vocab_file) and hasattr(transformers, "CLIPTokenizerFast"):
        cls = transformers.CLIPTokenizerFast
    with files.reading(folder, "a CLIP tokenizer folder (vocab.json and merges.txt, or tokenizer.json)"):
        return cls.from_pretrained(folder)


def load_second_tokenizer(model_dir, tokenizer):
    """SDXL's tokenizer_2, checked to be the first tokenizer's vocabulary with its own padding.

    The second text encoder's ids are then the first's with the padding after the end-of-text
    token replaced (`second_encoder_ids`), so one tokenization serves both encoders.
    """
    folder = os.path.join(model_dir, "tokenizer_2")
    tokenizer_2 = load_tokenizer(folder)
    if tokenizer_2.get_vocab() != tokenizer.get_vocab() or tokenizer_2.model_max_length != tokenizer.model_max_length:
        raise UserError(f"{folder}: not the same vocabulary and length as tokenizer/; ti_flax trains SDXL models "
                        "whose two tokenizers differ in padding only, as SDXL base's do")
    if tokenizer_2.pad_token_id is None or tokenizer.eos_token_id is None:
        raise UserError(f"{model_dir}: tokenizer/ needs an end-of-text token and tokenizer_2/ a padding token")
    return tokenizer_2
