"""Parity of ti_flax.models.flow_match with diffusers' FluxPipeline / FlowMatchEulerDiscreteScheduler
and with kohya sd-scripts' FLUX.1 timestep sampling.

What each check catches:
- test_inference_schedule_*: a wrong mu line (base/max swapped, unpacked sequence length), the
  dynamic shift applied to schnell or the constant shift to dev, a missing final 0, the linspace
  starting at 0 or running n + 1 points, timesteps on the wrong scale (t instead of t * 1000), a
  shift formula with (s - 1) on the wrong side, float64 tables that drift from diffusers' float32.
- test_euler_loop_*: a step with the wrong sign or the wrong sigma pair (sigma_j -> sigma_{j+1}),
  the model called with timesteps instead of timesteps / 1000, an off-by-one that skips or repeats a
  step; the bf16 run: computing dt * v in float32 where diffusers rounds dt and the product to bf16.
- test_training_transform_matches_kohya: per mode, the transform from the same u / n draws to t and
  to kohya's `timesteps`: sigmoid_scale ignored or applied after the sigmoid, the shift applied
  in the wrong direction or not at all, flux_shift's mu from the unpacked latent size or a fixed mu,
  sigma mode reading an unshifted table, rounding instead of truncating u * 1000, or reading the
  table ascending instead of descending; and that dit_timestep is kohya's timesteps / 1000.
- test_sampled_distribution_*: draws of the wrong kind for a mode (uniform where kohya draws a normal
  and the reverse, which the transform test cannot see), a draw that is not one per example, or a
  transform bug that the grid misses: the mean and variance of 10,000 draws within 6 standard errors
  of the exact values (computed from the torch reference by quadrature), so a correct draw fails
  with probability < 1e-8 while e.g. uniform vs sigmoid (variance 1/12 vs 0.043) fails surely.
- test_draws_*: draws that depend on anything but the key and the example id (so a resumed run or
  another batch size or device split would draw otherwise), one draw shared by every example.
- test_noisy_latents_*: t broadcast over the wrong axis, the endpoints swapped (t = 1 must be pure
  noise), the target's sign (x0 - e) or a target that is not d x_t / d t.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps  # noqa: E402

from ti_flax.errors import UserError  # noqa: E402
from ti_flax.models import flow_match as fm  # noqa: E402

# black-forest-labs/FLUX.1-dev and FLUX.1-schnell scheduler/scheduler_config.json.
DEV_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True,
}
SCHNELL_CONFIG = dict(DEV_CONFIG, shift=1.0, use_dynamic_shifting=False)
TOL = 1e-6


# --------------------------------------------------------------------------------------------
# References


def diffusers_scheduler(config, steps, image_seq_len):
    """The scheduler after FluxPipeline.__call__'s step 5 ("Prepare timesteps") set it."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(image_seq_len, config["base_image_seq_len"], config["max_image_seq_len"],
                         config["base_shift"], config["max_shift"])
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    return scheduler


def ours(config, steps, image_seq_len):
    return fm.sigmas_for_inference(
        steps, image_seq_len, base_shift=config["base_shift"], max_shift=config["max_shift"],
        base_seq_len=config["base_image_seq_len"], max_seq_len=config["max_image_seq_len"],
        use_dynamic_shifting=config["use_dynamic_shifting"], shift=config["shift"],
    )


def kohya_sigma_table(shift, num_timesteps=1000):
    """(sigmas, timesteps) of kohya's training scheduler, FlowMatchEulerDiscreteScheduler(1000, shift)."""
    steps = np.linspace(1, num_timesteps, num_timesteps, dtype=np.float32)[::-1].copy()
    sigmas = torch.from_numpy(steps) / num_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas, sigmas * num_timesteps


def kohya_reference(mode, draws, *, shift=3.0, sigmoid_scale=1.0, latent_hw=(128, 128)):
    """(sigmas, timesteps) of kohya's get_noisy_model_input_and_timesteps for given draws.

    A transcription of the formulas of kohya-ss/sd-scripts library/flux_train_utils.py
    (`get_noisy_model_input_and_timesteps`, `time_shift`, `get_lin_function`, `get_sigmas`) and of
    library/sd3_train_utils.py FlowMatchEulerDiscreteScheduler.__init__ at commit 48d368fa
    (2026-02-16), with its random draws (torch.rand / torch.randn) replaced by `draws`, and
    --weighting_scheme uniform (kohya's default) for `sigma` mode.
    """
    num_timesteps = 1000
    x = torch.as_tensor(np.asarray(draws, np.float32))
    if mode == "uniform":
        sigmas = x
        return sigmas, sigmas * num_timesteps
    if mode == "sigmoid":
        sigmas = torch.sigmoid(sigmoid_scale * x)
        return sigmas, sigmas * num_timesteps
    if mode == "shift":
        sigmas = (x * sigmoid_scale).sigmoid()
        sigmas = (sigmas * shift) / (1 + (shift - 1) * sigmas)
        return sigmas, sigmas * num_timesteps
    if mode == "flux_shift":
        h, w = latent_hw
        sigmas = (x * sigmoid_scale).sigmoid()
        x1, y1, x2, y2 = 256, 0.5, 4096, 1.15
        m = (y2 - y1) / (x2 - x1)
        mu = m * ((h // 2) * (w // 2)) + (y1 - m * x1)
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        return sigmas, sigmas * num_timesteps
    assert mode == "sigma"
    table, schedule_timesteps = kohya_sigma_table(shift)
    indices = (x * num_timesteps).long()
    timesteps = schedule_timesteps[indices]
    sigmas = table[[(schedule_timesteps == t).nonzero().item() for t in timesteps]]
    return sigmas, timesteps


# --------------------------------------------------------------------------------------------
# Inference


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 1536, 4096, 6144])
def test_inference_schedule_dev_matches_diffusers(steps, image_seq_len):
    ref = diffusers_scheduler(DEV_CONFIG, steps, image_seq_len)
    sigmas, timesteps = ours(DEV_CONFIG, steps, image_seq_len)
    assert sigmas.dtype == timesteps.dtype == np.float32
    assert sigmas.shape == (steps + 1,) and timesteps.shape == (steps,) and sigmas[-1] == 0
    assert np.abs(sigmas - ref.sigmas.numpy()).max() <= TOL
    assert np.abs(timesteps / 1000 - ref.timesteps.numpy() / 1000).max() <= TOL


@pytest.mark.parametrize("config", [SCHNELL_CONFIG, dict(SCHNELL_CONFIG, shift=3.0)], ids=["schnell", "shift3"])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_inference_schedule_without_dynamic_shift_matches_diffusers(config, steps):
    ref = diffusers_scheduler(config, steps, 4096)
    for image_seq_len in (256, 4096):  # unused without dynamic shifting
        sigmas, timesteps = ours(config, steps, image_seq_len)
        assert np.abs(sigmas - ref.sigmas.numpy()).max() <= TOL
        assert np.abs(timesteps / 1000 - ref.timesteps.numpy() / 1000).max() <= TOL
    if config["shift"] == 1.0:  # schnell: no shift at all
        np.testing.assert_allclose(sigmas[:-1], np.linspace(1, 1 / steps, steps), atol=TOL)


def toy_velocity(x, model_t, lib):
    """A fixed 'model' of the input and of the transformer's timestep input (timesteps / 1000)."""
    return -0.3 * x + 0.05 * lib.sin(7.0 * model_t) + 0.02


@pytest.mark.parametrize("config,steps,seq", [(DEV_CONFIG, 28, 4096), (DEV_CONFIG, 4, 1024), (SCHNELL_CONFIG, 4, 4096)],
                         ids=["dev28", "dev4", "schnell4"])
def test_euler_loop_matches_diffusers(config, steps, seq):
    noise = np.random.default_rng(0).standard_normal((2, 16, 8, 8)).astype(np.float32)
    ref = diffusers_scheduler(config, steps, seq)
    x = torch.from_numpy(noise)
    for t in ref.timesteps:
        x = ref.step(toy_velocity(x, t / 1000, torch), t, x, return_dict=False)[0]

    sigmas, timesteps = ours(config, steps, seq)

    @jax.jit
    def run(x):
        def body(i, x):
            v = toy_velocity(x, fm.dit_timestep(jnp.asarray(timesteps)[i]), jnp)
            return fm.euler_step(x, v, jnp.asarray(sigmas)[i], jnp.asarray(sigmas)[i + 1])

        return jax.lax.fori_loop(0, steps, body, x)

    assert np.abs(np.asarray(run(jnp.asarray(noise))) - x.numpy()).max() <= TOL


def test_euler_loop_bf16_matches_diffusers():
    """bf16 latents and outputs: diffusers steps by a bf16 dt and a bf16 product, then adds in float32."""
    steps = 8
    noise = np.random.default_rng(1).standard_normal((1, 16, 8, 8)).astype(np.float32)
    ref = diffusers_scheduler(DEV_CONFIG, steps, 1024)
    sigmas, timesteps = ours(DEV_CONFIG, steps, 1024)
    x = torch.from_numpy(noise).bfloat16()
    y = jnp.asarray(noise).astype(jnp.bfloat16)
    for i, t in enumerate(ref.timesteps):
        # the model: float32 arithmetic rounded once to bf16, identical in both libraries
        x = ref.step((x.float() * 0.5 + t / 1000).bfloat16(), t, x, return_dict=False)[0]
        v = (y.astype(jnp.float32) * 0.5 + fm.dit_timestep(timesteps[i])).astype(jnp.bfloat16)
        y = fm.euler_step(y, v, sigmas[i], sigmas[i + 1])
    assert x.dtype == torch.bfloat16 and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), x.float().numpy())


def test_mu_and_sequence_length():
    for seq in (256, 1024, 4096, 6144):
        assert abs(fm.flux_mu(seq) - calculate_shift(seq)) <= 1e-12
    assert fm.flux_mu(256) == pytest.approx(0.5) and fm.flux_mu(4096) == pytest.approx(1.15)
    assert fm.packed_seq_len(128, 128) == 4096  # 1024 x 1024 pixels
    assert fm.packed_seq_len(64, 96) == 1536


# --------------------------------------------------------------------------------------------
# Training timesteps

# The modes where kohya draws torch.rand (the others draw torch.randn): written here, not read from the
# module, so a module that draws the wrong kind fails.
KOHYA_UNIFORM = ("sigma", "uniform")
UNIFORM_GRID = np.concatenate([[0.0, 1e-7, 0.0005, 0.001, 0.4995, 0.5, 0.999, 0.9995, 1 - 2.0**-24],
                               np.random.default_rng(2).random(200)]).astype(np.float32)
NORMAL_GRID = np.concatenate([[-10.0, -5.0, -1.0, 0.0, 1e-3, 1.0, 5.0, 10.0],
                              np.random.default_rng(3).standard_normal(200)]).astype(np.float32)
CASES = [  # (mode, keyword arguments, the latent (h, w) kohya reads the sequence length from)
    ("uniform", {}, (128, 128)),
    ("sigma", {"shift": 3.0}, (128, 128)),
    ("sigma", {"shift": 1.0}, (128, 128)),
    ("sigmoid", {"sigmoid_scale": 1.0}, (128, 128)),
    ("sigmoid", {"sigmoid_scale": 2.5}, (128, 128)),
    ("shift", {"shift": 3.0, "sigmoid_scale": 1.0}, (128, 128)),
    ("shift", {"shift": 5.0, "sigmoid_scale": 0.5}, (128, 128)),
    ("flux_shift", {"sigmoid_scale": 1.0}, (128, 128)),
    ("flux_shift", {"sigmoid_scale": 1.0}, (64, 96)),
    ("flux_shift", {"sigmoid_scale": 1.5}, (32, 32)),
]
IDS = [f"{m}-{'-'.join(f'{k}{v:g}' for k, v in kw.items())}-{h}x{w}" for m, kw, (h, w) in CASES]


def our_transform(mode, draws, kw, hw):
    return fm.timesteps_from_draws(jnp.asarray(draws), mode, image_seq_len=fm.packed_seq_len(*hw), **kw)


@pytest.mark.parametrize("mode,kw,hw", CASES, ids=IDS)
def test_training_transform_matches_kohya(mode, kw, hw):
    draws = UNIFORM_GRID if mode in KOHYA_UNIFORM else NORMAL_GRID
    t, timesteps = jax.jit(lambda d: our_transform(mode, d, kw, hw))(draws)
    ref_t, ref_timesteps = kohya_reference(mode, draws, latent_hw=hw, **kw)
    assert t.dtype == timesteps.dtype == jnp.float32 and t.shape == draws.shape
    assert np.abs(np.asarray(t) - ref_t.numpy()).max() <= TOL
    assert np.abs(np.asarray(timesteps) - ref_timesteps.numpy()).max() <= 1000 * TOL
    # kohya's call_dit: the transformer gets timesteps / 1000
    assert np.abs(np.asarray(fm.dit_timestep(timesteps)) - (ref_timesteps / 1000).numpy()).max() <= TOL
    assert float(t.min()) >= 0 and float(t.max()) <= 1


def moments(mode, kw, hw):
    """Exact mean and variance of t, and the standard deviation of (t - mean)^2, for one mode."""
    if mode in KOHYA_UNIFORM:
        # sigma: the N table values equally likely; uniform: a fine midpoint rule on [0, 1)
        u = (np.arange(1000) + 0.5) / 1000 if mode == "sigma" else (np.arange(200_000) + 0.5) / 200_000
        values = kohya_reference(mode, u.astype(np.float32), latent_hw=hw, **kw)[0].double().numpy()
        weights = np.full(len(values), 1 / len(values))
    else:
        nodes, weights = np.polynomial.hermite_e.hermegauss(150)
        weights = weights / weights.sum()
        values = kohya_reference(mode, nodes.astype(np.float32), latent_hw=hw, **kw)[0].double().numpy()
    mean = (weights * values).sum()
    var = (weights * (values - mean) ** 2).sum()
    sd_sq = math.sqrt((weights * (values - mean) ** 4).sum() - var**2)
    return mean, var, math.sqrt(var), sd_sq


@pytest.mark.parametrize("mode,kw,hw", CASES, ids=IDS)
def test_sampled_distribution_has_kohyas_moments(mode, kw, hw):
    n = 10_000
    t, timesteps = fm.sample_timesteps(jax.random.key(7), n, mode, image_seq_len=fm.packed_seq_len(*hw), **kw)
    t = np.asarray(t, np.float64)
    mean, var, sd, sd_sq = moments(mode, kw, hw)
    assert abs(t.mean() - mean) <= 6 * sd / math.sqrt(n), (t.mean(), mean)
    assert abs(((t - mean) ** 2).mean() - var) <= 6 * sd_sq / math.sqrt(n), (t.var(), var)
    assert t.min() >= 0 and t.max() <= 1
    if mode == "sigma":  # only table values, never t = 0
        table = kohya_sigma_table(kw["shift"])[0].numpy()
        assert np.isin(t.astype(np.float32), table).all() and t.min() > 0


def test_moment_checks_tell_the_modes_apart():
    """The margins are narrow enough that swapped or unshifted modes would fail the check above."""
    hw = (128, 128)
    uniform, sigmoid = moments("uniform", {}, hw), moments("sigmoid", {"sigmoid_scale": 1.0}, hw)
    shift, sigma1 = moments("shift", {"shift": 3.0}, hw), moments("sigma", {"shift": 1.0}, hw)
    margin = 6 * 0.3 / math.sqrt(10_000)
    assert abs(uniform[1] - sigmoid[1]) > 2 * margin  # variances of uniform vs sigmoid draws
    assert abs(shift[0] - sigmoid[0]) > 2 * margin  # the shift applied or not
    assert abs(sigma1[0] - moments("sigma", {"shift": 3.0}, hw)[0]) > 2 * margin


@pytest.mark.parametrize("mode", fm.TIMESTEP_SAMPLING)
def test_draws_are_a_function_of_key_and_example(mode):
    key = jax.random.key(11)
    a = fm.timestep_draws(key, 64, mode)
    b = jax.jit(lambda k: fm.timestep_draws(k, 64, mode))(key)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same key: same draws, jit or not
    assert len(np.unique(np.asarray(a))) == 64  # one draw per example, all different
    # example i's draw does not depend on the batch it is in
    sub = fm.timestep_draws(key, 3, mode, example_ids=jnp.array([5, 17, 40]))
    np.testing.assert_array_equal(np.asarray(sub), np.asarray(a)[[5, 17, 40]])
    np.testing.assert_array_equal(np.asarray(fm.timestep_draws(key, 8, mode)), np.asarray(a)[:8])
    other = fm.timestep_draws(jax.random.key(12), 64, mode)
    assert not np.isin(np.asarray(other), np.asarray(a)).any()  # another key: other draws
    t1 = fm.sample_timesteps(key, 64, mode, image_seq_len=4096)
    t2 = fm.timesteps_from_draws(a, mode, image_seq_len=4096)
    for x, y in zip(t1, t2):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_settings_are_user_errors():
    key = jax.random.key(0)
    with pytest.raises(UserError, match="timestep_sampling"):
        fm.sample_timesteps(key, 2, "logit_normal")
    with pytest.raises(UserError, match="sequence length"):
        fm.sample_timesteps(key, 2, "flux_shift")
    with pytest.raises(UserError, match="steps"):
        fm.sigmas_for_inference(0, 4096)


# --------------------------------------------------------------------------------------------
# Forward process


def test_noisy_latents_and_target_follow_the_formulas():
    rng = np.random.default_rng(4)
    x0 = rng.standard_normal((3, 4, 6, 5)).astype(np.float32)  # batch 3 != 4 channels: a wrong axis shows
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0.1, 0.5, 0.93], np.float32)
    xt = np.asarray(fm.noisy_latents(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    want = (1 - t.astype(np.float64))[:, None, None, None] * x0 + t[:, None, None, None] * noise.astype(np.float64)
    assert np.abs(xt - want).max() <= TOL
    # kohya's (1.0 - sigmas) * latents + sigmas * noise with sigmas.view(-1, 1, 1, 1)
    s = torch.from_numpy(t).view(-1, 1, 1, 1)
    kohya = ((1.0 - s) * torch.from_numpy(x0) + s * torch.from_numpy(noise)).numpy()
    assert np.abs(xt - kohya).max() <= TOL
    np.testing.assert_array_equal(np.asarray(fm.velocity_target(jnp.asarray(x0), jnp.asarray(noise))), noise - x0)
    # the target is the velocity of the path: d x_t / d t = e - x0
    _, dxt = jax.jvp(lambda t: fm.noisy_latents(jnp.asarray(x0), jnp.asarray(noise), t), (jnp.asarray(t),),
                     (jnp.ones(3, jnp.float32),))
    assert np.abs(np.asarray(dxt) - (noise - x0)).max() <= TOL


def test_noisy_latents_endpoints():
    rng = np.random.default_rng(5)
    x0 = jnp.asarray(rng.standard_normal((2, 16, 4, 4)).astype(np.float32))
    noise = jnp.asarray(rng.standard_normal((2, 16, 4, 4)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(fm.noisy_latents(x0, noise, jnp.zeros(2))), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(fm.noisy_latents(x0, noise, jnp.ones(2))), np.asarray(noise))
    mixed = np.asarray(fm.noisy_latents(x0, noise, jnp.array([0.0, 1.0])))
    np.testing.assert_array_equal(mixed[0], np.asarray(x0)[0])
    np.testing.assert_array_equal(mixed[1], np.asarray(noise)[1])
