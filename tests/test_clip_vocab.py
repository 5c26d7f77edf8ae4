"""The CLIP vocabulary ti_flax bundles (ti_flax/clip_vocab.py) against real CLIP tokenizers.

Two references: transformers' CLIPTokenizer loaded from vocab.json / merges.txt that this file
writes itself from open_clip's copy of the merges file (the bundled copy when open_clip is not
installed), and OpenAI's own SimpleTokenizer (open_clip's copy of it), which builds its
vocabulary without transformers, where it can be imported.
"""

import copy
import gzip
import hashlib
import importlib.resources
import importlib.util
import json
import os

import pytest
from transformers import CLIPTokenizer

from ti_flax.models import clip_vocab

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT on the BEACH, iN mIxEd CaSe",
    "Café naïve résumé, Zoë and Ångström",
    "cafe\u0301 nai\u0308ve",  # decomposed accents: normalized to the composed ones
    "東京タワーの夜景",
    "一只猫在海滩上",
    "🐱🚀 emoji!! 👍🏽 ❤️",
    "it's a dog's life, isn't it? (yes!) -- 100% [sure]; {ok} @home #tag $5 a/b \\ c|d ~x^y*z",
    "3.14159 and 1999, 2024-01-31 10:30 x2 4k 1080p",
    "   extra   spaces\tand\ttabs\nand newlines   ",
    "",
    "a" * 40 + " supercalifragilisticexpialidocious",
    "<cat-toy>",  # not yet a token: split into pieces
]
PLACEHOLDER = "<cat-toy>"
PLACEHOLDER_PROMPTS = [
    "a photo of a <cat-toy>",
    "<cat-toy>, in the style of <cat-toy>!",
    "a <cat-toy>on the beach",
    "  <cat-toy>  ",
]


def _open_clip_dir():
    """open_clip's package folder, found without importing it (installed without its
    dependencies, as the quick start used to, it cannot be imported); None if not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return folder if os.path.isfile(os.path.join(folder, clip_vocab.MERGES_FILE)) else None


def _bundled_bytes():
    return (importlib.resources.files("ti_flax") / "vocab" / clip_vocab.MERGES_FILE).read_bytes()


@pytest.fixture(scope="module")
def bundled():
    return clip_vocab.build_tokenizer()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' CLIPTokenizer from files written here as OpenAI's simple_tokenizer.py orders
    the vocabulary, with transformers' own byte alphabet: nothing of clip_vocab but the data when
    open_clip is missing."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = _open_clip_dir()
    if folder is None:
        data = _bundled_bytes()
    else:
        with open(os.path.join(folder, clip_vocab.MERGES_FILE), "rb") as f:
            data = f.read()
    merges = gzip.decompress(data).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = tmp_path_factory.mktemp("reference_clip_tokenizer")
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(out), pad_token="<|endoftext|>", model_max_length=77)


@pytest.fixture(scope="module")
def simple_tokenizer_class():
    """open_clip.tokenizer.SimpleTokenizer; skips where it cannot be imported."""
    folder = _open_clip_dir()
    if folder is None:
        pytest.skip("open_clip is not installed")
    try:
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer
    except ImportError:
        pass
    # Installed with --no-deps, open_clip's package import fails (torchvision, timm); its tokenizer
    # module alone needs only ftfy, regex, numpy and torch.
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", os.path.join(folder, "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        pytest.skip(f"open_clip's tokenizer module cannot be imported: {e}")
    return module.SimpleTokenizer


def test_package_data_found_through_importlib_resources():
    vocab_dir = importlib.resources.files("ti_flax") / "vocab"
    data = _bundled_bytes()
    assert gzip.decompress(data).decode("utf-8").startswith('"bpe_simple_vocab_16e6.txt#version: 0.2\n')
    licence = (vocab_dir / "LICENSE").read_text(encoding="utf-8")
    assert "MIT License" in licence and "Copyright (c) 2021 OpenAI" in licence
    # The NOTICE names the file's hash: the bundled copy is the one it describes.
    assert hashlib.sha256(data).hexdigest() in (vocab_dir / "NOTICE").read_text(encoding="utf-8")


def test_bundled_file_is_open_clips():
    folder = _open_clip_dir()
    if folder is None:
        pytest.skip("open_clip is not installed")
    with open(os.path.join(folder, clip_vocab.MERGES_FILE), "rb") as f:
        assert f.read() == _bundled_bytes()


def test_bytes_to_unicode_is_transformers_alphabet_in_order():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert list(clip_vocab.bytes_to_unicode().items()) == list(bytes_to_unicode().items())


def test_full_vocabulary_and_specials(bundled, reference):
    assert len(bundled) == bundled.vocab_size == clip_vocab.VOCAB_SIZE == 49408
    assert bundled.get_vocab() == reference.get_vocab()
    assert bundled.model_max_length == 77
    assert (bundled.bos_token, bundled.eos_token, bundled.unk_token, bundled.pad_token) == (
        "<|startoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
    )
    assert (bundled.bos_token_id, bundled.eos_token_id, bundled.pad_token_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )
    assert bundled.eos_token_id == len(bundled) - 1 and bundled.bos_token_id == len(bundled) - 2


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_ids_as_transformers_reference(bundled, reference, prompt):
    assert bundled(prompt).input_ids == reference(prompt).input_ids
    padded = bundled(prompt, padding="max_length", truncation=True).input_ids
    assert padded == reference(prompt, padding="max_length", truncation=True).input_ids
    assert len(padded) == 77


def test_placeholder_after_add_tokens(bundled, reference):
    ours, theirs = copy.deepcopy(bundled), copy.deepcopy(reference)
    ours.add_tokens([PLACEHOLDER])
    theirs.add_tokens([PLACEHOLDER])
    assert ours.convert_tokens_to_ids(PLACEHOLDER) == theirs.convert_tokens_to_ids(PLACEHOLDER) == 49408
    for prompt in PLACEHOLDER_PROMPTS + PROMPTS:
        assert ours(prompt).input_ids == theirs(prompt).input_ids, prompt
    assert ours(PLACEHOLDER_PROMPTS[0]).input_ids.count(49408) == 1


def test_same_ids_as_openai_simple_tokenizer(bundled, simple_tokenizer_class):
    simple = simple_tokenizer_class()
    sot, eot = simple.all_special_ids
    assert (sot, eot) == (bundled.bos_token_id, bundled.eos_token_id)
    assert simple.vocab_size == len(bundled)
    for prompt in PROMPTS:
        assert bundled(prompt).input_ids == [sot, *simple.encode(prompt), eot], prompt
    ours = copy.deepcopy(bundled)
    ours.add_tokens([PLACEHOLDER])
    simple = simple_tokenizer_class(additional_special_tokens=[PLACEHOLDER])
    for prompt in PLACEHOLDER_PROMPTS:
        assert ours(prompt).input_ids == [sot, *simple.encode(prompt), eot], prompt


@pytest.mark.parametrize("family", sorted(clip_vocab.PAD_TOKENS))
def test_pad_token_per_family(family, tmp_path):
    pad = clip_vocab.PAD_TOKENS[family]
    clip_vocab.write_tokenizer_files(str(tmp_path), num_merges=16, pad_token=pad)
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]:
        assert (tmp_path / name).is_file(), name
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert tok.pad_token == pad and tok.model_max_length == 77
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    # SD 1.x and SDXL's first tokenizer pad with the end token; SD 2.x and SDXL's second with "!".
    assert tok.pad_token_id == (0 if family in ("sd2", "sdxl_2") else tok.eos_token_id)
    ids = tok("a cat", padding="max_length").input_ids
    assert len(ids) == 77 and ids[-1] == tok.pad_token_id


def test_build_tokenizer_sd2_pad(bundled):
    sd2 = clip_vocab.build_tokenizer(clip_vocab.PAD_TOKENS["sd2"])
    assert sd2.pad_token == "!" and sd2.pad_token_id == 0 and len(sd2) == 49408
    ids = bundled("a photo of a cat", padding="max_length").input_ids
    ids2 = sd2("a photo of a cat", padding="max_length").input_ids
    end = ids.index(bundled.eos_token_id) + 1
    assert ids2[:end] == ids[:end] and set(ids2[end:]) == {0} and set(ids[end:]) == {bundled.eos_token_id}


@pytest.mark.parametrize("num_merges", [0, 10])
def test_small_vocabulary_keeps_ids(bundled, tmp_path, num_merges):
    clip_vocab.write_tokenizer_files(str(tmp_path), num_merges=num_merges)
    small = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert len(small) == 512 + num_merges + 2
    full = bundled.get_vocab()
    kept = {t: i for t, i in small.get_vocab().items() if i < 512 + num_merges}
    assert len(kept) == 512 + num_merges and all(full[t] == i for t, i in kept.items())
    assert small("a cat").input_ids[0] == len(small) - 2 and small("a cat").input_ids[-1] == len(small) - 1


def test_the_trainers_loader_reads_the_folder(tmp_path):
    from ti_flax import models

    clip_vocab.write_tokenizer_files(str(tmp_path), num_merges=16, pad_token="!")
    tok = models.load_tokenizer(str(tmp_path))
    assert len(tok) == 512 + 16 + 2 and tok.pad_token == "!" and tok.model_max_length == 77


def test_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_merges"):
        clip_vocab.write_tokenizer_files(str(tmp_path), num_merges=clip_vocab.NUM_MERGES + 1)
    with pytest.raises(ValueError, match="num_merges"):
        clip_vocab.write_tokenizer_files(str(tmp_path), num_merges=-1)
    with pytest.raises(ValueError, match="pad_token"):
        clip_vocab.write_tokenizer_files(str(tmp_path), num_merges=0, pad_token="<pad>")
