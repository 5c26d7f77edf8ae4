"""An SDXL run's results checked in PyTorch diffusers: `ti_flax.export --verify` of both SDXL
layouts (a StableDiffusionXLPipeline's encode_prompt against the SDXL family's condition), and the
--save_as_full_pipeline folder (StableDiffusionXLPipeline.from_pretrained reads it, both
tokenizers and text encoders hold the learned tokens, ti_flax loads it again)."""

import json
import os

import jax
import numpy as np
import pytest

from ti_flax import TrainConfig, families, formats, models, tokens
from ti_flax.training import outputs, run as run_mod
from ti_flax.commands import verify
from test_export import listing, run_cli
from ti_flax.errors import UserError

pytestmark = pytest.mark.slow

WIDTHS = (32, 48)  # the tiny SDXL model's text encoders: CLIP-L-like, bigG-like
TOKEN = "<cat-toy>"


def make_rows(n, width, seed):
    # Values with full float32 mantissas, so any rounding on the way would show.
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32) / 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """diffusers' SDXL pair of 2 vectors: (first file, rows for text_encoder, rows for text_encoder_2)."""
    rows, rows_2 = make_rows(2, WIDTHS[0], 0), make_rows(2, WIDTHS[1], 1)
    first, _ = formats.save_diffusers_sdxl(str(tmp_path_factory.mktemp("src") / "learned_embeds.safetensors"), TOKEN,
                                           rows, rows_2)
    return first, rows, rows_2


# ---- --verify ---------------------------------------------------------------------------------


def test_verify_passes_for_both_sdxl_layouts(tmp_path, tiny_sdxl_model_dir, pair, capsys):
    first = pair[0]
    code, stdout, err = run_cli([first, "-o", tmp_path / "pair", "--format", "diffusers-sdxl",
                                 "--verify", tiny_sdxl_model_dir], capsys)
    assert code == 0, err
    pair_out = [str(tmp_path / "pair" / name) for name in ("learned_embeds.safetensors", "learned_embeds_2.safetensors")]
    assert f"verified {pair_out[0]} + {pair_out[1]} in diffusers (PyTorch) as {TOKEN}" in stdout
    code, stdout_2, err = run_cli([first, "-o", tmp_path / "one", "--format", "sdxl", "--verify", tiny_sdxl_model_dir],
                                  capsys)
    assert code == 0, err
    assert f"verified {tmp_path / 'one' / 'cat-toy.safetensors'} in diffusers (PyTorch)" in stdout_2
    for out in (stdout, stdout_2):
        assert "(ids [49408, 49409])" in out
        assert float(out.split("max abs difference to Flax ")[1].split()[0]) <= verify.TOLERANCE
    assert listing(tmp_path / "pair") == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    assert listing(tmp_path / "one") == ["cat-toy.safetensors"]


def test_verify_finds_rows_changed_in_one_text_encoder(tiny_sdxl_model_dir, pair):
    first, rows, rows_2 = pair
    second = first.replace("learned_embeds", "learned_embeds_2")
    tampered = rows_2.copy()
    tampered[1, 5] += 0.01  # what the second file should hold, but does not
    with pytest.raises(UserError, match=r"rows diffusers loaded \(tokenizer_2, text_encoder_2\) differ"):
        verify.verify_files(tiny_sdxl_model_dir, (rows, tampered), [((first, second), TOKEN, False)])


def test_verify_fails_in_one_line_when_flax_and_pytorch_disagree(tmp_path, tiny_sdxl_model_dir, pair, capsys,
                                                                  monkeypatch):
    family = families.get("sdxl")
    condition = family.condition

    def off_pooled(*args):
        cond = condition(*args)
        return cond._replace(text_embeds=cond.text_embeds + 1e-3)

    monkeypatch.setattr(family, "condition", off_pooled)
    code, _, err = run_cli([pair[0], "-o", tmp_path / "out", "--format", "sdxl", "--verify", tiny_sdxl_model_dir],
                           capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "differ by 0.001" in err and "pooled_prompt_embeds" in err
    assert not (tmp_path / "out").exists() or listing(tmp_path / "out") == []


def test_verify_refuses_a_model_of_the_other_family_in_one_line(tmp_path, tiny_sdxl_model_dir, pair, capsys):
    sd_model = tmp_path / "sd"  # all the width check reads of an SD 1.x folder
    (sd_model / "text_encoder").mkdir(parents=True)
    (sd_model / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": WIDTHS[0]}))
    sd_file = formats.save_diffusers(str(tmp_path / "sd1" / "learned_embeds.safetensors"), TOKEN, make_rows(1, 32, 2))
    cases = [
        ([pair[0], "--format", "sdxl", "--verify", sd_model],
         "an SD 1.x model (1 text encoder: text_encoder/), but the embedding holds rows for 2"),
        ([sd_file, "--verify", tiny_sdxl_model_dir],
         "an SDXL model (2 text encoders: text_encoder/, text_encoder_2/), but the embedding holds rows for 1"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(argv + ["-o", tmp_path / "out"], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


# ---- --save_as_full_pipeline ------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tiny_sdxl_model_dir, sample_images_dir, tmp_path_factory):
    """A prepared 2-vector SDXL run with --save_as_full_pipeline, its outputs saved for known rows
    (no training: the outputs are what is checked)."""
    out = tmp_path_factory.mktemp("sdxl-run")
    config = TrainConfig.tiny(tiny_sdxl_model_dir, sample_images_dir, str(out), num_vectors=2,
                              save_as_full_pipeline=True)
    run = run_mod.prepare(config, devices=jax.local_devices()[:1])
    rows = make_rows(2, sum(WIDTHS), 3)
    written = outputs.save_outputs(run, rows, [{"step": 1, "loss": 0.5}])
    return run, rows, written


def test_full_pipeline_loads_in_pytorch_sdxl_with_the_tokens_in_both_encoders(saved_run, tiny_sdxl_model_dir):
    from diffusers import StableDiffusionXLPipeline

    run, rows, written = saved_run
    out = run.config.output_dir
    assert written["pipeline"] == out
    with open(os.path.join(out, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    vocab = len(base.tokenizer)
    parts = (rows[:, :WIDTHS[0]], rows[:, WIDTHS[0]:])
    for suffix, part in zip(("", "_2"), parts):
        tokenizer, text_encoder = getattr(pipe, "tokenizer" + suffix), getattr(pipe, "text_encoder" + suffix)
        assert tokenizer.convert_tokens_to_ids(run.tokens) == [vocab, vocab + 1]
        table = text_encoder.get_input_embeddings().weight.detach().numpy()
        assert table.shape == (vocab + 2, part.shape[1])
        np.testing.assert_array_equal(table[vocab:], part)
    assert pipe.tokenizer_2.pad_token == "!"  # SDXL's second tokenizer keeps its own padding
    # Every frozen weight and config as in the model trained on.
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        saved, source = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert saved.keys() == source.keys(), name
        for key, value in source.items():
            if "token_embedding" not in key:
                assert np.array_equal(saved[key].numpy(), value.numpy()), f"{name}: {key}"
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    for name in ("unet", "vae", "scheduler"):
        assert public(getattr(pipe, name).config) == public(getattr(base, name).config), name


def test_full_pipeline_loads_in_ti_flax_again(saved_run):
    run, rows, _ = saved_run
    saved = families.load_model(run.config.output_dir)
    vocab = run.model.spec.base_vocab_size
    assert saved.spec.family == "sdxl" and saved.spec.base_vocab_size == vocab + 2
    for tokenizer in saved.tokenizers:
        assert tokenizer.convert_tokens_to_ids(run.tokens) == [vocab, vocab + 1]
    for table, part in zip(models.token_tables(saved.params), tokens.split_rows(rows, saved.spec.text_widths)):
        np.testing.assert_array_equal(table[vocab:], part)


def test_sdxl_run_writes_both_layouts_and_a_card_that_names_them(saved_run):
    run, _, written = saved_run
    out = run.config.output_dir
    for kind, name in (("diffusers", "learned_embeds.safetensors"), ("diffusers_2", "learned_embeds_2.safetensors"),
                       ("sdxl", "cat-toy.safetensors")):
        assert written[kind] == os.path.join(out, name)
    card = open(written["model_card"]).read()
    assert 'pipe.load_textual_inversion("learned_embeds_2.safetensors", text_encoder=pipe.text_encoder_2, ' in card
    assert "`embedding:cat-toy`" in card
