"""Pivotal tuning (--lora_rank): the rows and a LoRA of the UNet trained together, and the LoRA
files that PyTorch diffusers (PEFT's layout, and kohya's through its converter) and A1111 read.

One short run per family (SD 1.x with its 1x1-conv proj_in/proj_out adapted too; SDXL, whose
kohya names are the original block names), shared by the module's tests: each file is loaded by
diffusers' `load_lora_weights` and its UNet's output compared with ours with the run's factors.
"""

import dataclasses
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from ti_flax import TrainConfig, families, models, train
from ti_flax.errors import UserError
from ti_flax.formats import lora as lora_files
from ti_flax.models import lora as lora_lib
from ti_flax.training import checkpoint, step as step_lib

TOKEN = "<cat-toy>"


def lora_config(model_dir, data_dir, output_dir, **changes):
    # A LoRA rate high enough that four updates move B well away from zero.
    return TrainConfig.tiny(model_dir, data_dir, str(output_dir), lora_rank=4, lora_alpha=8.0, lora_learning_rate=3e-2,
                            num_vectors=2, **changes)


@pytest.fixture(scope="module")
def sd1_run(tiny_model_dir, sample_images_dir, tmp_path_factory):
    config = lora_config(tiny_model_dir, sample_images_dir, tmp_path_factory.mktemp("lora-sd1"),
                         lora_targets="attn,proj", checkpointing_steps=2, save_steps=2, save_as_full_pipeline=True,
                         validation_prompt="a photo of <cat-toy>", validation_steps=4, num_validation_images=1,
                         validation_num_inference_steps=2, validation_loss_steps=2)
    return config, train(config)


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_model_dir, sample_images_dir, tmp_path_factory):
    # Two micro-batches per update: the pivot must not stop the update count (checkpoint-4 below).
    config = lora_config(tiny_sdxl_model_dir, sample_images_dir, tmp_path_factory.mktemp("lora-sdxl"),
                         gradient_accumulation_steps=2, checkpointing_steps=4)
    return config, train(config)


def torch_inputs(model, seed=0):
    """(latents NCHW, timesteps, text states, SDXL's added conditioning or None) as numpy."""
    rng = np.random.default_rng(seed)
    spec = model.spec
    side = 4
    latents = rng.standard_normal((2, spec.denoiser.in_channels, side, side)).astype(np.float32)
    context = rng.standard_normal((2, 77, spec.denoiser.cross_attention_dim)).astype(np.float32)
    added = None
    if spec.denoiser.addition_embed_type == "text_time":
        pooled = spec.denoiser.projection_class_embeddings_input_dim - 6 * spec.denoiser.addition_time_embed_dim
        added = {"text_embeds": rng.standard_normal((2, pooled)).astype(np.float32),
                 "time_ids": np.tile(np.float32([32, 32, 0, 0, 32, 32]), (2, 1))}
    return latents, np.array([10, 700]), context, added


def ours(model, factors, scale, inputs):
    latents, timesteps, context, added = inputs
    params = model.params["unet"] if factors is None else lora_lib.attach(model.params["unet"], factors, scale)
    return np.asarray(models.predict_noise(model.spec, models.Compute(), params, latents, timesteps, context, added))


def theirs(unet, inputs):
    import torch

    latents, timesteps, context, added = inputs
    kwargs = {} if added is None else {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}}
    with torch.no_grad():
        return unet(torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context),
                    **kwargs).sample.numpy()


def pipeline(model_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_loads_both_lora_files_and_computes_our_unet(family, sd1_run, sdxl_run, request):
    """pipe.load_lora_weights of the PEFT file, and of the kohya file (bundle_emb keys left out:
    diffusers refuses them) through diffusers' kohya converter: the UNet gives our output with
    the run's factors, within 1e-4 relative, and not the base UNet's."""
    config, result = sd1_run if family == "sd1" else sdxl_run
    model = families.load_model(config.pretrained_model_name_or_path)
    scale = config.lora_alpha / config.lora_rank
    inputs = torch_inputs(model)
    want = ours(model, result.lora, scale, inputs)
    base = ours(model, None, scale, inputs)
    assert relative(base, want) > 1e-2  # the LoRA moved the output: the comparisons below can fail

    pipe = pipeline(config.pretrained_model_name_or_path)
    np.testing.assert_allclose(theirs(pipe.unet, inputs), base, rtol=0, atol=1e-4 * np.abs(base).max())
    pipe.load_lora_weights(config.output_dir, weight_name=lora_files.DIFFUSERS_FILE)
    assert relative(theirs(pipe.unet, inputs), want) < 1e-4

    from safetensors.torch import load_file as load_torch

    kohya = load_torch(result.files["lora_kohya"])
    pipe = pipeline(config.pretrained_model_name_or_path)
    pipe.load_lora_weights({k: v for k, v in kohya.items() if not k.startswith("bundle_emb.")})
    assert relative(theirs(pipe.unet, inputs), want) < 1e-4


@pytest.mark.slow
def test_the_kohya_file_bundles_the_embedding_as_a1111_reads_it(sd1_run, sdxl_run):
    """bundle_emb.<token>.string_to_param.* (SD 1.x) and .clip_l / .clip_g (SDXL) hold the run's
    rows; every module has lora_down, lora_up and its alpha; kohya's metadata names rank and alpha."""
    for (config, result), keys in ((sd1_run, ("string_to_param.*",)), (sdxl_run, ("clip_l", "clip_g"))):
        tensors = load_file(result.files["lora_kohya"])
        model = families.load_model(config.pretrained_model_name_or_path)
        widths = model.spec.text_widths
        parts = np.split(result.rows, np.cumsum(widths)[:-1], axis=-1)
        for key, part in zip(keys, parts):
            np.testing.assert_array_equal(tensors[f"bundle_emb.{TOKEN}.{key}"], part)
        factors, alphas, bundled = lora_files.split_kohya(tensors)
        assert len(bundled) == len(keys) and set(alphas) == set(factors)
        assert len(factors) == len(result.lora) and all(a == config.lora_alpha for a in alphas.values())
        assert all(name.startswith("lora_unet_") and "." not in name for name in factors)
        with safe_open(result.files["lora_kohya"], "np") as f:
            meta = f.metadata()
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8.0")
    sdxl_names = lora_files.split_kohya(load_file(sdxl_run[1].files["lora_kohya"]))[0]
    assert any(name.startswith("lora_unet_input_blocks_") for name in sdxl_names)  # kohya's SDXL block names


@pytest.mark.slow
def test_with_accumulation_the_pivot_keeps_counting_updates(sdxl_run):
    """4 updates of 2 micro-batches, the rows frozen after 2: the state still counts 4 updates
    (its checkpoint is checkpoint-4) and the rows stopped at the pivot's value."""
    config, result = sdxl_run
    saved = checkpoint.verify_checkpoint(checkpoint.checkpoint_dir(config.output_dir, 4))
    assert int(saved[".step"]) == 4
    np.testing.assert_array_equal(saved[".rows"], result.rows)


@pytest.mark.slow
def test_the_rows_learn_until_the_pivot_and_the_lora_throughout(sd1_run, tmp_path):
    """--train_text_encoder_ti_frac 0.5 of 4 updates: the rows of the checkpoint at update 2 are
    the final ones, while the LoRA's factors still changed after it; proj_in/proj_out are 1x1 convs."""
    config, result = sd1_run
    saved = checkpoint.verify_checkpoint(checkpoint.checkpoint_dir(config.output_dir, 2))
    np.testing.assert_array_equal(saved[".rows"], result.rows)
    lora_keys = [k for k in saved if k.startswith(".lora[")]
    assert lora_keys and any(not np.array_equal(saved[k], _leaf(result.lora, k)) for k in lora_keys)
    # --save_steps 2: the LoRA of update 2 beside its embedding (diffusers' layout: B times alpha / rank)
    at_2 = load_file(os.path.join(config.output_dir, "pytorch_lora_weights-steps-2.safetensors"))
    scale = config.lora_alpha / config.lora_rank
    for key in lora_keys:
        module, leaf = key[len(".lora['"):-2].split("']['")
        want = saved[key] * (scale if leaf == "lora_B" else 1)
        np.testing.assert_allclose(at_2[f"unet.{module}.{leaf}.weight"], want, rtol=1e-6, atol=0)
    assert os.path.isfile(os.path.join(config.output_dir, "cat-toy_lora-steps-2.safetensors"))
    assert {len(p["lora_A"].shape) for p in result.lora.values()} == {2, 4}  # Linear and Conv2d factors
    assert any(m.endswith("proj_in") for m in result.lora)


def _leaf(factors, key):
    # ".lora['down_blocks.0...to_q']['lora_A']" -> factors[module][leaf]
    module, leaf = key[len(".lora['"):-2].split("']['")
    return factors[module][leaf]


@pytest.mark.slow
def test_resume_with_the_lora_is_bitwise(sd1_run, tmp_path):
    """A run resumed from the update-2 checkpoint writes the uninterrupted run's LoRA and rows."""
    import shutil

    config, result = sd1_run
    out = tmp_path / "resumed"
    shutil.copytree(checkpoint.checkpoint_dir(config.output_dir, 2), out / "checkpoint-2")
    resumed = train(dataclasses.replace(config, output_dir=str(out), resume_from_checkpoint="latest"))
    np.testing.assert_array_equal(resumed.rows, result.rows)
    for module, pair in result.lora.items():
        for leaf in pair:
            np.testing.assert_array_equal(resumed.lora[module][leaf], pair[leaf])
    assert load_file(resumed.files["lora_diffusers"]).keys() == load_file(result.files["lora_diffusers"]).keys()


@pytest.mark.slow
def test_the_initial_lora_is_the_base_unet(tiny_model_dir):
    """PEFT's init: A uniform in +-1/sqrt(fan_in), B zero, so update 0 sees the base UNet."""
    model = families.load_model(tiny_model_dir)
    shapes = families.of(model.spec).lora_targets(model.spec, ("attn", "proj"))
    factors = lora_lib.init(step_lib.jax.random.PRNGKey(0), shapes, 4)
    inputs = torch_inputs(model)
    np.testing.assert_array_equal(ours(model, factors, 2.0, inputs), ours(model, None, 2.0, inputs))
    for module, pair in factors.items():
        fan_in = int(np.prod(pair["lora_A"].shape[1:]))
        assert np.abs(pair["lora_A"]).max() <= 1 / np.sqrt(fan_in) and not np.any(pair["lora_B"])


@pytest.mark.parametrize("changes, needle", [
    ({"lora_alpha": 8.0}, "--lora_alpha needs --lora_rank"),
    ({"lora_targets": "attn,ff"}, "--lora_targets needs --lora_rank"),
    ({"train_text_encoder_ti_frac": 0.3}, "--train_text_encoder_ti_frac needs --lora_rank"),
    ({"lora_rank": 0}, "--lora_rank must be at least 1"),
    ({"lora_rank": 4, "lora_targets": "attn,to_x"}, "--lora_targets 'to_x': choose from attn, ff, proj, to_q"),
    ({"lora_rank": 4, "lora_dropout": 0.1}, "--lora_dropout 0.1: only 0 is supported"),
    ({"lora_rank": 4, "train_text_encoder_ti_frac": 1.5}, "--train_text_encoder_ti_frac must be in [0, 1]"),
])
def test_lora_flag_refusals_are_one_line(changes, needle, tmp_path):
    config = TrainConfig.tiny("model", "data", str(tmp_path / "out"), **changes)
    with pytest.raises(UserError) as excinfo:
        config.validate()
    assert needle in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_the_cli_takes_kohyas_names():
    from ti_flax.config import cli

    config = cli.parse_config(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--placeholder_token",
                               "<t>", "--initializer_token", "toy", "--network_dim", "8", "--network_alpha", "4",
                               "--unet_lr", "2e-4", "--lora_targets", "attn,proj"])
    assert (config.lora_rank, config.lora_alpha, config.lora_learning_rate, config.lora_targets) == (8, 4.0, 2e-4,
                                                                                                   "attn,proj")


@pytest.mark.slow
@pytest.mark.parametrize("changes, needle", [
    ({"lora_rank": 33}, "--lora_rank 33 is above the width"),
])
def test_refusals_with_the_model_are_one_line_and_write_nothing(tiny_model_dir, sample_images_dir, tmp_path, changes,
                                                                 needle):
    out = tmp_path / "out"
    config = TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(out), **changes)
    with pytest.raises(UserError) as excinfo:
        train(config)
    assert needle in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert not os.path.exists(out)


@pytest.mark.slow
def test_the_full_pipeline_has_the_lora_merged_and_diffusers_loads_it(sd1_run):
    """--save_as_full_pipeline: the UNet's weights are W + alpha / rank * B A; diffusers' pipeline
    of the output folder gives our output with the LoRA attached."""
    config, result = sd1_run
    model = families.load_model(config.pretrained_model_name_or_path)
    inputs = torch_inputs(model)
    want = ours(model, result.lora, config.lora_alpha / config.lora_rank, inputs)
    assert relative(theirs(pipeline(config.output_dir).unet, inputs), want) < 1e-4


@pytest.mark.slow
def test_validation_images_and_loss_use_the_lora(sd1_run):
    """The last validation image is the sampler's with the final rows and the LoRA, not the rows
    alone; the validation loss was computed (with the LoRA attached: Engine.scored)."""
    from PIL import Image

    from ti_flax.data.prompts import CUT, encode_prompt
    from ti_flax.sampling.sampler import Sampler
    from ti_flax.tokens import add_to_tokenizers

    config, result = sd1_run
    assert [r["step"] for r in result.validation_losses] == [2, 4]
    saved = np.asarray(Image.open(os.path.join(config.output_dir, "validation", "step-000004-0.png")))
    model = families.load_model(config.pretrained_model_name_or_path)
    tokens = [TOKEN, f"{TOKEN}_1"]
    add_to_tokenizers((model.tokenizer,), tokens)
    ids = encode_prompt(model.tokenizer, "a photo of <cat-toy>", [tokens], overflow=CUT)
    negative = encode_prompt(model.tokenizer, "", overflow=CUT)
    sampler = Sampler.from_model(model, num_images=1, num_inference_steps=2)
    pair = (result.lora, config.lora_alpha / config.lora_rank)
    np.testing.assert_array_equal(sampler.sample(result.rows, ids, negative, seed=config.seed, lora=pair)[0], saved)
    assert not np.array_equal(sampler.sample(result.rows, ids, negative, seed=config.seed)[0], saved)


@pytest.mark.slow
def test_generate_with_either_lora_file_draws_the_runs_last_validation_image(sd1_run, tmp_path):
    """ti_flax.generate --lora with the PEFT file or the kohya one (alpha / rank folded in when
    read), and the run's embedding: the same pixels as the run's last validation image."""
    from PIL import Image

    from ti_flax import generate

    config, result = sd1_run
    saved = np.asarray(Image.open(os.path.join(config.output_dir, "validation", "step-000004-0.png")))
    for name in ("lora_diffusers", "lora_kohya"):
        paths = generate(config.pretrained_model_name_or_path, "a photo of <cat-toy>", [result.files["diffusers"]],
                         num_images=1, steps=2, seed=config.seed, output_dir=str(tmp_path / name),
                         lora=result.files[name])
        np.testing.assert_array_equal(np.asarray(Image.open(paths[0]))[..., :3], saved)


@pytest.mark.slow
def test_sd2_lora_files_load_in_diffusers_as_we_compute(tmp_path_factory, tmp_path):
    """SD 2.x (linear projections, 64-wide heads): random factors of every target, written in
    both layouts; diffusers' UNet with either gives ours within 1e-4 relative."""
    import golden
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file as load_torch

    # The golden SD 2.x layout's folder alone (golden_run would also compute its forward values).
    model_dir = golden.build_model("sd2", str(tmp_path_factory.mktemp("lora-sd2")))
    model = families.load_model(model_dir)
    family = families.of(model.spec)
    shapes = family.lora_targets(model.spec, ("attn", "ff", "proj"))
    factors = lora_lib.init(step_lib.jax.random.PRNGKey(1), shapes, 2)
    rng = np.random.default_rng(0)
    factors = {m: {"lora_A": np.asarray(p["lora_A"]), "lora_B": rng.standard_normal(p["lora_B"].shape).astype(np.float32)
                   * 0.05} for m, p in factors.items()}
    inputs = torch_inputs(model)
    want = ours(model, factors, 1.5, inputs)
    assert relative(ours(model, None, 1.5, inputs), want) > 1e-2
    kohya = lora_files.kohya_tensors(factors, 3.0, family.kohya_lora_names(model.spec, factors))
    peft = lora_files.diffusers_tensors(factors, 1.5)
    for tensors in (peft, kohya):
        path = lora_files.save(str(tmp_path / "lora.safetensors"), tensors)
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(load_torch(path))
        assert relative(theirs(pipe.unet, inputs), want) < 1e-4
        read = lora_files.read(path, family.lora_targets(model.spec, ("attn", "ff", "proj")),
                               family.kohya_lora_names(model.spec, shapes))
        assert relative(ours(model, read, 1.0, inputs), want) < 1e-5


def test_reading_a_lora_refuses_what_it_cannot_apply_in_one_line(tmp_path):
    shapes = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32)}
    names = {m: m for m in shapes}
    cases = [
        ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 32), np.float32),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": np.zeros((32, 4), np.float32)},
         "a text encoder's LoRA"),
        ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((4, 16), np.float32),
          "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.zeros((32, 4), np.float32)},
         "a LoRA of another model"),
        ({"unet.mid_block.attentions.0.proj_in.lora_A.weight": np.zeros((4, 32), np.float32)},
         "not a LoRA weight of this model's UNet"),
    ]
    for tensors, needle in cases:
        path = lora_files.save(str(tmp_path / "x.safetensors"), tensors)
        with pytest.raises(UserError) as excinfo:
            lora_files.read(path, shapes, names)
        assert needle in str(excinfo.value) and "\n" not in str(excinfo.value) and path in str(excinfo.value)


@pytest.mark.slow
def test_one_device_with_the_global_batch_trains_the_four_device_lora(sd1_run, tmp_path):
    """The run's 4 devices x 1 example against 1 device x 4: the same rows and factors (each
    example's draws are keyed by its index in the run; the gradients' mean is the same mean)."""
    import jax

    config, result = sd1_run
    assert len(jax.local_devices()) == 4
    one = train(dataclasses.replace(config, output_dir=str(tmp_path / "one"), train_batch_size=4, validation_prompt=None,
                                    validation_loss_steps=0, save_as_full_pipeline=False, checkpointing_steps=0),
                devices=jax.local_devices()[:1])
    np.testing.assert_allclose(one.rows, result.rows, rtol=0, atol=2e-6)
    # The factors are compared through the UNet they make, not one by one: B starts at zero, so
    # A's first gradients are nearly zero, and Adam, dividing each by its own running scale,
    # moves such an element by about the rate whatever the sign its float rounding gives it (a
    # 4-way mean against one sum: up to 8e-4 apart in single elements, measured); the UNets they
    # make are 2e-6 to 2e-5 apart (two machines' venvs), against over 1e-2 for the LoRA's effect.
    model = families.load_model(config.pretrained_model_name_or_path)
    scale, inputs = config.lora_alpha / config.lora_rank, torch_inputs(model)
    assert relative(ours(model, one.lora, scale, inputs), ours(model, result.lora, scale, inputs)) < 1e-3


@pytest.mark.slow
def test_export_converts_the_lora_between_layouts(sd1_run, sdxl_run, tmp_path):
    """ti_flax.export --format lora-diffusers / lora-kohya --model: the converted file holds the
    same (alpha-folded) factors; the kohya one bundles --embedding; the CLI refuses without --model."""
    from ti_flax import export
    from ti_flax.commands import export as export_cmd

    for (config, result), embedding in ((sd1_run, "diffusers"), (sdxl_run, "sdxl")):
        spec, _ = families.read_spec(config.pretrained_model_name_or_path)
        family = families.of(spec)
        shapes = family.lora_targets(spec, ("attn", "ff", "proj"))
        names = family.kohya_lora_names(spec, shapes)
        want = lora_files.read(result.files["lora_kohya"], shapes, names)
        out = tmp_path / embedding
        out.mkdir()
        (to_diffusers,) = export(result.files["lora_kohya"], str(out), format="lora-diffusers",
                                 model=config.pretrained_model_name_or_path)
        assert os.path.basename(to_diffusers) == lora_files.DIFFUSERS_FILE
        source = result.files.get("sdxl") or result.files["diffusers"]
        (to_kohya,) = export(result.files["lora_diffusers"], str(out / "k.safetensors"), format="lora-kohya",
                             model=config.pretrained_model_name_or_path, embedding=source, token=TOKEN)
        for path in (to_diffusers, to_kohya):
            got = lora_files.read(path, shapes, names)
            assert set(got) == set(want)
            for module in want:
                for leaf in want[module]:
                    np.testing.assert_allclose(got[module][leaf], want[module][leaf], rtol=1e-6, atol=1e-9)
        bundled = [k for k in load_file(to_kohya) if k.startswith(f"bundle_emb.{TOKEN}.")]
        assert len(bundled) == len(families.of(spec).encoders)
    code = export_cmd.main([result.files["lora_kohya"], "--output", str(tmp_path / "x.safetensors"),
                            "--format", "lora-diffusers"])
    assert code != 0 and not os.path.exists(tmp_path / "x.safetensors")


@pytest.mark.slow
def test_the_model_card_says_to_load_the_lora_too(sd1_run):
    config, result = sd1_run
    with open(os.path.join(config.output_dir, "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert "load_lora_weights" in card and "<lora:cat-toy_lora:1>" in card and "--lora " in card
