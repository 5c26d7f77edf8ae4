"""Speed and memory options: bf16, cached latents, gradient accumulation, remat; one trace each."""

import os
import shutil

import jax
import numpy as np
import pytest

from ti_flax import TrainConfig, families, models, parallel, train
from ti_flax.training import checkpoint, latents, step as step_lib
from ti_flax.data import batches as data
from ti_flax.errors import UserError
from ti_flax.training.optim import OptimizerSpec
from ti_flax.training.run import prepare
from ti_flax.commands.train import main

ONE_DEVICE = jax.local_devices()[:1]
BF16_ROW_BOUND = 1e-2  # observed: see test_bf16_trains_compiles_once_and_keeps_frozen_weights_exact


def config_for(model_dir, data_dir, out, **changes):
    # A warmup schedule, so a wrong count of updates (micro-steps instead) would change the rows.
    base = dict(max_train_steps=4, lr_scheduler="constant_with_warmup", lr_warmup_steps=3, num_vectors=2)
    base.update(changes)
    return TrainConfig.tiny(model_dir, data_dir, str(out), **base)


def embedding_bytes(output_dir):
    with open(os.path.join(output_dir, "learned_embeds.safetensors"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def pixel_run(tiny_model_dir, sample_images_dir, tmp_path_factory):
    """The reference: float32, pixels through the VAE each step, batch 2, one update per batch."""
    config = config_for(
        tiny_model_dir, sample_images_dir, tmp_path_factory.mktemp("pixels"), train_batch_size=2, attention="dense",
        checkpointing_steps=1,
    )
    return config, train(config, devices=ONE_DEVICE)


@pytest.fixture(scope="module")
def accumulated_run(tiny_model_dir, sample_images_dir, tmp_path_factory):
    """The same examples as 2 micro-batches of 1 per update, from cached latents, with remat and
    the chunked attention."""
    config = config_for(
        tiny_model_dir, sample_images_dir, tmp_path_factory.mktemp("accum"), train_batch_size=1,
        gradient_accumulation_steps=2, cache_latents=True, gradient_checkpointing=True, attention="chunked",
        checkpointing_steps=1,
    )
    return config, train(config, devices=ONE_DEVICE)


def test_cached_moments_and_draws_equal_a_fresh_encode(tiny_model_dir, sample_images_dir):
    config = config_for(tiny_model_dir, sample_images_dir, "unused", train_batch_size=4)
    run = prepare(config, devices=ONE_DEVICE)
    spec, params, compute = run.model.spec, run.model.params, models.Compute()
    vae = parallel.replicate(params["vae"], ONE_DEVICE)
    mean, logvar = latents.encode_views(spec, compute, vae, run.data.images, ONE_DEVICE)
    fresh = jax.jit(lambda p, x: step_lib.encode_pixels(spec, compute, p, x))
    for flip in (0, 1):
        views = run.data.images[:, :, ::-1] if flip else run.data.images
        want_mean, want_logvar = fresh(params["vae"], views)
        np.testing.assert_allclose(mean[:, flip], want_mean, atol=1e-5)
        np.testing.assert_allclose(logvar[:, flip], want_logvar, atol=1e-5)
    # The same positions of the run give the same noisy latents, timesteps and targets.
    cached = data.LatentViews(mean, logvar)
    frozen = families.Frozen.from_model(run.model)
    # The weights are an argument, not constants of the program (which would compile slowly).
    inputs = jax.jit(lambda frozen, batch, key: step_lib.diffusion_inputs(spec, compute, frozen, batch, key))
    key = jax.random.PRNGKey(7)
    for step in (0, 5):
        a, b = inputs(frozen, run.data.global_batch(step), key), inputs(frozen, run.data.global_batch(step, cached), key)
        np.testing.assert_array_equal(a[1], b[1])
        for x, y in ((a[0], b[0]), (a[2], b[2])):
            np.testing.assert_allclose(x, y, atol=1e-5)
        np.testing.assert_array_equal(run.data.global_batch(step, cached).input_ids,
                                      run.data.global_batch(step).input_ids)


def test_accumulation_and_cache_equal_one_big_batch(pixel_run, accumulated_run):
    # K=2 micro-batches of 1 (cached latents, remat, chunked attention) == one batch of 2 (pixels,
    # dense attention): same examples, draws, updates and learning rates, within float tolerance.
    _, big = pixel_run
    _, accumulated = accumulated_run
    assert [r["step"] for r in accumulated.history] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in accumulated.history], [r["loss"] for r in big.history], rtol=1e-5)
    np.testing.assert_allclose([r["lr"] for r in accumulated.history], [r["lr"] for r in big.history])
    np.testing.assert_allclose(accumulated.rows, big.rows, atol=1e-6)


def test_remat_and_accumulation_give_the_same_raw_gradient(pixel_run, accumulated_run):
    # Adam hides a gradient's scale from the rows; its first moment after one update does not
    # (0.1 x the gradient): the mean of 2 micro-batch gradients (remat'ed, chunked attention)
    # must be the big batch's gradient, not their sum.
    from safetensors.numpy import load_file

    def first_moment(config):
        state = load_file(os.path.join(config.output_dir, "checkpoint-1", "state.safetensors"))
        (name,) = [k for k in state if k.endswith(".mu")]
        return state[name]

    big, accumulated = first_moment(pixel_run[0]), first_moment(accumulated_run[0])
    assert np.linalg.norm(big) > 0
    np.testing.assert_allclose(accumulated, big, rtol=1e-4, atol=1e-4 * np.abs(big).max())
    # (The logged grad_norm of an accumulated update is the mean of its micro-batches' norms,
    # which is not the norm of their mean gradient: it is not compared here.)


def test_accumulation_resume_is_bitwise_identical(accumulated_run, tmp_path):
    config, whole = accumulated_run
    # Checkpoints are named by optimizer update and hold the data position of 2 x 2 batches:
    # the uninterrupted run's checkpoint-2, alone in a new folder, resumes to its final rows.
    assert [s for s, _ in checkpoint.list_checkpoints(config.output_dir)] == [1, 2, 3, 4]
    shutil.copytree(os.path.join(config.output_dir, "checkpoint-2"), tmp_path / "half" / "checkpoint-2")
    half = config.replace(output_dir=str(tmp_path / "half"), checkpointing_steps=2)
    resumed = train(half.replace(resume_from_checkpoint="latest"), devices=ONE_DEVICE)
    assert [r["step"] for r in resumed.history] == [3, 4]
    assert embedding_bytes(half.output_dir) == embedding_bytes(config.output_dir)
    with pytest.raises(UserError, match="gradient_accumulation_steps"):
        train(half.replace(max_train_steps=4, resume_from_checkpoint="latest", gradient_accumulation_steps=1),
              devices=ONE_DEVICE)


def test_bf16_trains_compiles_once_and_keeps_frozen_weights_exact(pixel_run, tiny_model_dir, tmp_path, traces):
    # (The bf16-vs-float32 loss on a fixed evaluation set is measured by scripts/benchmark.py.)
    fp32_config, fp32 = pixel_run
    step_lib.pmapped_train_step.cache_clear()
    before = traces["train_step"]
    config = fp32_config.replace(  # the same global batch of 2, over 2 devices
        output_dir=str(tmp_path / "bf16"), train_batch_size=1, mixed_precision="bf16", cache_latents=True,
        save_as_full_pipeline=True,
    )
    result = train(config, devices=jax.local_devices()[:2])
    assert traces["train_step"] - before == 1  # 4 steps, one trace
    assert result.rows.dtype == np.float32 and np.all(np.isfinite(result.rows))
    assert not np.array_equal(result.rows, fp32.rows)  # bf16 really ran
    # ... and stayed close to float32: after 4 steps (rows moved up to 0.02 from the start) the
    # rows are within BF16_ROW_BOUND of the float32 run's, the losses within 2%.
    print("bf16 vs fp32: rows max |diff|", np.abs(result.rows - fp32.rows).max(), "loss rel",
          np.abs(np.array([r["loss"] for r in result.history]) / [r["loss"] for r in fp32.history] - 1).max())
    assert np.abs(result.rows - fp32.rows).max() <= BF16_ROW_BOUND
    np.testing.assert_allclose([r["loss"] for r in result.history], [r["loss"] for r in fp32.history], rtol=2e-2)
    # The saved pipeline holds the float32 base weights, bit for bit, and the float32 rows.
    base, saved = families.load_model(tiny_model_dir), families.load_model(config.output_dir)
    vocab = base.spec.base_vocab_size
    init_row = models.token_table(base.params["text_encoder"])[base.tokenizer.convert_tokens_to_ids("toy</w>")]
    assert not np.allclose(result.rows, init_row[None])  # it learned
    table = models.token_table(saved.params["text_encoder"])
    np.testing.assert_array_equal(table[:vocab], models.token_table(base.params["text_encoder"]))
    np.testing.assert_array_equal(table[vocab:], result.rows)
    for part in ("unet", "vae"):
        for x, y in zip(jax.tree_util.tree_leaves(base.params[part]), jax.tree_util.tree_leaves(saved.params[part])):
            assert y.dtype == np.float32
            np.testing.assert_array_equal(x, y)


def test_attention_choice_per_backend():
    # The chunked/dense values and gradients are tested in test_port_attention.py; this is the policy.
    assert models.resolve_attention("auto", backend="cpu") == "chunked"
    assert models.resolve_attention("dense", backend="cpu") == "dense"
    assert models.resolve_attention("auto", backend="tpu") in ("dense", "flash")
    with pytest.raises(UserError, match="--attention cudnn needs an NVIDIA GPU and bf16/fp16; this run is cpu"):
        models.resolve_attention("cudnn", backend="cpu")


def test_optimizer_state_sizes():
    rows = np.zeros((3, 768), np.float32)
    for k, floats in ((1, 2), (4, 3)):  # Adam's two moments; MultiSteps adds one gradient mean
        spec = OptimizerSpec.from_config(TrainConfig(gradient_accumulation_steps=k), 1, 100)
        sizes = [x.size for x in jax.tree_util.tree_leaves(step_lib.init_state(rows, spec).opt_state)]
        assert sum(s for s in sizes if s > 1) == floats * 3 * 768
        assert sum(s for s in sizes if s == 1) <= 4


def test_scale_lr_counts_accumulated_batches():
    config = TrainConfig(scale_lr=True, learning_rate=1e-4, train_batch_size=2, gradient_accumulation_steps=3)
    assert OptimizerSpec.from_config(config, 4, 10).peak_lr == pytest.approx(1e-4 * 2 * 4 * 3)


@pytest.mark.parametrize("flag, value, expected", [
    ("--mixed_precision", "fp16", "use --mixed_precision bf16"),
    ("--mixed_precision", "fp8", "must be one of no, bf16"),
    ("--gradient_accumulation_steps", "0", "at least 1"),
])
def test_bad_speed_flags_are_one_line_errors(flag, value, expected, tiny_model_dir, sample_images_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = main([
        "--pretrained_model_name_or_path", tiny_model_dir, "--train_data_dir", sample_images_dir,
        "--output_dir", str(out), "--placeholder_token", "<cat-toy>", "--initializer_token", "toy",
        "--resolution", "32", flag, value,
    ])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not out.exists()
