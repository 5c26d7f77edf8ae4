"""Sampling an SDXL model: the sampler against diffusers' StableDiffusionXLPipeline, generate with
SDXL embedding files (in the prompt and as a negative embedding), and validation images during
an SDXL training run.

One short training run (2 steps, validation at step 2) writes the SDXL embedding files that the
generate tests load; generate then runs the program the validation compiled, and from the same
rows draws the same images. Three compiles in all: the denoising loop alone (for the PyTorch
comparison), the train step, and the sampling program.
"""

import copy
import dataclasses
import functools
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from ti_flax import TrainConfig, families, train
from ti_flax.data import prompts
from ti_flax.sampling import sampler
from ti_flax.commands import generate as gen
from ti_flax import tokens as tokens_lib

pytestmark = pytest.mark.slow

WIDTHS = (32, 48)  # the tiny SDXL model's CLIP-L-like and bigG-like widths
STEPS = 2
PROMPT = "a photo of <cat-toy>"
NUM_IMAGES = 2


def devices():
    """Training, validation and generate all run on the 4 test devices here: the training step is
    then test_sdxl_train.py's reference step and the sampling program the notebook's SDXL
    validation, so the session's compilation cache serves them (the same program for all)."""
    return jax.local_devices()[:4]


@pytest.fixture(scope="module")
def model(tiny_sdxl_model_dir):
    return families.load_model(tiny_sdxl_model_dir)


@pytest.fixture(scope="module")
def trained(tiny_sdxl_model_dir, sample_images_dir, tmp_path_factory, traces):
    """(config, TrainResult, validation records, sampling traces) of a 2-step SDXL run validated at step 2."""
    out = tmp_path_factory.mktemp("sdxl-run")
    config = TrainConfig.tiny(tiny_sdxl_model_dir, sample_images_dir, str(out), num_vectors=2, max_train_steps=2,
                              validation_prompt=PROMPT, validation_steps=2, validation_num_inference_steps=STEPS,
                              num_validation_images=NUM_IMAGES)
    events = []
    before = traces["sample_step"]
    result = train(config, callbacks=[events.append], devices=devices())
    traces = traces["sample_step"] - before
    return config, result, [e for e in events if e["kind"] == "validation"], traces


def read_pngs(paths):
    return np.stack([np.asarray(Image.open(p)) for p in paths])


def generate(tiny_sdxl_model_dir, out, embeddings, prompt=PROMPT, negative_prompt=""):
    """generate with the validation's settings (its guidance scale, seed and default scheduler)."""
    paths = gen.generate(tiny_sdxl_model_dir, prompt, embeddings, negative_prompt=negative_prompt, num_images=NUM_IMAGES,
                         steps=STEPS, guidance_scale=7.5, seed=0, output_dir=str(out), devices=devices())
    return read_pngs(paths)


def sampler_for(model, embeddings):
    """(sample(prompt, negative_prompt) -> images, as generate draws them) for `embeddings`, through a
    Sampler on the module's model (no model load)."""
    tokenizers = tuple(copy.deepcopy(t) for t in model.tokenizers)
    concepts, rows = gen.load_concepts(tokenizers, model.spec, embeddings)
    s = sampler.Sampler.from_model(model, num_images=NUM_IMAGES, num_inference_steps=STEPS, devices=devices())

    def sample(prompt, negative_prompt):
        ids, neg = (prompts.encode_prompt(tokenizers[0], text, concepts, overflow=prompts.CUT)
                    for text in (prompt, negative_prompt))
        return s.sample(rows, ids, neg, seed=0)

    return sample


# ---- the denoising loop against PyTorch diffusers ----------------------------------------


def test_latents_match_diffusers_sdxl_pipeline(model, tiny_sdxl_model_dir):
    """A learned token in the prompt and in a negative prompt; an empty negative prompt is zeros
    (force_zeros_for_empty_prompt), a non-empty one is encoded, each image on its own."""
    from diffusers import StableDiffusionXLPipeline

    rows = np.random.default_rng(0).normal(size=(2, sum(WIDTHS))).astype(np.float32)
    names = ["<t>", "<t>_1"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    first, second = torch.from_numpy(rows[:, : WIDTHS[0]]), torch.from_numpy(rows[:, WIDTHS[0]:])
    pipe.load_textual_inversion({"<t>": first}, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion({"<t>": second}, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    assert pipe.scheduler.__class__.__name__ == "EulerDiscreteScheduler"

    tokenizer = copy.deepcopy(model.tokenizer)
    tokens_lib.add_placeholder_tokens(tokenizer, names)
    prompt, negative = "a photo of <t> on a table", "blurry <t>, dark"
    ids = np.stack([prompts.encode_prompt(tokenizer, prompt, [names], overflow=prompts.CUT)] * 2)
    neg = np.stack([prompts.encode_prompt(tokenizer, text, [names], overflow=prompts.CUT) for text in ("", negative)])
    # The settings of validation and generate below (euler: the folder's scheduler), so the
    # sampling program compiled here serves them all.
    s = sampler.Sampler.from_model(model, num_images=NUM_IMAGES, num_inference_steps=STEPS, devices=devices())
    assert s.settings.scheduler == "euler" and s.settings.zero_empty_negative  # the folder's own choices
    key = jax.random.key_data(jax.random.key(5))
    noise = np.array(sampler.image_noise(key, np.arange(NUM_IMAGES), sampler.latent_shape(s.settings)))
    denoise = jax.jit(functools.partial(sampler.denoise, settings=s.settings))
    latents = np.asarray(denoise(families.Frozen.from_model(model), rows, ids, neg, noise, np.float32(3.0)))

    def reference(i, negative_prompt, output_type="latent"):
        return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=STEPS, guidance_scale=3.0,
                    latents=torch.from_numpy(noise[i : i + 1]), height=32, width=32,
                    output_type=output_type).images

    for i, negative_prompt in enumerate([None, negative]):  # None: diffusers' zeros
        np.testing.assert_allclose(latents[i : i + 1], reference(i, negative_prompt).numpy(), rtol=1e-4, atol=1e-4)
    # The zeros matter: the encoded empty text (what diffusers computes for negative_prompt="") differs.
    assert np.abs(reference(0, "").numpy() - latents[:1]).max() > 1e-2
    # The whole program (noise from the seed, denoising, VAE decode, uint8) gives diffusers' images.
    images = s.sample(rows, ids, neg, seed=5, guidance_scale=3.0)
    for i, negative_prompt in enumerate([None, negative]):
        assert np.abs(images[i].astype(int) - (reference(i, negative_prompt, "np")[0] * 255).round()).max() <= 1


def test_force_zeros_setting_is_read_from_the_model_folder(model, tmp_path):
    assert families.of(model.spec).zero_empty_negative(model)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"force_zeros_for_empty_prompt": false}')
    assert not families.of(model.spec).zero_empty_negative(dataclasses.replace(model, model_dir=str(folder)))
    assert sampler.Sampler(model.spec, model.params, model.scheduler_config).settings.zero_empty_negative


# ---- validation during SDXL training, and generate with its files -----------------------


def test_sdxl_training_writes_validation_images(trained):
    config, result, validations, traces = trained
    folder = os.path.join(config.output_dir, "validation")
    names = {f"step-000002-{i}.png" for i in range(NUM_IMAGES)} | {"step-000002.png"}
    assert set(os.listdir(folder)) == names
    assert [v["step"] for v in validations] == [2]
    images = read_pngs(validations[0]["images"])
    assert images.shape == (NUM_IMAGES, 32, 32, 3)
    assert np.abs(images[0].astype(int) - images[1]).mean() > 5  # each image has its own noise
    assert traces <= 1  # 0 when another test compiled these settings already
    assert {"diffusers", "diffusers_2", "sdxl"} <= set(result.files)


def test_generate_with_sdxl_files_gives_the_validation_images(tiny_sdxl_model_dir, trained, tmp_path, traces):
    """diffusers' pair and the {clip_l, clip_g} file load the final rows; generate with the
    validation's settings draws the validation images, with the program the validation compiled."""
    _, result, validations, _ = trained
    before = traces["sample_step"]
    pair = generate(tiny_sdxl_model_dir, tmp_path / "pair", [result.files["diffusers"]])
    single = generate(tiny_sdxl_model_dir, tmp_path / "single", [result.files["sdxl"] + ":<cat-toy>"])
    assert traces["sample_step"] == before
    np.testing.assert_array_equal(pair, single)
    np.testing.assert_array_equal(pair, read_pngs(validations[0]["images"]))


def test_sdxl_embedding_as_a_negative_embedding(model, tiny_sdxl_model_dir, trained, tmp_path, traces):
    result = trained[1]
    bad_rows = np.random.default_rng(1).normal(size=(2, sum(WIDTHS))).astype(np.float32)
    families.get("sdxl").save_embedding(str(tmp_path / "bad"), "<bad>", bad_rows, WIDTHS)
    families.get("sdxl").save_embedding(str(tmp_path / "worse"), "<worse>", bad_rows * 3.0, WIDTHS)
    args = [result.files["diffusers"], str(tmp_path / "bad")]  # a file of the pair; a folder holding one
    before = traces["sample_step"]
    images = generate(tiny_sdxl_model_dir, tmp_path / "out", args, negative_prompt="<bad>, blurry")
    sample = sampler_for(model, args + [str(tmp_path / "worse")])
    np.testing.assert_array_equal(images, sample(PROMPT, "<bad>, blurry"))
    # The negative embedding reaches the UNet: other rows in its place, or none, give other images.
    assert np.abs(sample(PROMPT, "<worse>, blurry").astype(int) - images).max() > 0
    assert np.abs(sample(PROMPT, "blurry").astype(int) - images).max() > 0
    assert traces["sample_step"] == before  # new negative prompts and rows: nothing recompiled


def test_sd1_embedding_for_the_sdxl_model_is_one_line(tiny_sdxl_model_dir, tmp_path, capsys):
    from safetensors.numpy import save_file

    sd1 = str(tmp_path / "sd1.safetensors")
    save_file({"<old>": np.zeros((1, WIDTHS[0]), np.float32)}, sd1)
    out = tmp_path / "o"
    argv = ["--pretrained_model_name_or_path", tiny_sdxl_model_dir, "--embeddings", sd1, "--prompt", "<old>",
            "--output_dir", str(out)]
    assert gen.main(argv) == 2
    assert capsys.readouterr().err == (f"error: --embeddings {sd1}: is an SD 1.x / 2.x embedding (one text "
                                       "encoder); this model has 2 (SDXL): pass an SDXL embedding (clip_l/clip_g)\n")
    assert not out.exists()


def test_load_concepts_adds_tokens_to_both_tokenizers(model, trained):
    result = trained[1]
    tokenizers = tuple(copy.deepcopy(t) for t in model.tokenizers)
    concepts, rows = gen.load_concepts(tokenizers, model.spec, [result.files["diffusers"]])
    assert concepts == [["<cat-toy>", "<cat-toy>_1"]]
    base = model.spec.base_vocab_size
    for tokenizer in tokenizers:
        assert tokenizer.convert_tokens_to_ids(concepts[0]) == [base, base + 1]
    np.testing.assert_array_equal(rows, result.rows)
