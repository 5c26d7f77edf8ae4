"""A model's tokenizer folders, checked file by file before transformers reads them.

`load_tokenizer` reads a CLIP `tokenizer/` (or a --tokenizer_name folder); `load_second_tokenizer`
reads SDXL's `tokenizer_2/` and checks it differs from the first in padding only; `load_t5_tokenizer`
reads FLUX.1's `tokenizer_2/`, T5's SentencePiece tokenizer.
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


# T5's special tokens, which every T5 v1.1 SentencePiece model has at these ids (FLUX.1's T5-XXL
# pads its prompts with <pad> to 512 or 256 tokens and ends them with </s>).
T5_SPECIAL_IDS = {"pad_token_id": 0, "eos_token_id": 1, "unk_token_id": 2}


def load_t5_tokenizer(folder):
    """A T5 tokenizer from `folder` (FLUX.1's tokenizer_2/); DamagedFile naming a damaged file.

    The folder holds spiece.model (the SentencePiece model) and/or tokenizer.json (its tokenizers
    twin, which transformers 5 saves alone); each file present is checked before transformers reads
    it (spiece.model with sentencepiece, when it is installed), and the special tokens must be T5's
    (<pad> 0, </s> 1, <unk> 2). `len(tokenizer)` counts the pieces and the <extra_id_N> sentinels
    (T5-XXL: 32000 + 100 = 32100, below its 32128-row table); a token added to it gets the id
    `len(tokenizer)`.
    """
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such tokenizer folder")
    spiece, fast_file = os.path.join(folder, "spiece.model"), os.path.join(folder, "tokenizer.json")
    if not os.path.exists(spiece) and not os.path.exists(fast_file):
        if os.path.exists(os.path.join(folder, "vocab.json")) and os.path.exists(os.path.join(folder, "merges.txt")):
            raise UserError(f"{folder}: a BPE tokenizer (vocab.json, merges.txt: CLIP's), not T5's SentencePiece "
                            "one; pass the T5 tokenizer folder (FLUX.1's tokenizer_2)")
        raise UserError(f"{folder}: no T5 tokenizer here (expected spiece.model or tokenizer.json)")
    if os.path.exists(fast_file):
        model = files.read_json(fast_file, "a tokenizers JSON file").get("model")
        if not isinstance(model, dict):
            raise files.DamagedFile(fast_file, "not a tokenizers file (no model section)")
        if model.get("type") != "Unigram":
            raise UserError(f"{fast_file}: a {model.get('type')} tokenizer, not T5's SentencePiece (Unigram) one; "
                            "pass the T5 tokenizer folder (FLUX.1's tokenizer_2)")
    if os.path.exists(spiece):
        data = files.read_bytes(spiece)
        try:
            import sentencepiece
        except ImportError:
            sentencepiece = None
            if not os.path.exists(fast_file):
                raise UserError(f"{spiece}: reading a SentencePiece model needs sentencepiece "
                                "(`pip install sentencepiece protobuf`), or a tokenizer.json beside it") from None
        if sentencepiece is not None:
            with files.reading(spiece, "a SentencePiece model"):
                sentencepiece.SentencePieceProcessor(model_proto=data)
    for name in TOKENIZER_CONFIGS:
        if os.path.exists(os.path.join(folder, name)):
            files.read_json(os.path.join(folder, name), "a JSON tokenizer config")
    import transformers
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    # transformers 4.x: T5TokenizerFast (what FluxPipeline uses) reads tokenizer.json or converts
    # spiece.model; 5.x has one T5Tokenizer (T5TokenizerFast is its alias) that reads either.
    cls = getattr(transformers, "T5TokenizerFast", None) or transformers.T5Tokenizer
    with files.reading(folder, "a T5 tokenizer folder (spiece.model or tokenizer.json)"):
        tokenizer = cls.from_pretrained(folder)
    wrong = {k: getattr(tokenizer, k) for k, v in T5_SPECIAL_IDS.items() if getattr(tokenizer, k) != v}
    if wrong:
        name, value = next(iter(wrong.items()))
        raise UserError(f"{folder}: {name} is {value}, not T5's {T5_SPECIAL_IDS[name]} (<pad> 0, </s> 1, <unk> 2); "
                        "pass the T5 tokenizer folder (FLUX.1's tokenizer_2)")
    return tokenizer
