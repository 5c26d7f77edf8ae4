"""The loss recipe (--snr_gamma, --noise_offset, --loss_type/--huber_c/--huber_schedule,
--min_timestep/--max_timestep): each formula against its reference (diffusers' compute_snr in
torch; kohya's conditional_loss and Huber schedules written out in torch), the draws with every
knob off bitwise as before, the step's wiring with stand-in models, validation, resume and the
texts that show the recipe. One tiny training run (slow) checks the real step traces the recipe.
"""

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ti_flax import TrainConfig, families, models, parallel, train
from ti_flax.training import checkpoint, losses, model_card, step as step_lib
from ti_flax.config import cli
from ti_flax.errors import UserError, run_cli
from ti_flax.training.losses import LossSpec
from ti_flax.models import schedulers
from ti_flax.training.optim import OptimizerSpec
from draws import ddpm_draws
from test_step import spec  # noqa: F401 (the fixture: the committed Flax fixture's ModelSpec)

# SD 1.x / 2.x's noise schedule (their scheduler_config.json), as diffusers' DDPMScheduler takes it.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# Both ends of the schedule and both sides of snr = 5 (near t = 200 on SD's schedule).
TIMESTEPS = np.array([0, 1, 57, 199, 201, 460, 881, 999])


@pytest.fixture(scope="module")
def alphas_cumprod():
    return schedulers.alphas_cumprod(SD_SCHEDULE)


@pytest.fixture(scope="module")
def pred_target():
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((len(TIMESTEPS), 4, 3, 5)).astype(np.float32)
    target = rng.standard_normal(pred.shape).astype(np.float32) * np.float32(0.3)
    return pred, target


def ours(loss_spec, pred, target, alphas_cumprod, prediction_type="epsilon"):
    """The step's loss (the batch mean of losses.example_losses) as float32 numpy."""
    examples = losses.example_losses(loss_spec, jnp.asarray(pred), jnp.asarray(target), jnp.asarray(TIMESTEPS),
                                     alphas_cumprod, prediction_type)
    return np.float32(jnp.mean(examples))


# --------------------------------------------------------------------------------------------
# min-SNR-gamma: diffusers' train_text_to_image.py with diffusers.training_utils.compute_snr


def diffusers_min_snr_loss(scheduler, model_pred, target, timesteps, snr_gamma):
    """The loss lines of diffusers' examples/text_to_image/train_text_to_image.py (snr_gamma set)."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean()


# diffusers.training_utils imports diffusers' UNets (about 6 s on 2 cores): these two are slow.
@pytest.mark.slow
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_min_snr_loss_is_diffusers(prediction_type, gamma, alphas_cumprod, pred_target):
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    pred, target = pred_target
    want = diffusers_min_snr_loss(scheduler, torch.from_numpy(pred), torch.from_numpy(target),
                                  torch.from_numpy(TIMESTEPS), gamma).item()
    got = ours(LossSpec(snr_gamma=gamma), pred, target, alphas_cumprod, prediction_type)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    # The clip is active on some examples and not on others, so a missing min() would show.
    snr = np.asarray(losses.snr(alphas_cumprod, TIMESTEPS))
    assert (snr > gamma).any() and (snr < gamma).any()
    plain = ours(LossSpec(), pred, target, alphas_cumprod, prediction_type)
    assert abs(got - plain) > 1e-3 * abs(plain)


@pytest.mark.slow
def test_snr_is_diffusers_compute_snr(alphas_cumprod):
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(**SD_SCHEDULE)
    every = np.arange(1000)
    want = compute_snr(scheduler, torch.from_numpy(every)).numpy()
    np.testing.assert_allclose(np.asarray(losses.snr(alphas_cumprod, every)), want, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# kohya sd-scripts: get_huber_threshold_if_needed and conditional_loss (library/train_util.py)


def kohya_threshold(schedule, huber_c, timesteps, alphas_cumprod, num_train_timesteps=1000):
    """kohya's get_huber_threshold_if_needed with --huber_scale 1, written out in torch."""
    import torch

    timesteps = torch.from_numpy(timesteps)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-alpha * timesteps) * 1.0
    if schedule == "snr":
        a = torch.index_select(torch.from_numpy(alphas_cumprod), 0, timesteps)
        sigmas = ((1.0 - a) / a) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    return torch.full((len(timesteps),), huber_c * 1.0)


def kohya_loss(loss_type, pred, target, huber_c):
    """kohya's conditional_loss(..., reduction="none"), then its mean over each example."""
    import torch

    pred, target = torch.from_numpy(pred), torch.from_numpy(target)
    if loss_type == "l2":
        loss = torch.nn.functional.mse_loss(pred, target, reduction="none")
    else:
        huber_c = huber_c.view(-1, *([1] * (pred.ndim - 1)))
        loss = 2 * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
        if loss_type == "huber":
            loss = loss * huber_c
    return loss.mean([1, 2, 3])


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("huber_c", [0.1, 0.3])
def test_huber_losses_are_kohyas(loss_type, schedule, huber_c, alphas_cumprod, pred_target):
    pytest.importorskip("torch")
    pred, target = pred_target
    spec = LossSpec(loss_type=loss_type, huber_c=huber_c, huber_schedule=schedule)
    threshold = kohya_threshold(schedule, huber_c, TIMESTEPS, alphas_cumprod)
    np.testing.assert_allclose(np.asarray(losses.huber_threshold(spec, alphas_cumprod, jnp.asarray(TIMESTEPS), 1000)),
                               threshold.numpy(), rtol=1e-6)
    if schedule != "constant":  # the schedule really moves over the timesteps
        assert threshold.max() > 2 * threshold.min()
    want = kohya_loss(loss_type, pred, target, threshold).mean().item()
    np.testing.assert_allclose(ours(spec, pred, target, alphas_cumprod), want, rtol=1e-6)
    # Then kohya's min-SNR weight (apply_snr_weight) on each example's mean, before the batch mean.
    snr = np.asarray(losses.snr(alphas_cumprod, TIMESTEPS))
    weighted = (kohya_loss(loss_type, pred, target, threshold).numpy() * np.minimum(snr, 5.0) / snr).mean()
    got = ours(dataclasses.replace(spec, snr_gamma=5.0), pred, target, alphas_cumprod)
    np.testing.assert_allclose(got, weighted, rtol=2e-6)


def test_huber_is_quadratic_near_zero_and_linear_far_out():
    # The shape kohya's pseudo-Huber loss is chosen for: ~d^2 below the threshold, ~2c|d| above.
    c = jnp.full((1,), 0.1, jnp.float32)
    small, large = jnp.full((1, 1), 0.01), jnp.full((1, 1), 10.0)
    zero = jnp.zeros((1, 1))
    np.testing.assert_allclose(losses.elementwise_loss("huber", small, zero, c), 1e-4, rtol=1e-2)
    np.testing.assert_allclose(losses.elementwise_loss("huber", large, zero, c), 2 * 0.1 * (10.0 - 0.1), rtol=1e-4)
    np.testing.assert_allclose(losses.elementwise_loss("smooth_l1", large, zero, c), 2 * (10.0 - 0.1), rtol=1e-4)


def test_the_code_knows_every_listed_value(alphas_cumprod):
    from ti_flax.config import choices

    t = jnp.asarray(TIMESTEPS)
    for schedule in choices.HUBER_SCHEDULES:
        assert losses.huber_threshold(LossSpec(loss_type="huber", huber_c=0.1, huber_schedule=schedule),
                                      alphas_cumprod, t, 1000).shape == t.shape
    for loss_type in choices.LOSS_TYPES:
        assert losses.elementwise_loss(loss_type, jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.ones(2)).shape == (2, 3)
    assert "--huber_schedule" not in {c.flags for c in choices.TABLE}  # see choices.HUBER_SCHEDULES


# --------------------------------------------------------------------------------------------
# The draws: noise offset and timestep range


def todays_draws(key, example_ids, latent_shape, num_train_timesteps):
    """The draws as they were before the loss recipe, written out."""

    def one(example_id):
        k_latent, k_noise, k_time = jax.random.split(jax.random.fold_in(key, example_id), 3)
        return (jax.random.normal(k_latent, latent_shape), jax.random.normal(k_noise, latent_shape),
                jax.random.randint(k_time, (), 0, num_train_timesteps))

    return jax.vmap(one)(example_ids)


def test_with_every_knob_off_the_draws_are_bitwise_todays():
    key, ids = jax.random.PRNGKey(3), jnp.arange(5) * 7
    want = todays_draws(key, ids, (4, 6, 6), 1000)
    default = LossSpec.from_config(TrainConfig(), 1000)
    assert default == LossSpec() and not default.weighted
    # An explicit --max_timestep of the model's count is the same run (and the same compiled step).
    assert LossSpec.from_config(TrainConfig(max_timestep=1000), 1000) == default
    for got in (ddpm_draws(key, ids, (4, 6, 6), 1000), ddpm_draws(key, ids, (4, 6, 6), 1000, default)):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_noise_offset_is_the_formula_on_each_examples_own_draw():
    key, ids, shape, x = jax.random.PRNGKey(5), jnp.array([2, 11, 40]), (4, 6, 6), 0.1
    draw = jax.jit(ddpm_draws, static_argnums=(2, 3, 4))
    plain = draw(key, ids, shape, 1000)
    offset = draw(key, ids, shape, 1000, LossSpec(noise_offset=x))
    np.testing.assert_array_equal(offset[0], plain[0])  # the latent sample's noise and the timesteps
    np.testing.assert_array_equal(offset[2], plain[2])  # are the draws they were
    # noise + X * randn(B, C, 1, 1): the draw from fold_in(example key, OFFSET_DRAW)
    draws = np.stack([jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), step_lib.OFFSET_DRAW),
                                        (shape[0], 1, 1)) for i in ids])
    np.testing.assert_allclose(offset[1], plain[1] + np.float32(x) * draws, rtol=1e-6, atol=1e-7)
    assert len(np.unique(draws)) == draws.size  # one per example and channel
    # Keyed by the example: the same draw whatever the rest of the batch (any device count).
    alone = draw(key, ids[1:2], shape, 1000, LossSpec(noise_offset=x))
    np.testing.assert_array_equal(alone[1][0], offset[1][1])
    # The offset's key is none of the three draws' keys (those are fold_in(k, 0), 1 and 2 in jax).
    k = jax.random.fold_in(key, 2)
    assert all(not np.array_equal(jax.random.fold_in(k, step_lib.OFFSET_DRAW), s) for s in jax.random.split(k, 3))


def test_timesteps_stay_in_the_range_over_many_steps_and_examples():
    base, ids = jax.random.PRNGKey(0), jnp.arange(64)
    spec = LossSpec(min_timestep=200, max_timestep=300)
    draw = jax.jit(lambda key: ddpm_draws(key, ids, (1, 1, 1), 1000, spec)[2])
    seen = np.concatenate([np.asarray(draw(jax.random.fold_in(base, step))) for step in range(50)])
    assert seen.min() == 200 and seen.max() == 299  # [min, max): both ends reached, max never
    assert len(np.unique(seen)) == 100
    low = LossSpec(min_timestep=990)  # --max_timestep unset: the model's count
    draw = jax.jit(lambda key: ddpm_draws(key, ids, (1, 1, 1), 1000, low)[2])
    seen = np.concatenate([np.asarray(draw(jax.random.fold_in(base, step))) for step in range(20)])
    assert seen.min() == 990 and seen.max() == 999


# --------------------------------------------------------------------------------------------
# The step: stand-in text encoder and UNet, the real draws, loss and optimizer


def test_the_step_optimizes_and_logs_the_recipes_loss(spec, alphas_cumprod, monkeypatch):
    spec = dataclasses.replace(spec, prediction_type="v_prediction")
    recipe = LossSpec(snr_gamma=5.0, noise_offset=0.1, min_timestep=100, max_timestep=900)
    seen = []

    def condition(spec, compute, text_params, input_ids, rows):
        return models.Condition(jnp.zeros(input_ids.shape + (8,)) + jnp.sum(rows), None)

    def predict_noise(spec, compute, unet_params, latents, timesteps, context, added_cond=None):
        jax.debug.callback(lambda *x: seen.append(x), latents, timesteps)
        return 0.5 * latents + jnp.mean(context)

    monkeypatch.setattr(families.of(spec), "condition", condition)
    monkeypatch.setattr(models, "predict_noise", predict_noise)
    rng = np.random.default_rng(2)
    mean = rng.standard_normal((1, 4, 4, 8, 8)).astype(np.float32)
    batch = step_lib.LatentBatch(mean, mean - 2, np.zeros((1, 4, 77), np.int32), np.arange(4)[None])
    frozen = families.Frozen(None, None, None, alphas_cumprod)
    opt_spec = OptimizerSpec.from_config(TrainConfig(), 1, 10)
    step = jax.jit(jax.vmap(lambda state, batch: step_lib.train_step(
        state, frozen, batch, jax.random.PRNGKey(0), spec=spec, compute=models.Compute(), opt_spec=opt_spec,
        loss_spec=recipe), in_axes=(None, 0), axis_name=parallel.AXIS))
    _, metrics = step(step_lib.init_state(np.full((1, 8), 0.01, np.float32), opt_spec), batch)
    (noisy, timesteps), = seen
    noisy, timesteps = np.reshape(np.asarray(noisy), (4, 4, 8, 8)), np.reshape(np.asarray(timesteps), 4)
    assert ((100 <= timesteps) & (timesteps < 900)).all()
    # The reference: the min-SNR loss (v-prediction) of the same prediction and the step's own
    # target, written out in numpy.
    key = jax.random.fold_in(jax.random.PRNGKey(0), 0)  # step 0's key
    _, t, target = jax.jit(lambda batch: step_lib.diffusion_inputs(spec, models.Compute(), frozen, batch, key, recipe))(
        jax.tree_util.tree_map(lambda x: x[0], batch))
    np.testing.assert_array_equal(t, timesteps)
    pred = 0.5 * noisy + 0.01 * 8
    a = alphas_cumprod[np.asarray(t)].astype(np.float64)
    snr = a / (1 - a)
    mse = ((pred - np.asarray(target, np.float64)) ** 2).mean(axis=(1, 2, 3))
    want = (mse * np.minimum(snr, 5.0) / (snr + 1)).mean()
    np.testing.assert_allclose(np.asarray(metrics["loss"])[0], want, rtol=1e-5)


def test_the_compiled_step_is_cached_by_the_recipe(spec):
    devices, opt_spec = tuple(jax.local_devices()[:1]), OptimizerSpec.from_config(TrainConfig(), 1, 10)
    step = lambda recipe: step_lib.pmapped_train_step(spec, models.Compute(), opt_spec, devices, 1, recipe)  # noqa: E731
    assert step(LossSpec.from_config(TrainConfig(max_timestep=1000), 1000)) is step(LossSpec())
    assert step(LossSpec(snr_gamma=5.0)) is step(LossSpec(snr_gamma=5.0))
    assert step(LossSpec(snr_gamma=5.0)) is not step(LossSpec())
    assert step(LossSpec(noise_offset=0.1)) is not step(LossSpec(noise_offset=0.05))


# --------------------------------------------------------------------------------------------
# Flags: validation, one line each; resume; the banner and the model card


REQUIRED = ["--pretrained_model_name_or_path", "/no/such/model", "--train_data_dir", "/no/such/images",
            "--placeholder_token", "<t>", "--initializer_token", "toy", "--report_to", "none"]


@pytest.mark.parametrize("extra, expected", [
    (["--snr_gamma", "0"], "--snr_gamma must be a positive number"),
    (["--snr_gamma", "nan"], "--snr_gamma must be a positive number"),
    (["--noise_offset", "-0.1"], "--noise_offset must be >= 0"),
    (["--huber_c", "0", "--loss_type", "huber"], "--huber_c must be a positive number"),
    (["--huber_c", "0.2"], "--huber_c and --huber_schedule apply only with --loss_type huber or smooth_l1"),
    (["--huber_schedule", "constant"], "--huber_c and --huber_schedule apply only with --loss_type huber"),
    (["--min_timestep", "-1"], "--min_timestep must be >= 0"),
    (["--min_timestep", "500", "--max_timestep", "500"], "--max_timestep must be greater than --min_timestep"),
])
def test_bad_values_are_one_line_before_anything_loads(extra, expected, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(lambda: train(cli.parse_config(REQUIRED + ["--output_dir", str(out), *extra])))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert expected in err  # (a check after the model load would name the missing model first)
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--loss_type", "--huber_schedule"])
def test_unknown_choices_are_refused_by_the_command_line(flag):
    with pytest.raises(SystemExit) as exc:
        cli.parse_config(REQUIRED + [flag, "l1"])
    assert exc.value.code == 2


def test_the_range_is_checked_against_the_models_schedule():
    with pytest.raises(UserError, match=r"^--min_timestep 0 / --max_timestep 1001: this model has 1000 training "
                                        r"timesteps; pass 0 <= min < max <= 1000$"):
        LossSpec.from_config(TrainConfig(max_timestep=1001), 1000)
    with pytest.raises(UserError, match="--min_timestep 1000 / --max_timestep 1000"):
        LossSpec.from_config(TrainConfig(min_timestep=1000), 1000)
    assert LossSpec.from_config(TrainConfig(min_timestep=999), 1000).timestep_range(1000) == (999, 1000)


def test_min_snr_refuses_a_zero_snr_timestep_for_epsilon():
    # A zero-terminal-SNR schedule (rescale_betas_zero_snr): diffusers' epsilon weight is 0 / 0 there.
    alphas = schedulers.alphas_cumprod({**SD_SCHEDULE, "rescale_betas_zero_snr": True})
    assert alphas[-1] == 0
    with pytest.raises(UserError, match="zero SNR at timestep 999.*pass --max_timestep 999 or less"):
        losses.check_schedule(LossSpec(snr_gamma=5.0), alphas, "epsilon")
    losses.check_schedule(LossSpec(snr_gamma=5.0, max_timestep=999), alphas, "epsilon")
    losses.check_schedule(LossSpec(snr_gamma=5.0), alphas, "v_prediction")  # min(0, g) / (0 + 1) = 0
    losses.check_schedule(LossSpec(), alphas, "epsilon")


def test_resume_refuses_a_changed_recipe_and_takes_old_checkpoints_as_off():
    def meta(config):
        return checkpoint.run_meta(config, ["<t>"], [49408], "f", 1, 3)

    before = meta(TrainConfig())
    for field in ("snr_gamma", "noise_offset", "loss_type", "huber_c", "huber_schedule", "min_timestep",
                  "max_timestep"):
        del before["config"][field]  # a checkpoint written before the recipe's flags
    checkpoint.check_compatible(before, meta(TrainConfig()), "checkpoint-2")
    for changes, named in [({"snr_gamma": 5.0}, "--snr_gamma (None vs 5.0)"),
                           ({"noise_offset": 0.1}, "--noise_offset (0.0 vs 0.1)"),
                           ({"loss_type": "huber"}, "--loss_type (l2 vs huber)"),
                           ({"min_timestep": 100}, "--min_timestep (0 vs 100)"),
                           ({"max_timestep": 900}, "--max_timestep (None vs 900)")]:
        for saved in (before, meta(TrainConfig())):
            with pytest.raises(UserError, match=f"cannot resume from checkpoint-2: .*{re.escape(named)}"):
                checkpoint.check_compatible(saved, meta(TrainConfig(**changes)), "checkpoint-2")
    huber = TrainConfig(loss_type="huber")
    with pytest.raises(UserError, match="--huber_c"):
        checkpoint.check_compatible(meta(huber), meta(huber.replace(huber_c=0.2)), "checkpoint-2")


def test_the_model_card_records_the_recipe_when_on(tmp_path):
    def card(**changes):
        config = TrainConfig(output_dir=str(tmp_path), pretrained_model_name_or_path="m", **changes)
        return open(model_card.write_model_card(config, ["<t>"], [{"step": 1, "loss": 0.5}], {},
                                                families.get("sd1"))).read()

    assert "loss recipe" not in card()
    text = card(snr_gamma=5.0, noise_offset=0.05, loss_type="smooth_l1", huber_schedule="exponential",
                min_timestep=100, max_timestep=900)
    assert ("| loss recipe | smooth_l1 loss (huber_c 0.1, exponential schedule), min-SNR gamma 5, noise offset 0.05, "
            "timesteps [100, 900) |") in text
    assert losses.describe(TrainConfig(min_timestep=100), 1000) == "timesteps [100, 1000)"


def test_a_run_with_every_knob_traces_the_recipe_once_and_says_so(tiny_model_dir, sample_images_dir, tmp_path,
                                                                  traces, monkeypatch, capsys):
    calls = []
    example_losses = losses.example_losses
    monkeypatch.setattr(losses, "example_losses", lambda *args: calls.append(args[0]) or example_losses(*args))
    step_lib.pmapped_train_step.cache_clear()  # a step compiled by an earlier test would hide the trace
    recipe = dict(snr_gamma=5.0, noise_offset=0.1, loss_type="huber", min_timestep=100, max_timestep=900)
    config = TrainConfig.tiny(tiny_model_dir, sample_images_dir, str(tmp_path / "out"), max_train_steps=3, **recipe)
    before = traces["train_step"]
    result = train(config, devices=jax.local_devices()[:1])
    assert traces["train_step"] - before == 1
    assert calls == [LossSpec(snr_gamma=5.0, noise_offset=0.1, loss_type="huber", huber_c=0.1, huber_schedule="snr",
                              min_timestep=100, max_timestep=900)]
    assert all(math.isfinite(r["loss"]) for r in result.history) and len(result.history) == 3
    banner = capsys.readouterr().out
    assert "  loss       huber loss (huber_c 0.1, snr schedule), min-SNR gamma 5, noise offset 0.1, " \
           "timesteps [100, 900)\n" in banner
    with open(os.path.join(config.output_dir, "README.md")) as f:
        assert "| loss recipe | huber loss" in f.read()
