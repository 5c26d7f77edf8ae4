"""Tests for ti_flax.sampling.sampler and ti_flax.generate on the tiny model (32x32 pixels, 3 steps).

Most tests share one compiled program (pndm, 3 steps, 32x32, one image per device on the 4
fake devices); only the scheduler comparison and the 1-device run compile more.
"""

import functools
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from ti_flax.commands import generate as gen
from ti_flax import families, models
from ti_flax.data import prompts
from ti_flax.sampling import sampler
from ti_flax.errors import UserError

HIDDEN = 32  # the tiny model's text width
STEPS = 3


def write_diffusers(path, token, rows):
    save_file({token: np.asarray(rows, np.float32)}, str(path), metadata={"format": "pt"})
    return str(path)


def write_a1111(path, name, rows):
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.tensor(np.asarray(rows, np.float32))},
            "name": name,
            "step": 500,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        },
        str(path),
    )
    return str(path)


def random_rows(n, seed, scale=1.0):
    return (np.random.default_rng(seed).normal(size=(n, HIDDEN)) * scale).astype(np.float32)


def read_pngs(paths):
    return np.stack([np.asarray(Image.open(p)) for p in paths])


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return families.load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def torch_pipe(tiny_model_dir):
    import diffusers

    # One torch thread: beside XLA's threads on a small machine, more only spin (10x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_scheduler_config = dict(pipe.scheduler.config)  # tests swap the scheduler
    yield pipe
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("embeddings")
    return {
        "cat": write_diffusers(d / "learned_embeds.safetensors", "<cat-toy>", random_rows(2, 0)),
        "style": write_a1111(d / "my-style.pt", "my-style", random_rows(3, 1)),
        "bad": write_diffusers(d / "bad.safetensors", "<bad>", random_rows(1, 2)),
        "dir": str(d),
    }


def expected_images(model, prompt_text, negative_text, rows, n, seed=0, token_lists=()):
    """What generate must produce, computed through the Sampler with the prompts spelled out."""
    tokenizer = models.load_tokenizer(os.path.join(model.model_dir, "tokenizer"))
    for tokens in token_lists:
        tokenizer.add_tokens(tokens)
    s = sampler.Sampler.from_model(model, num_images=n, num_inference_steps=STEPS)
    ids = prompts.encode_prompt(tokenizer, prompt_text, overflow=prompts.CUT)
    neg = prompts.encode_prompt(tokenizer, negative_text, overflow=prompts.CUT)
    return s.sample(rows, ids, neg, seed)


# ---- generate -----------------------------------------------------------------------------


def test_generate_from_diffusers_file(model, tiny_model_dir, files, tmp_path):
    out = tmp_path / "out"
    paths = gen.generate(tiny_model_dir, "a photo of <cat-toy>", [files["cat"]], num_images=2, steps=STEPS,
                         seed=7, output_dir=str(out))
    assert paths == [str(out / "000.png"), str(out / "001.png")]
    assert sorted(os.listdir(out)) == ["000.png", "001.png"]  # no temporary files left behind
    images = read_pngs(paths)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert "a photo of <cat-toy>" in Image.open(paths[0]).info["parameters"]
    # "<cat-toy>" stands for both of its vectors, as in diffusers.
    want = expected_images(model, "a photo of <cat-toy> <cat-toy>_1", "", random_rows(2, 0), 2, seed=7,
                           token_lists=[["<cat-toy>", "<cat-toy>_1"]])
    np.testing.assert_array_equal(images, want)


def test_generate_from_a1111_file(model, tiny_model_dir, files, tmp_path):
    paths = gen.generate(tiny_model_dir, "a painting in my-style", [files["style"]], num_images=2, steps=STEPS,
                         output_dir=str(tmp_path))
    images = read_pngs(paths)
    tokens = ["my-style", "my-style_1", "my-style_2"]  # the A1111 name, 3 vectors
    want = expected_images(model, "a painting in " + " ".join(tokens), "", random_rows(3, 1), 2, token_lists=[tokens])
    np.testing.assert_array_equal(images, want)
    # Other rows give other images: the embedding reaches the UNet.
    changed = expected_images(model, "a painting in " + " ".join(tokens), "", random_rows(3, 1, scale=3.0), 2,
                              token_lists=[tokens])
    assert np.abs(changed.astype(int) - images).max() > 0


def test_two_embeddings_in_one_prompt_and_one_in_the_negative(model, tiny_model_dir, files, tmp_path):
    prompt = "<cat-toy> sitting, in my-style"
    args = [files["cat"], files["style"], files["bad"]]
    paths = gen.generate(tiny_model_dir, prompt, args, negative_prompt="<bad>, blurry", num_images=2,
                         steps=STEPS, output_dir=str(tmp_path / "one"))
    images = read_pngs(paths)
    token_lists = [["<cat-toy>", "<cat-toy>_1"], ["my-style", "my-style_1", "my-style_2"], ["<bad>"]]
    rows = np.concatenate([random_rows(2, 0), random_rows(3, 1), random_rows(1, 2)])
    spelled = "<cat-toy> <cat-toy>_1 sitting, in my-style my-style_1 my-style_2"
    want = expected_images(model, spelled, "<bad>, blurry", rows, 2, token_lists=token_lists)
    np.testing.assert_array_equal(images, want)
    # The negative embedding is used: other rows for <bad> change the images.
    rows[-1] *= 3.0
    changed = expected_images(model, spelled, "<bad>, blurry", rows, 2, token_lists=token_lists)
    assert np.abs(changed.astype(int) - images).max() > 0


def test_tokens_come_from_the_argument_the_file_or_the_file_name(model, files, tmp_path):
    kohya = tmp_path / "kohya-thing.safetensors"
    save_file({"emb_params": random_rows(2, 4)}, str(kohya))
    tokenizer = models.load_tokenizer(os.path.join(model.model_dir, "tokenizer"))
    args = [files["cat"] + ":<kitty>", str(kohya), files["style"], (files["bad"], "<worse>")]
    concepts, rows = gen.load_concepts(tokenizer, model.spec, args)
    assert concepts == [
        ["<kitty>", "<kitty>_1"],  # FILE:TOKEN renames
        ["kohya-thing", "kohya-thing_1"],  # no token in the file: its name
        ["my-style", "my-style_1", "my-style_2"],  # the A1111 name
        ["<worse>"],
    ]
    # Row i belongs to token id base_vocab_size + i, in the order given.
    base = model.spec.base_vocab_size
    assert tokenizer.convert_tokens_to_ids(sum(concepts, [])) == list(range(base, base + 8))
    want = np.concatenate([random_rows(2, 0), random_rows(2, 4), random_rows(3, 1), random_rows(1, 2)])
    np.testing.assert_array_equal(rows, want)
    assert gen.parse_embedding_arg("no/such/file.pt:tok") == ("no/such/file.pt:tok", None)
    with pytest.raises(UserError, match="no/such/file.pt:tok"):
        gen.load_concepts(models.load_tokenizer(os.path.join(model.model_dir, "tokenizer")), model.spec,
                          ["no/such/file.pt:tok"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=30), "--height 30: must be a positive multiple of 8"),
        (dict(width=36), "--width 36: must be a positive multiple of 8"),
        (dict(width=0), "--width 0"),
        (dict(steps=0), "--steps"),
        (dict(seed=2**32), "--seed"),
        (dict(num_images=0), "--num_images"),
        (dict(scheduler="lms"), "--scheduler"),
    ],
)
def test_bad_settings_are_clear_errors(tiny_model_dir, tmp_path, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        gen.generate(tiny_model_dir, "a cat", output_dir=str(out), **kwargs)
    assert not out.exists()  # nothing written


def test_bad_embeddings_are_clear_errors(model, tiny_model_dir, files, tmp_path):
    wide = write_diffusers(tmp_path / "wide.safetensors", "<wide>", np.zeros((1, 768), np.float32))
    with pytest.raises(UserError, match="width is 768 but the text encoder's width is 32"):
        gen.generate(tiny_model_dir, "<wide>", [wide], output_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    tokenizer = models.load_tokenizer(os.path.join(model.model_dir, "tokenizer"))
    known = write_a1111(tmp_path / "cat.pt", "cat", random_rows(1, 3))  # "cat" is a CLIP word
    with pytest.raises(UserError, match="'cat' is already in the tokenizer's vocabulary"):
        gen.load_concepts(tokenizer, model.spec, [files["style"], known])
    with pytest.raises(UserError, match="'<cat-toy>' is also used by"):
        gen.load_concepts(tokenizer, model.spec, [files["cat"], files["cat"]])
    spaced = write_a1111(tmp_path / "my style.pt", "my style", random_rows(1, 3))
    with pytest.raises(UserError, match="not one word"):
        gen.load_concepts(tokenizer, model.spec, [spaced])
    assert len(tokenizer) == model.spec.base_vocab_size  # failed calls left the tokenizer untouched
    gen.load_concepts(tokenizer, model.spec, [spaced + ":<my-style>"])  # renaming fixes it


def test_cli(tiny_model_dir, files, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--pretrained_model_name_or_path", tiny_model_dir, "--embeddings", files["cat"], "--prompt",
            "<cat-toy>", "--num_images", "1", "--steps", str(STEPS), "--output_dir", str(out)]
    assert gen.main(argv + ["--height", "20"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --height 20: must be a positive multiple of 8\n"
    assert gen.main(argv + ["--prompt", "no token here"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(out / "000.png")]
    assert "warning: embedding token <cat-toy> appears in neither" in captured.err


def test_package_attribute_is_the_function(tiny_model_dir):
    import ti_flax

    with pytest.raises(UserError, match="--num_images 0"):
        ti_flax.generate(tiny_model_dir, "a cat", num_images=0)


# ---- prompts ------------------------------------------------------------------------------


def test_encode_prompt_expands_multi_vector_tokens(tiny_model_dir):
    tok = models.load_tokenizer(os.path.join(tiny_model_dir, "tokenizer"))
    tokens = ["<t>", "<t>_1", "<t>_2"]
    tok.add_tokens(tokens)

    def reference(text):
        return tok(text, padding="max_length", max_length=77, truncation=True).input_ids

    assert list(prompts.encode_prompt(tok, "a photo of a cat", overflow=prompts.CUT)) == reference("a photo of a cat")
    assert (list(prompts.encode_prompt(tok, "a <t> toy, <t>", [tokens], overflow=prompts.CUT))
            == reference("a <t> <t>_1 <t>_2 toy, <t> <t>_1 <t>_2"))
    spelled = "a <t> <t>_1 <t>_2 toy"
    assert list(prompts.encode_prompt(tok, spelled, [tokens], overflow=prompts.CUT)) == reference(spelled)
    with pytest.warns(UserWarning, match="only the first 75"):
        ids = prompts.encode_prompt(tok, "cat " * 100, overflow=prompts.CUT)
    assert list(ids) == reference("cat " * 100)


# ---- the sampler --------------------------------------------------------------------------


def test_sampler_compiles_once_and_is_deterministic(model, traces):
    tok = model.tokenizer
    tok.add_tokens(["<s>"])  # id base_vocab_size: reads rows[0]
    ids = prompts.encode_prompt(tok, "a photo of <s>", overflow=prompts.CUT)
    neg = prompts.encode_prompt(tok, "", overflow=prompts.CUT)
    s = sampler.Sampler.from_model(model, num_images=3, num_inference_steps=STEPS)
    before = traces["sample_step"]
    a = s.sample(random_rows(1, 0), ids, neg, seed=0)
    first = traces["sample_step"]
    assert first - before <= 1  # 0 when an earlier test compiled these settings already
    again = s.sample(random_rows(1, 0), ids, neg, seed=0)
    other_rows = s.sample(random_rows(1, 5), ids, neg, seed=0)
    more_rows = s.sample(random_rows(5, 5), ids, neg, seed=0)  # same row bucket: no retrace
    other_seed = s.sample(random_rows(1, 0), ids, neg, seed=1)
    # A second Sampler with the same settings and another guidance scale reuses the program.
    s2 = sampler.Sampler.from_model(model, num_images=3, num_inference_steps=STEPS, guidance_scale=2.0)
    s2.sample(random_rows(1, 0), ids, neg, seed=0)
    assert traces["sample_step"] == first
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, again)
    assert np.abs(a.astype(int) - other_rows).max() > 0
    assert np.abs(other_rows.astype(int) - more_rows).max() == 0  # rows past the prompt's ids are unused
    assert np.abs(a.astype(int) - other_seed).mean() > 10
    assert np.abs(a[0].astype(int) - a[1]).mean() > 10  # each image has its own noise


def test_images_do_not_depend_on_the_device_count(model):
    ids = prompts.encode_prompt(model.tokenizer, "a photo of a cat", overflow=prompts.CUT)
    neg = prompts.encode_prompt(model.tokenizer, "", overflow=prompts.CUT)
    rows = np.zeros((0, HIDDEN), np.float32)
    four = sampler.Sampler.from_model(model, num_images=3, num_inference_steps=STEPS).sample(rows, ids, neg, 3)
    one = sampler.Sampler.from_model(model, num_images=3, num_inference_steps=STEPS, devices=jax.local_devices()[:1])
    np.testing.assert_array_equal(one.sample(rows, ids, neg, 3), four)


@pytest.mark.parametrize("name, torch_name, options, torch_options", [
    ("pndm", "PNDMScheduler", {}, {}),
    ("ddim", "DDIMScheduler", {}, {}),
    ("dpm", "DPMSolverMultistepScheduler", {}, {}),
    # linspace spacing gives fractional timesteps (the model's config says "leading").
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "linspace"}, {}),
])
def test_schedulers_match_diffusers_pytorch(model, torch_pipe, name, torch_name, options, torch_options):
    """The denoising loop gives the latents diffusers' PyTorch pipeline gives from the same noise."""
    import diffusers

    config = dict(torch_pipe.model_scheduler_config, **options, **torch_options)
    torch_pipe.scheduler = getattr(diffusers, torch_name).from_config(config)
    prompt = "a photo of a cat"
    ids = np.stack([prompts.encode_prompt(model.tokenizer, prompt, overflow=prompts.CUT)] * 2)
    neg = np.stack([prompts.encode_prompt(model.tokenizer, "", overflow=prompts.CUT)] * 2)
    config = dict(model.scheduler_config, **options)
    settings = sampler.Sampler(model.spec, model.params, config, num_inference_steps=STEPS, scheduler=name).settings
    noise = np.random.default_rng(5).normal(size=(2, 4, 16, 16)).astype(np.float32)
    denoise = jax.jit(functools.partial(sampler.denoise, settings=settings))
    frozen = families.Frozen.from_model(model, "float32")
    latents = denoise(frozen, np.zeros((1, HIDDEN), np.float32), ids, neg, noise, np.float32(3.0))
    ref = torch_pipe(prompt, num_inference_steps=STEPS, guidance_scale=3.0, latents=torch.from_numpy(noise),
                     num_images_per_prompt=2, height=32, width=32, output_type="latent").images
    np.testing.assert_allclose(np.asarray(latents), ref.numpy(), rtol=1e-3, atol=1e-3)


def test_sampler_images_match_diffusers_pytorch(model, torch_pipe):
    """Noise, denoising, VAE decode and uint8 conversion together, through the shared program."""
    import diffusers

    torch_pipe.scheduler = diffusers.PNDMScheduler.from_config(torch_pipe.model_scheduler_config)
    prompt = "a photo of a cat"
    s = sampler.Sampler.from_model(model, num_images=2, num_inference_steps=STEPS, guidance_scale=3.0)
    ids, neg = (prompts.encode_prompt(model.tokenizer, text, overflow=prompts.CUT) for text in (prompt, ""))
    images = s.sample(np.zeros((1, HIDDEN), np.float32), ids, neg, seed=5)
    key = jax.random.key_data(jax.random.key(5))
    noise = np.array(sampler.image_noise(key, np.arange(2), sampler.latent_shape(s.settings)))
    ref = torch_pipe(prompt, num_inference_steps=STEPS, guidance_scale=3.0, latents=torch.from_numpy(noise),
                     num_images_per_prompt=2, height=32, width=32, output_type="np").images
    assert np.abs(images.astype(int) - (ref * 255).round()).max() <= 1
    assert np.abs(images[0].astype(int) - images[1]).mean() > 10


def test_unsupported_scheduler_config_is_rejected():
    sd = families.get("sd1")
    with pytest.raises(UserError, match="use_karras_sigmas=true is not supported by the euler sampler"):
        sd.sampling_plan("euler", {"use_karras_sigmas": True}, 10, (64, 64))
    # Every spacing diffusers' PyTorch schedulers know runs with every sampler.
    for name in sampler.SCHEDULERS:
        config = {"skip_prk_steps": True, "timestep_spacing": "trailing"}
        assert sd.sampling_plan(name, config, 10, (64, 64)).num_steps >= 10
