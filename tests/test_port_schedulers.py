"""Parity of ti_flax.models.schedulers with diffusers' PyTorch schedulers.

The reference loop is a diffusers pipeline's: latents = noise * init_noise_sigma, then for each
timestep scale_model_input -> model -> step. The "model" is a fixed function of (input, timestep),
written identically in numpy/jnp and torch, so any difference comes from the schedulers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ti_flax.errors import UserError  # noqa: E402
from ti_flax.models import schedulers  # noqa: E402

# Stable Diffusion 1.x's scheduler/scheduler_config.json (PNDMScheduler).
SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
TORCH_CLASSES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
SHAPE = (2, 8, 8, 4)
# What --zero_terminal_snr sets, as diffusers recommends it.
ZTSNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
TOL = 1e-4


def fake_model(x, t, lib):
    """0.1 x + 0.01 cos(t / 100): depends on the (scaled) input and on the exact timestep."""
    return 0.1 * x + 0.01 * lib.cos(t / 100.0)


def torch_loop(name, config, steps, noise):
    scheduler = getattr(diffusers, TORCH_CLASSES[name]).from_config(config)
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = fake_model(x_in, t.to(torch.float32), torch)
        x = scheduler.step(out, t, x, return_dict=False)[0]
    return x.numpy(), scheduler.timesteps.numpy()


def jax_loop(name, config, steps, noise):
    plan = schedulers.plan(name, config, steps)

    @jax.jit
    def run(noise):
        x = noise * schedulers.init_noise_sigma(plan)
        timesteps = jnp.asarray(plan.timesteps, jnp.float32)

        def body(i, carry):
            x, state = carry
            x_in = schedulers.scale_model_input(plan, x, i)
            out = fake_model(x_in, timesteps[i], jnp)
            return schedulers.step(plan, state, out, i, x)

        x, _ = jax.lax.fori_loop(0, plan.num_steps, body, (x, schedulers.init_state(plan, x)))
        return x

    return np.asarray(run(jnp.asarray(noise))), plan


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_matches_ddpm(schedule):
    config = dict(SD_CONFIG, beta_schedule=schedule)
    ours = schedulers.alphas_cumprod(config)
    ref = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.numpy()
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-7
    assert np.abs(schedulers.betas(config) - diffusers.DDPMScheduler.from_config(config).betas.numpy()).max() <= 1e-7


def test_trained_betas_and_zero_snr():
    trained = np.linspace(0.0001, 0.02, 1000).tolist()
    config = dict(SD_CONFIG, trained_betas=trained)
    ref = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.numpy()
    assert np.abs(schedulers.alphas_cumprod(config) - ref).max() <= 1e-7
    # torch.sqrt of float32 is not always correctly rounded (numpy's is), so the rescaled
    # schedule agrees to a few float32 ulps rather than bit for bit.
    config = dict(SD_CONFIG, rescale_betas_zero_snr=True)
    ref = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.numpy()
    assert np.abs(schedulers.alphas_cumprod(config) - ref).max() <= 1e-6


def test_zero_terminal_snr_schedule_and_v_target_match_diffusers():
    """--zero_terminal_snr's schedule is diffusers' rescale_zero_terminal_snr of the model's betas
    (the last alpha_cumprod exactly 0), and the v-prediction target under it is get_velocity's."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    from ti_flax.models.schedulers import noisy_latents, velocity

    config = schedulers.with_zero_terminal_snr(dict(SD_CONFIG, prediction_type="v_prediction"), True)
    assert config["timestep_spacing"] == "trailing"
    ours = schedulers.alphas_cumprod(config)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    ref = torch.cumprod(1.0 - rescale_zero_terminal_snr(betas), dim=0).numpy()
    assert ours[-1] == 0 and ref[-1] == 0 and ours[-2] > 0
    assert np.abs(ours - ref).max() <= 1e-6  # torch.sqrt vs numpy's: a few float32 ulps
    assert not np.array_equal(ours, schedulers.alphas_cumprod(SD_CONFIG))  # the rescaling is on
    ddpm = diffusers.DDPMScheduler.from_config(config)
    rng = np.random.default_rng(1)
    latents, noise = (rng.standard_normal((4, 4, 8, 8)).astype(np.float32) for _ in range(2))
    t = np.array([0, 500, 998, 999])
    ref_v = ddpm.get_velocity(torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    ref_noisy = ddpm.add_noise(torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(np.asarray(velocity(ours, latents, noise, t)), ref_v, atol=1e-5)
    np.testing.assert_allclose(np.asarray(noisy_latents(ours, latents, noise, t)), ref_noisy, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(velocity(ours, latents, noise, t))[-1], -latents[-1])  # v = -x0
    # Off again: the plain schedule, bit for bit.
    np.testing.assert_array_equal(schedulers.alphas_cumprod(schedulers.with_zero_terminal_snr(config, False)),
                                  schedulers.alphas_cumprod(SD_CONFIG))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", schedulers.SAMPLERS)
def test_sampler_matches_diffusers(name, steps, prediction_type, noise):
    config = dict(SD_CONFIG, prediction_type=prediction_type)
    ref, ref_timesteps = torch_loop(name, config, steps, noise)
    ours, plan = jax_loop(name, config, steps, noise)
    np.testing.assert_array_equal(plan.timesteps, ref_timesteps)
    assert plan.timesteps.dtype == ref_timesteps.dtype
    diff = np.abs(ours - ref).max()
    assert diff <= TOL, f"{name} {steps} {prediction_type}: max abs diff {diff}"


@pytest.mark.parametrize(
    "name, extra",
    [
        ("pndm", {"timestep_spacing": "trailing"}),
        ("pndm", {"timestep_spacing": "linspace", "set_alpha_to_one": True}),
        ("ddim", {"timestep_spacing": "trailing", "clip_sample": True}),
        ("ddim", {"timestep_spacing": "linspace", "set_alpha_to_one": True}),
        ("euler", {"timestep_spacing": "leading"}),
        ("euler", {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}),
        ("dpm", {"timestep_spacing": "leading"}),
        ("dpm", {"timestep_spacing": "trailing", "solver_type": "heun"}),
        ("dpm", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
        ("dpm", {"solver_order": 1}),
        ("ddim", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}),
        # --zero_terminal_snr: the rescaled schedule, sampled from the last (pure-noise) timestep
        ("ddim", dict(ZTSNR, prediction_type="v_prediction")),
        ("euler", dict(ZTSNR, prediction_type="v_prediction")),
        ("dpm", dict(ZTSNR, prediction_type="v_prediction")),
    ],
)
def test_sampler_variants(name, extra, noise):
    config = dict(SD_CONFIG, **extra)
    for steps in (7, 20):
        ref, ref_timesteps = torch_loop(name, config, steps, noise)
        ours, plan = jax_loop(name, config, steps, noise)
        np.testing.assert_array_equal(plan.timesteps, ref_timesteps)
        diff = np.abs(ours - ref).max()
        assert diff <= TOL, f"{name} {extra} {steps}: max abs diff {diff}"


def test_init_noise_sigma_and_scaling():
    for spacing in ("linspace", "leading"):
        config = dict(SD_CONFIG, timestep_spacing=spacing)
        ref = diffusers.EulerDiscreteScheduler.from_config(config)
        ref.set_timesteps(25)
        plan = schedulers.plan("euler", config, 25)
        assert abs(schedulers.init_noise_sigma(plan) - float(ref.init_noise_sigma)) <= 1e-5
        np.testing.assert_allclose(plan.input_scale, (ref.sigmas[:-1] ** 2 + 1).numpy() ** -0.5, rtol=1e-6)
    assert schedulers.init_noise_sigma(schedulers.plan("pndm", SD_CONFIG, 25)) == 1.0


def test_plan_is_static_and_hashable():
    a, b = schedulers.plan("dpm", SD_CONFIG, 25), schedulers.plan("dpm", SD_CONFIG, 25)
    assert a == b and hash(a) == hash(b)
    assert a != schedulers.plan("dpm", SD_CONFIG, 20)
    # PNDM's PLMS takes one more model call than steps (its second step repeats a timestep).
    assert schedulers.plan("pndm", SD_CONFIG, 25).num_steps == 26


def test_a_wrong_coefficient_breaks_parity(noise):
    """The parity check can fail: a plan with one perturbed step coefficient is caught."""
    ref, _ = torch_loop("dpm", SD_CONFIG, 10, noise)
    plan = schedulers.plan("dpm", SD_CONFIG, 10)
    coefs = plan.coefs.copy()
    coefs[3, plan.columns.index("b")] *= 1.01
    bad = schedulers.Plan(plan.name, plan.prediction_type, plan.timesteps, plan.init_noise_sigma,
                          plan.input_scale, coefs, plan.columns)
    x = jnp.asarray(noise)
    state = schedulers.init_state(bad, x)
    for i in range(bad.num_steps):
        out = fake_model(x, jnp.float32(bad.timesteps[i]), jnp)
        x, state = schedulers.step(bad, state, out, i, x)
    assert np.abs(np.asarray(x) - ref).max() > TOL


@pytest.mark.parametrize(
    "name, extra",
    [
        ("unipc", {}),
        ("pndm", {"skip_prk_steps": False}),
        ("pndm", {"rescale_betas_zero_snr": True}),  # diffusers' PNDM would sample the plain schedule
        ("ddim", ZTSNR),  # epsilon from pure noise: diffusers' DDIM gives NaN
        ("euler", {"use_karras_sigmas": True}),
        ("dpm", {"algorithm_type": "sde-dpmsolver++"}),
        ("ddim", {"prediction_type": "sample"}),
        ("ddim", {"beta_schedule": "sigmoid"}),
        ("ddim", {"thresholding": True}),
    ],
)
def test_unsupported_configs_are_user_errors(name, extra):
    with pytest.raises(UserError):
        schedulers.plan(name, dict(SD_CONFIG, **extra), 10)
