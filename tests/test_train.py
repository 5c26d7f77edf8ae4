"""End-to-end training on the tiny model: outputs, frozen weights, devices, learning, interop."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from ti_flax import TrainConfig, families, models, train
from ti_flax.models import schedulers
from draws import ddpm_draws
from ti_flax.training import step as step_lib
from ti_flax.training.optim import OptimizerSpec


def tiny_config(model_dir, data_dir, out, **changes):
    return TrainConfig.tiny(model_dir, data_dir, str(out), **changes)


@pytest.fixture(scope="session")
def four_device_run(tiny_model_dir, sample_images_dir, tmp_path_factory):
    """6 steps on 4 devices, 2 vectors, every output switched on."""
    out = tmp_path_factory.mktemp("run4")
    config = tiny_config(
        tiny_model_dir, sample_images_dir, out, num_vectors=2, max_train_steps=6, save_steps=3,
        save_as_full_pipeline=True, no_safe_serialization=True, report_to="tensorboard", checkpointing_steps=1,
    )
    records = []
    result = train(config, callbacks=[records.append])
    return config, result, records


@pytest.fixture(scope="session")
def one_device_run(tiny_model_dir, sample_images_dir, tmp_path_factory):
    """The same global batch of 4 on one device: per-device batch 4."""
    out = tmp_path_factory.mktemp("run1")
    config = tiny_config(
        tiny_model_dir, sample_images_dir, out, num_vectors=2, max_train_steps=6, train_batch_size=4,
        checkpointing_steps=1,
    )
    return config, train(config, devices=jax.local_devices()[:1])


def read_embedding_file(path):
    with safe_open(path, "np") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def checkpoint_state(output_dir, step):
    """{name: array} of checkpoint-{step}'s state file: rows, Adam moments, counts."""
    from safetensors.numpy import load_file

    return load_file(os.path.join(output_dir, f"checkpoint-{step}", "state.safetensors"))


def first_moment(state):
    """Adam's first moment; after one update it is (1 - beta1) x the raw averaged gradient."""
    (name,) = [k for k in state if k.endswith(".mu")]
    return state[name]


def test_outputs_layout(four_device_run):
    config, result, records = four_device_run
    metadata, tensors = read_embedding_file(os.path.join(config.output_dir, "learned_embeds.safetensors"))
    assert metadata == {"format": "pt"}
    assert list(tensors) == ["<cat-toy>"]
    assert tensors["<cat-toy>"].shape == (2, 32) and tensors["<cat-toy>"].dtype == np.float32
    np.testing.assert_array_equal(tensors["<cat-toy>"], result.rows)
    # Each -steps-N file holds the rows after step N: the checkpoint's rows, with the norms the
    # callback reported at that step.
    for step in (3, 6):
        meta_n, saved = read_embedding_file(os.path.join(config.output_dir, f"learned_embeds-steps-{step}.safetensors"))
        assert meta_n == {"format": "pt"} and list(saved) == ["<cat-toy>"]
        np.testing.assert_array_equal(saved["<cat-toy>"], checkpoint_state(config.output_dir, step)[".rows"])
        np.testing.assert_allclose(np.linalg.norm(saved["<cat-toy>"], axis=-1), records[step - 1]["row_norms"], rtol=1e-6)
    assert not os.path.exists(os.path.join(config.output_dir, "learned_embeds-steps-2.safetensors"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert result.tokens == ["<cat-toy>", "<cat-toy>_1"]
    lines = open(os.path.join(config.output_dir, "logs", "metrics.jsonl")).read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(config.output_dir, "logs")))
    # nothing half-written is left behind
    assert not [n for n in os.listdir(config.output_dir) if n.startswith(".")]


def test_bin_matches_safetensors(four_device_run):
    torch = pytest.importorskip("torch")
    config, result, _ = four_device_run
    state = torch.load(os.path.join(config.output_dir, "learned_embeds.bin"), weights_only=True)
    assert list(state) == ["<cat-toy>"]
    np.testing.assert_array_equal(state["<cat-toy>"].numpy(), result.rows)


def test_rows_moved_from_initializer(four_device_run, tiny_model_dir):
    _, result, _ = four_device_run
    base = families.load_model(tiny_model_dir)
    init_id = base.tokenizer.encode("toy", add_special_tokens=False)[0]
    init_row = models.token_table(base.params["text_encoder"])[init_id]
    assert np.all(np.isfinite(result.rows))
    assert not np.allclose(result.rows, init_row[None])


def test_full_pipeline_keeps_every_frozen_weight_bitwise(four_device_run, tiny_model_dir):
    config, result, _ = four_device_run
    base = families.load_model(tiny_model_dir)
    saved = families.load_model(config.output_dir)  # the PyTorch-layout folder, read back
    vocab = base.spec.base_vocab_size
    table = models.token_table(saved.params["text_encoder"])
    assert table.shape == (vocab + 2, 32)
    np.testing.assert_array_equal(table[:vocab], models.token_table(base.params["text_encoder"]))
    np.testing.assert_array_equal(table[vocab:], result.rows)
    for part in ("text_encoder", "unet", "vae"):
        a, b = jax.tree_util.tree_flatten_with_path(base.params[part])[0], jax.tree_util.tree_flatten_with_path(
            saved.params[part]
        )[0]
        assert [k for k, _ in a] == [k for k, _ in b]
        for (path, x), (_, y) in zip(a, b):
            if "token_embedding" not in jax.tree_util.keystr(path):
                np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    assert saved.tokenizer.convert_tokens_to_ids(result.tokens) == [vocab, vocab + 1]


def test_one_and_four_devices_agree(four_device_run, one_device_run):
    # Same seed and global batch: per-example randomness is keyed by example, not device.
    _, four, _ = four_device_run
    _, one = one_device_run
    np.testing.assert_allclose(one.rows, four.rows, atol=2e-6)
    np.testing.assert_allclose([r["loss"] for r in one.history], [r["loss"] for r in four.history], rtol=1e-5)


def test_four_devices_average_the_same_raw_gradient(four_device_run, one_device_run):
    # Adam is invariant to the gradient's scale, so equal rows cannot tell a cross-device mean
    # from a sum; the first moment after one update (0.1 x the raw gradient) and the gradient
    # norms can.
    four_config, four, _ = four_device_run
    one_config, one = one_device_run
    g1 = first_moment(checkpoint_state(one_config.output_dir, 1))
    g4 = first_moment(checkpoint_state(four_config.output_dir, 1))
    assert np.linalg.norm(g1) > 0
    np.testing.assert_allclose(g4, g1, rtol=1e-4, atol=1e-4 * np.abs(g1).max())
    np.testing.assert_allclose([r["grad_norm"] for r in four.history], [r["grad_norm"] for r in one.history], rtol=1e-4)
    np.testing.assert_allclose(one.history[0]["grad_norm"], np.linalg.norm(g1) / 0.1, rtol=1e-5)


def test_step_traced_once_per_run(tiny_model_dir, sample_images_dir, tmp_path, traces):
    step_lib.pmapped_train_step.cache_clear()
    before = traces["train_step"]
    config = tiny_config(tiny_model_dir, sample_images_dir, tmp_path / "o", max_train_steps=4)
    train(config, devices=jax.local_devices()[:2])
    assert traces["train_step"] - before == 1


def test_optimizer_state_is_only_the_rows():
    config = TrainConfig(lr_scheduler="linear", max_grad_norm=1.0)
    spec = OptimizerSpec.from_config(config, num_devices=4, total_steps=100)
    state = step_lib.init_state(np.zeros((3, 768), np.float32), spec)
    sizes = [x.size for x in jax.tree_util.tree_leaves(state.opt_state)]
    assert sum(s for s in sizes if s > 1) == 2 * 3 * 768  # Adam's two moments
    assert sum(s for s in sizes if s == 1) <= 2  # step counts


def fixed_eval_loss(model, rows, data, steps=4):
    """Loss over a fixed set of (image, noise, timestep) draws: the same for any rows."""
    key = jax.random.PRNGKey(1234)
    frozen = families.Frozen.from_model(model)
    return float(np.mean([_eval_loss(model.spec, rows, frozen, data.global_batch(s), jax.random.fold_in(key, s))
                          for s in range(steps)]))


@functools.partial(jax.jit, static_argnums=0)
def _eval_loss(spec, rows, frozen, batch, key):
    # The weights are arguments, not constants: one compile serves every rows and every call.
    compute = models.Compute()
    noisy, t, target = step_lib.diffusion_inputs(spec, compute, frozen, batch, key)
    return step_lib.diffusion_loss(rows, spec, compute, frozen, batch.input_ids, noisy, t, target,
                                   time_ids=batch.time_ids)


def test_learning_is_real(one_device_run, tiny_model_dir, sample_images_dir, tmp_path):
    config, _ = one_device_run
    config = config.replace(output_dir=str(tmp_path / "long"), max_train_steps=40)
    result = train(config, devices=jax.local_devices()[:1])
    from ti_flax.training.run import prepare

    run = prepare(config, devices=jax.local_devices()[:1])
    before = fixed_eval_loss(run.model, run.init_rows, run.data)
    after = fixed_eval_loss(run.model, result.rows, run.data)
    assert after < before, (before, after)


def test_the_banner_names_what_attention_resolved_to(tiny_model_dir, sample_images_dir, tmp_path, capsys):
    from ti_flax.config.choices import ATTENTION
    from ti_flax.training.outputs import print_banner
    from ti_flax.training.run import prepare

    for asked in ("dense", "auto"):
        config = TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(tmp_path), attention=asked)
        run = prepare(config, devices=jax.local_devices()[:1])
        print_banner(run)
        line = next(line for line in capsys.readouterr().out.splitlines() if "attention" in line)
        assert run.attention in ATTENTION and run.attention != "auto"
        if asked == "dense":
            assert run.attention == "dense" and line.endswith("attention dense"), line
        else:
            assert line.endswith(f"attention auto ({run.attention} for self-attention)"), line


def test_v_prediction_target(tiny_vpred_model_dir, sample_images_dir):
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler

    model = families.load_model(tiny_vpred_model_dir)
    assert model.spec.prediction_type == "v_prediction"
    # Our forward process and v target agree with diffusers' PyTorch scheduler.
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    x0, noise = np.random.default_rng(0).normal(size=(2, 2, 4, 4, 4)).astype(np.float32)
    t = np.array([3, 917])
    ours_noisy = schedulers.noisy_latents(model.alphas_cumprod, x0, noise, t)
    ours_v = schedulers.velocity(model.alphas_cumprod, x0, noise, t)
    tx, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    np.testing.assert_allclose(ours_noisy, scheduler.add_noise(tx, tn, tt).numpy(), atol=1e-5)
    np.testing.assert_allclose(ours_v, scheduler.get_velocity(tx, tn, tt).numpy(), atol=1e-5)
    # And the step uses that target for a v-prediction model.
    batch = step_lib.PixelBatch(
        pixel_values=np.zeros((2, 32, 32, 3), np.uint8),
        input_ids=np.zeros((2, 77), np.int32),
        example_ids=np.arange(2),
    )
    frozen = families.Frozen.from_model(model)
    key = jax.random.PRNGKey(0)
    compute = models.Compute()
    noisy, t, target = step_lib.diffusion_inputs(model.spec, compute, frozen, batch, key)
    # The exact target: v of the scaled latent sample and the example's own noise and timestep.
    mean, logvar = step_lib.encode_pixels(model.spec, compute, model.params["vae"], batch.pixel_values)
    latent_eps, eps, draws_t = ddpm_draws(key, jnp.arange(2), noisy.shape[1:], 1000)
    latents = (mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * latent_eps) * model.spec.scaling_factor
    np.testing.assert_array_equal(t, draws_t)
    a = model.alphas_cumprod[np.asarray(t)][:, None, None, None]
    want_v = np.sqrt(a) * np.asarray(eps) - np.sqrt(1 - a) * np.asarray(latents)
    np.testing.assert_allclose(target, want_v, atol=1e-5)
    np.testing.assert_allclose(noisy, np.sqrt(a) * np.asarray(latents) + np.sqrt(1 - a) * np.asarray(eps), atol=1e-5)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "polynomial"])
def test_lr_schedules_match_diffusers(name):
    torch = pytest.importorskip("torch")
    from diffusers.optimization import get_scheduler

    peak, warmup, total = 1e-3, 5, 30
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    ref = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    config = TrainConfig(lr_scheduler=name, learning_rate=peak, lr_warmup_steps=warmup)
    ours = OptimizerSpec.from_config(config, 1, total).schedule()
    np.testing.assert_allclose([float(ours(s)) for s in range(total)], expected, rtol=1e-5, atol=1e-9)


def test_interop_with_pytorch_diffusers(four_device_run, tiny_model_dir, tmp_path):
    """The trained file, and 1- and 3-vector files, load through load_textual_inversion."""
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline

    from ti_flax import formats

    config, result, _ = four_device_run
    base = families.load_model(tiny_model_dir)
    rng = np.random.default_rng(0)
    cases = {2: os.path.join(config.output_dir, "learned_embeds.safetensors")}
    for n in (1, 3):
        cases[n] = formats.save_diffusers(str(tmp_path / f"e{n}.safetensors"), "<cat-toy>", rng.normal(size=(n, 32)))
    for n, path in cases.items():
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
        pipe.load_textual_inversion(path)
        _, tensors = read_embedding_file(path)
        rows = tensors["<cat-toy>"]
        tokens = ["<cat-toy>"] + [f"<cat-toy>_{i}" for i in range(1, n)]
        vocab = base.spec.base_vocab_size
        assert pipe.tokenizer.convert_tokens_to_ids(tokens) == list(range(vocab, vocab + n))
        table = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
        np.testing.assert_array_equal(table[vocab:], rows)
        prompt = pipe.maybe_convert_prompt("a photo of <cat-toy>", pipe.tokenizer)
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            torch_hidden = pipe.text_encoder(ids)[0].numpy()
        flax_hidden = models.encode_text(base.spec, models.Compute(), base.params["text_encoder"],
                                         jnp.asarray(ids.numpy()), rows)
        assert np.abs(np.asarray(flax_hidden) - torch_hidden).max() < 1e-4


def test_full_pipeline_loads_in_pytorch_diffusers(four_device_run):
    """--save_as_full_pipeline writes what StableDiffusionPipeline.from_pretrained reads: the new
    tokens are in its tokenizer, their rows in its text encoder, and the UNet is the same model."""
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionPipeline

    config, result, _ = four_device_run
    for name in ("model.safetensors", "config.json"):
        assert os.path.isfile(os.path.join(config.output_dir, "text_encoder", name))
    pipe = StableDiffusionPipeline.from_pretrained(config.output_dir, safety_checker=None, requires_safety_checker=False)
    saved = families.load_model(config.output_dir)
    vocab = saved.spec.base_vocab_size - 2
    assert pipe.tokenizer.convert_tokens_to_ids(result.tokens) == [vocab, vocab + 1]
    table = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(table[vocab:], result.rows)
    ids = pipe.tokenizer("a photo of " + " ".join(result.tokens), padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        torch_hidden = pipe.text_encoder(ids)[0].numpy()
        latents = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32))
        torch_eps = pipe.unet(latents, 10, torch.from_numpy(torch_hidden)).sample.numpy()
    no_rows = np.zeros((1, saved.spec.hidden_size), np.float32)  # read by no id: the table holds the tokens
    hidden = models.encode_text(saved.spec, models.Compute(), saved.params["text_encoder"], jnp.asarray(ids.numpy()),
                                no_rows)
    assert np.abs(np.asarray(hidden) - torch_hidden).max() < 1e-4
    eps = models.predict_noise(saved.spec, models.Compute(), saved.params["unet"], latents.numpy(), np.array([10]),
                               torch_hidden)
    assert np.abs(np.asarray(eps) - torch_eps).max() < 1e-4


def test_trains_on_user_style_images(tiny_model_dir, user_images_dir, tmp_path):
    """RGBA PNG, grayscale JPEG, odd sizes, center crop, all 4 devices: a loadable embedding."""
    config = tiny_config(
        tiny_model_dir, user_images_dir, tmp_path / "o", num_vectors=2, max_train_steps=3, center_crop=True
    )
    result = train(config)
    _, tensors = read_embedding_file(os.path.join(config.output_dir, "learned_embeds.safetensors"))
    assert tensors["<cat-toy>"].shape == (2, 32) and np.all(np.isfinite(tensors["<cat-toy>"]))
    assert len(result.history) == 3
