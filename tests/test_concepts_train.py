"""Several concepts in one run, end to end on the tiny model: files per concept that PyTorch
diffusers loads, frozen weights, one concept equal to the flags' run, bitwise resume."""

import contextlib
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from ti_flax import TrainConfig, families, models, train
from ti_flax.training import checkpoint, logs
from ti_flax.errors import UserError

TOML = """
[[concepts]]
placeholder_token = "<cat-toy>"
initializer_token = "toy"
train_data_dir = "{toys}"
num_vectors = 2

[[concepts]]
placeholder_token = "<odd-style>"
initializer_token = "painting"
train_data_dir = "{odd}"
learnable_property = "style"
repeats = 20
weight = 2
"""


def write_concepts(folder, toys, odd, text=TOML):
    path = os.path.join(folder, "concepts.toml")
    with open(path, "w") as f:
        f.write(text.format(toys=toys, odd=odd))
    return path


def concepts_config(model_dir, concepts, out, **changes):
    base = dict(concepts=concepts, placeholder_token="", initializer_token="", train_data_dir="",
                max_train_steps=4, checkpointing_steps=2)
    base.update(changes)
    return TrainConfig.tiny(model_dir, "", str(out), **base)


@pytest.fixture(scope="module")
def two_concepts(tiny_model_dir, sample_images_dir, user_images_dir, tmp_path_factory, traces):
    """4 updates of 2 micro-batches on 4 devices from cached latents, two concepts (2 + 1
    vectors), every per-concept output switched on. Returns (config, result, callback records,
    traces of the step, the terminal output)."""
    folder = tmp_path_factory.mktemp("concepts")
    path = write_concepts(str(folder), sample_images_dir, user_images_dir)
    config = concepts_config(
        tiny_model_dir, path, folder / "out", save_steps=2, save_as_full_pipeline=True,
        validation_prompt="a photo of {}", validation_steps=4, validation_num_inference_steps=2,
        num_validation_images=4, cache_latents=True, gradient_accumulation_steps=2,
    )
    records, printed = [], io.StringIO()
    before = traces["train_step"]
    with contextlib.redirect_stdout(printed):
        result = train(config, callbacks=[records.append])
    return config, result, records, traces["train_step"] - before, printed.getvalue()


def embedding(path):
    (token, rows), = load_file(path).items()
    return token, rows


def test_each_concept_gets_its_files(two_concepts):
    config, result, records, traces, _ = two_concepts
    out = config.output_dir
    assert result.tokens == ["<cat-toy>", "<cat-toy>_1", "<odd-style>"] and result.rows.shape == (3, 32)
    for token, rows in (("<cat-toy>", result.rows[:2]), ("<odd-style>", result.rows[2:])):
        got_token, got = embedding(os.path.join(out, token, "learned_embeds.safetensors"))
        assert got_token == token
        np.testing.assert_array_equal(got, rows)
        assert os.path.isfile(os.path.join(out, token, "learned_embeds-steps-2.safetensors"))
        assert sorted(os.listdir(os.path.join(out, token, "validation"))) == [
            *(f"step-000004-{i}.png" for i in range(4)), "step-000004.png"]
    assert not os.path.exists(os.path.join(out, "learned_embeds.safetensors"))  # no file mixing two concepts
    grids = [r for r in records if r["kind"] == "validation"]
    assert [r["concept"] for r in grids] == ["<cat-toy>", "<odd-style>"]
    card = open(os.path.join(out, "README.md")).read()
    assert "`<cat-toy>/learned_embeds.safetensors`" in card and "`<odd-style>/learned_embeds.safetensors`" in card
    assert traces == 1  # one compiled step for both concepts


def test_each_concepts_loss_is_logged(two_concepts):
    config, result, _, _, _ = two_concepts
    with open(os.path.join(config.output_dir, logs.METRICS_FILE)) as f:
        lines = [json.loads(line) for line in f]
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4]
    # Over 4 steps of 4 examples both concepts were drawn; a step's loss is the mean over its
    # examples, so it lies between its concepts' means.
    for name in ("loss/<cat-toy>", "loss/<odd-style>"):
        assert any(name in line for line in steps)
    for line in steps:
        per = [line[k] for k in line if k.startswith("loss/")]
        assert min(per) - 1e-6 <= line["loss"] <= max(per) + 1e-6


def test_both_concepts_learn_and_the_frozen_weights_stay(two_concepts, tiny_model_dir):
    config, result, _, _, _ = two_concepts
    base = families.load_model(tiny_model_dir)
    table = models.token_table(base.params["text_encoder"])
    toy, painting = (base.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("toy", "painting"))
    assert not np.allclose(result.rows[:2], table[toy][None])
    assert not np.allclose(result.rows[2], table[painting])
    saved = families.load_model(config.output_dir)  # --save_as_full_pipeline, read back
    vocab = base.spec.base_vocab_size
    saved_table = models.token_table(saved.params["text_encoder"])
    np.testing.assert_array_equal(saved_table[:vocab], table)
    np.testing.assert_array_equal(saved_table[vocab:], result.rows)
    for part in ("unet", "vae"):
        for x, y in zip(jax.tree_util.tree_leaves(base.params[part]), jax.tree_util.tree_leaves(saved.params[part])):
            np.testing.assert_array_equal(x, y)
    for token, rows in (("<cat-toy>", result.rows[:2]), ("<odd-style>", result.rows[2:])):  # each in its folder
        np.testing.assert_array_equal(
            embedding(os.path.join(config.output_dir, "checkpoint-4", token, "learned_embeds.safetensors"))[1], rows)
    assert not os.path.exists(os.path.join(config.output_dir, "checkpoint-4", "learned_embeds.safetensors"))
    state = load_file(os.path.join(config.output_dir, "checkpoint-4", "state.safetensors"))
    # Rows, Adam's two moments and the accumulated gradient: every array is the rows' shape.
    assert {v.shape for v in state.values() if v.size > 1} == {(3, 32)}


def test_both_files_load_together_in_pytorch_diffusers(two_concepts, tiny_model_dir):
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline

    config, result, _, _, _ = two_concepts
    base = families.load_model(tiny_model_dir)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    for token in ("<cat-toy>", "<odd-style>"):
        pipe.load_textual_inversion(os.path.join(config.output_dir, token, "learned_embeds.safetensors"))
    vocab = base.spec.base_vocab_size
    assert pipe.tokenizer.convert_tokens_to_ids(result.tokens) == [vocab, vocab + 1, vocab + 2]
    table = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(table[vocab:], result.rows)
    prompt = pipe.maybe_convert_prompt("a photo of <cat-toy> in the style of <odd-style>", pipe.tokenizer)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch_hidden = pipe.text_encoder(ids)[0].numpy()
    flax_hidden = models.encode_text(base.spec, models.Compute(), base.params["text_encoder"],
                                     jnp.asarray(ids.numpy()), result.rows)
    assert np.abs(np.asarray(flax_hidden) - torch_hidden).max() < 1e-4


def test_resume_is_bitwise_identical(two_concepts, tmp_path):
    config, _, _, _, _ = two_concepts
    out = tmp_path / "resumed"
    shutil.copytree(os.path.join(config.output_dir, "checkpoint-2"), out / "checkpoint-2")
    resumed = config.replace(output_dir=str(out), resume_from_checkpoint="latest", validation_prompt=None,
                             save_steps=0, save_as_full_pipeline=False)
    result = train(resumed)
    assert [r["step"] for r in result.history] == [3, 4]
    for token in ("<cat-toy>", "<odd-style>"):
        name = os.path.join(token, "learned_embeds.safetensors")
        with open(out / name, "rb") as a, open(os.path.join(config.output_dir, name), "rb") as b:
            assert a.read() == b.read()


def test_resume_refuses_a_changed_concept(two_concepts, sample_images_dir, user_images_dir, tmp_path):
    config, _, _, _, _ = two_concepts
    out = tmp_path / "o"
    shutil.copytree(os.path.join(config.output_dir, "checkpoint-2"), out / "checkpoint-2")
    changed = write_concepts(str(tmp_path), sample_images_dir, user_images_dir, TOML.replace("weight = 2", "weight = 3"))
    with pytest.raises(UserError, match=r"cannot resume .*<odd-style> weight \(2.0 vs 3.0\)"):
        train(config.replace(concepts=changed, output_dir=str(out), resume_from_checkpoint="latest",
                             validation_prompt=None))
    assert sorted(os.listdir(out)) == ["checkpoint-2"]


def test_one_concept_in_a_file_is_the_single_concept_run(tiny_model_dir, sample_images_dir, tmp_path):
    one = TOML.split("[[concepts]]")[1]
    path = write_concepts(str(tmp_path), sample_images_dir, "", "[[concepts]]" + one)
    devices = jax.local_devices()[:1]
    from_file = train(concepts_config(tiny_model_dir, path, tmp_path / "file", max_train_steps=2,
                                      checkpointing_steps=0), devices=devices)
    from_flags = train(TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(tmp_path / "flags"), num_vectors=2,
                                        max_train_steps=2), devices=devices)
    np.testing.assert_array_equal(from_file.rows, from_flags.rows)
    with open(tmp_path / "file" / "<cat-toy>" / "learned_embeds.safetensors", "rb") as a, \
            open(tmp_path / "flags" / "learned_embeds.safetensors", "rb") as b:
        assert a.read() == b.read()


def test_validation_prompt_needs_a_slot_for_the_token(tiny_model_dir, sample_images_dir, user_images_dir, tmp_path):
    path = write_concepts(str(tmp_path), sample_images_dir, user_images_dir)
    bad = concepts_config(tiny_model_dir, path, tmp_path / "o", validation_prompt="a photo of <cat-toy>")
    with pytest.raises(UserError, match=r"--validation_prompt .* needs \{\}"):
        train(bad)
    assert not os.path.exists(tmp_path / "o")


def test_checkpoint_meta_lists_the_concepts(two_concepts):
    config, _, _, _, _ = two_concepts
    meta = checkpoint.read_meta(os.path.join(config.output_dir, "checkpoint-4"))
    assert [(c["placeholder_token"], c["num_vectors"], c["weight"], c["num_images"]) for c in meta["concepts"]] == [
        ("<cat-toy>", 2, 1.0, 4), ("<odd-style>", 1, 2.0, 3)]


def test_the_banner_lists_each_concept(two_concepts):
    printed = two_concepts[4]
    assert "textual inversion of 2 concepts" in printed
    assert "concept    <cat-toy>: 2 vector(s) from 'toy', 4 images (object), weight 1" in printed
    assert "concept    <odd-style>: 1 vector(s) from 'painting', 3 images (style), weight 2" in printed
    assert "cache latents on" in printed and "2 micro-batches per update" in printed


def test_a_concepts_error_names_the_concept(tiny_model_dir, sample_images_dir, user_images_dir, tmp_path):
    path = write_concepts(str(tmp_path), sample_images_dir, user_images_dir, TOML.replace('"painting"', '"two words"'))
    with pytest.raises(UserError, match=r"^concept <odd-style>: --initializer_token 'two words' must be a single token"):
        train(concepts_config(tiny_model_dir, path, tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")
