"""Tests for ti_flax.data.prompts: the templates and the one prompt encoder's overflow rules."""

import numpy as np
import pytest

from ti_flax.data import prompts
from ti_flax.errors import UserError


# ---- templates and tokenization -----------------------------------------------------------


def test_templates():
    assert len(prompts.OBJECT_TEMPLATES) == 27 and len(prompts.STYLE_TEMPLATES) == 19
    assert prompts.templates_for("object")[0] == "a photo of a {}"
    assert prompts.templates_for("style")[0] == "a painting in the style of {}"
    assert all(t.count("{}") == 1 for t in prompts.OBJECT_TEMPLATES + prompts.STYLE_TEMPLATES)
    with pytest.raises(UserError):
        prompts.templates_for("person")


def test_encode_templates(clip_tokenizer):
    tok = clip_tokenizer
    tok.add_tokens(["<cat-toy>", "<cat-toy>_1"])
    cat = tok.convert_tokens_to_ids("<cat-toy>")
    cat1 = tok.convert_tokens_to_ids("<cat-toy>_1")
    assert tok("<cat-toy>", add_special_tokens=False).input_ids == [cat]
    ids = prompts.encode_templates(tok, prompts.OBJECT_TEMPLATES, "<cat-toy> <cat-toy>_1")
    assert ids.shape == (27, 77) and ids.dtype == np.int32
    assert (ids[:, 0] == 49406).all()
    assert ((ids == cat).sum(axis=1) == 1).all() and ((ids == cat1).sum(axis=1) == 1).all()
    # "a photo of a <cat-toy> <cat-toy>_1": BOS, 4 words, 2 placeholders, EOS, then padding.
    assert ids[0, 5:8].tolist() == [cat, cat1, 49407]


def test_tokenize_needs_a_max_length(tmp_path):
    from conftest import build_clip_tokenizer
    from transformers import CLIPTokenizer

    build_clip_tokenizer(tmp_path)
    # Built from vocab.json and merges.txt alone (tokenizer_config.json unread): model_max_length = 1e30.
    unset = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    with pytest.raises(UserError, match="model_max_length"):
        prompts.encode_templates(unset, prompts.STYLE_TEMPLATES, "<s>")


def test_tokenize_refuses_to_truncate_placeholders(clip_tokenizer):
    with pytest.raises(UserError, match="fewer vectors"):
        prompts.encode_templates(clip_tokenizer, ["a photo of {}"], " ".join(["cat"] * 80))


def test_template_ids_are_the_tokenizers_padded_encoding(clip_tokenizer):
    tokens = ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]
    clip_tokenizer.add_tokens(tokens)
    for templates in (prompts.OBJECT_TEMPLATES, prompts.STYLE_TEMPLATES):
        texts = [t.format(" ".join(tokens)) for t in templates]
        want = clip_tokenizer(texts, padding="max_length", max_length=77).input_ids
        np.testing.assert_array_equal(prompts.encode_templates(clip_tokenizer, templates, " ".join(tokens)), want)


def test_a_template_refusal_names_the_longest(clip_tokenizer):
    templates = ["a {}", "a photo of the large {} on a table", "the {}"]
    with pytest.raises(UserError) as err:
        prompts.encode_templates(clip_tokenizer, templates, " ".join(["cat"] * 76))
    assert str(err.value).startswith("prompt 'a photo of the large cat cat ... cat on a table' (76 placeholder tokens) "
                                     "is 86 tokens, more than the text encoder's 77")


# ---- the overflow rule ----------------------------------------------------------------------


def test_training_refuses_and_sampling_cuts(clip_tokenizer):
    text = "cat " * 100

    def refuse(length, limit):
        return f"{length} > {limit}"

    with pytest.raises(UserError, match="^102 > 77$"):  # BOS and EOS counted
        prompts.encode_prompt(clip_tokenizer, text, overflow=refuse)
    with pytest.warns(UserWarning, match="is 100 tokens long; only the first 75 are used"):
        ids = prompts.encode_prompt(clip_tokenizer, text, overflow=prompts.CUT)
    want = clip_tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.dtype == np.int32 and ids.tolist() == want
    fits = "cat " * 75  # exactly 77 with BOS and EOS: neither refused nor cut
    assert prompts.encode_prompt(clip_tokenizer, fits, overflow=refuse).tolist() == clip_tokenizer(fits).input_ids
    with pytest.raises(ValueError, match="overflow"):
        prompts.encode_prompt(clip_tokenizer, "a cat", overflow="refuse")
