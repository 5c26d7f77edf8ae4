"""FLUX.1's rectified-flow objective and sampler as pure jnp (numpy for the static inference schedule).

Notation: x0 a clean latent, e standard normal noise, t in [0, 1] the noise level (kohya and
diffusers call it `sigmas`), N = num_train_timesteps (1000).

Forward process and target (Liu et al. 2022 rectified flow; kohya sd-scripts
`flux_train_utils.get_noisy_model_input_and_timesteps` and `flux_train_network.py`, diffusers
`FlowMatchEulerDiscreteScheduler.scale_noise`):

    x_t = (1 - t) x0 + t e                     noisy_latents
    v   = e - x0                               velocity_target (the network's raw output is
                                               regressed on it: kohya's --model_prediction_type raw)

Training timesteps, kohya's `--timestep_sampling` (flux_train_utils.get_noisy_model_input_and_timesteps),
with s = --discrete_flow_shift (default 3.0) and k = --sigmoid_scale (default 1.0); a draw is
u ~ U[0, 1) or n ~ N(0, 1), one per example:

    uniform      t = u
    sigmoid      t = sigmoid(k n)                               (XLabs' x-flux)
    shift        t = s r / (1 + (s - 1) r),     r = sigmoid(k n)
    flux_shift   t = e^mu / (e^mu + (1/r - 1)), r = sigmoid(k n),
                 mu = lin(L): the line through (256, 0.5) and (4096, 1.15) at L, the packed image
                 sequence length (latent h // 2) * (w // 2)   (kohya get_lin_function, time_shift)
    sigma        t = S[floor(u N)] with S the float32 table of kohya's FlowMatchEulerDiscreteScheduler
                 (library/sd3_train_utils.py, as diffusers' with use_dynamic_shifting off):
                 S[i] = s c / (1 + (s - 1) c),  c = (N - i) / N,  i = 0 .. N - 1 (descending, S[0] = 1)
                 -- kohya's default mode, with --weighting_scheme uniform (its default), so t takes
                 one of N discrete values and never 0.

In every mode kohya's `timesteps` is t * N (the float32 product; in `sigma` mode it reads
scheduler.timesteps[i], the same product) and the DiT is called with `timesteps / 1000`
(flux_train_network.py `call_dit`), which FLUX's time embedding multiplies back by 1000
(flux_models.timestep_embedding, time_factor 1000). `dit_timestep` is that division. kohya casts
`timesteps` to the weight dtype (bf16 under --mixed_precision bf16) before dividing, and in `sigma`
mode reads t itself in the weight dtype (get_sigmas), while the other modes noise with float32 t;
the functions here stay float32 and leave such casts to the caller.

Inference schedule (diffusers FluxPipeline.__call__ with FlowMatchEulerDiscreteScheduler.set_timesteps):

    c_j    = linspace(1, 1/n, n)[j]  as float32                       (FluxPipeline's sigmas)
    dev    (use_dynamic_shifting True):  t_j = e^mu / (e^mu + (1/c_j - 1)),
           mu = calculate_shift(L): the line through (base_seq_len, base_shift) and
           (max_seq_len, max_shift) at L = (H / 16) (W / 16), the packed latent sequence length
    schnell (use_dynamic_shifting False, shift 1.0):  t_j = shift c_j / (1 + (shift - 1) c_j)
    sigmas = [t_0 .. t_{n-1}, 0],  timesteps_j = t_j N,  the transformer gets timesteps_j / 1000
    Euler: x_{j+1} = x_j + (t_{j+1} - t_j) v(x_j, t_j)                 (scheduler.step)

The schedule tables are computed in float32 numpy with the operations, in the order, that
diffusers applies to its float32 arrays, so they agree with it to the last bit or nearly.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UserError

TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
UNIFORM_DRAWS = ("sigma", "uniform")  # the modes that draw u ~ U[0, 1); the others draw n ~ N(0, 1)


def _check_mode(mode):
    if mode not in TIMESTEP_SAMPLING:
        raise UserError(f"--timestep_sampling {mode!r}: choose one of {', '.join(TIMESTEP_SAMPLING)}")


# --------------------------------------------------------------------------------------------
# Forward process


def noisy_latents(x0, noise, t):
    """(1 - t) x0 + t e, with t [B] (or a scalar) broadcast over each example's other axes."""
    t = jnp.reshape(jnp.asarray(t), (-1,) + (1,) * (jnp.ndim(x0) - 1))
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0, noise):
    """The flow's velocity d x_t / d t = e - x0: what FLUX's output is regressed on."""
    return noise - x0


# --------------------------------------------------------------------------------------------
# Shifts


def flux_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """mu of the resolution-dependent shift: the line through (base_seq_len, base_shift) and
    (max_seq_len, max_shift) at image_seq_len (kohya get_lin_function, diffusers calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(mu, sigma, t):
    """e^mu / (e^mu + (1/t - 1)^sigma) (kohya flux_train_utils.time_shift, BFL's sampling.time_shift)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def shift_sigmas(t, shift):
    """The constant shift s t / (1 + (s - 1) t) (SD3's; kohya's --discrete_flow_shift)."""
    return shift * t / (1 + (shift - 1) * t)


def packed_seq_len(latent_height, latent_width):
    """FLUX's image sequence length: 2x2 latent patches, (h // 2) * (w // 2)."""
    return (int(latent_height) // 2) * (int(latent_width) // 2)


def train_sigmas(shift=3.0, num_train_timesteps=1000):
    """float32 [N] descending: the sigmas of kohya's training FlowMatchEulerDiscreteScheduler(N, shift)."""
    n = int(num_train_timesteps)
    c = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    return (np.float32(shift) * c / (np.float32(1) + np.float32(shift - 1) * c)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Training timesteps: a draw per example, then a deterministic transform


def timestep_draw(key, mode):
    """One example's raw draw: u ~ U[0, 1) for sigma / uniform, n ~ N(0, 1) otherwise (float32 scalar)."""
    _check_mode(mode)
    if mode in UNIFORM_DRAWS:
        return jax.random.uniform(key, (), jnp.float32)
    return jax.random.normal(key, (), jnp.float32)


def timestep_draws(key, batch, mode, *, example_ids=None):
    """float32 [batch] raw draws, example i's from fold_in(key, example_ids[i]) (default ids 0..batch-1).

    Keyed by example id, so a draw depends on the key and the example only (not on the batch size
    or on the position in the batch), and a resumed run with the same key draws the same.
    """
    _check_mode(mode)
    ids = jnp.arange(batch) if example_ids is None else jnp.asarray(example_ids)
    if ids.shape != (batch,):
        raise ValueError(f"example_ids has shape {ids.shape}, expected ({batch},)")
    return jax.vmap(lambda i: timestep_draw(jax.random.fold_in(key, i), mode))(ids)


def timesteps_from_draws(draws, mode, *, shift=3.0, sigmoid_scale=1.0, image_seq_len=None,
                         num_train_timesteps=1000):
    """(t, timesteps), float32 [B]: kohya's transform of timestep_draws(..., mode) (see the module doc).

    t in [0, 1] is the noise level (kohya's `sigmas`); `timesteps` = t * N is kohya's `timesteps`
    (in `sigma` mode scheduler.timesteps[floor(u N)], the same product); the DiT is called with
    dit_timestep(timesteps). image_seq_len (packed_seq_len of the latent) is needed by flux_shift only.
    """
    _check_mode(mode)
    n = int(num_train_timesteps)
    draws = jnp.asarray(draws, jnp.float32)
    if mode == "uniform":
        t = draws
    elif mode == "sigma":
        table = train_sigmas(shift, n)
        index = jnp.minimum((draws * n).astype(jnp.int32), n - 1)  # torch .long(): truncation
        t = jnp.asarray(table)[index]
    else:
        r = jax.nn.sigmoid(draws * jnp.float32(sigmoid_scale))
        if mode == "sigmoid":
            t = r
        elif mode == "shift":
            t = (r * jnp.float32(shift)) / (1 + jnp.float32(shift - 1) * r)
        else:
            if image_seq_len is None:
                raise UserError("--timestep_sampling flux_shift needs the image sequence length "
                                "(packed_seq_len of the latent)")
            e_mu = jnp.float32(math.exp(flux_mu(image_seq_len)))
            t = e_mu / (e_mu + (1 / r - 1))
    return t, t * jnp.float32(n)


def sample_timesteps(key, batch, mode, *, shift=3.0, sigmoid_scale=1.0, image_seq_len=None,
                     num_train_timesteps=1000, example_ids=None):
    """(t, timesteps), float32 [batch]: timesteps_from_draws of timestep_draws(key, batch, mode)."""
    draws = timestep_draws(key, batch, mode, example_ids=example_ids)
    return timesteps_from_draws(draws, mode, shift=shift, sigmoid_scale=sigmoid_scale,
                                image_seq_len=image_seq_len, num_train_timesteps=num_train_timesteps)


def dit_timestep(timesteps):
    """What the FLUX transformer is called with: timesteps / 1000 (kohya's call_dit, FluxPipeline)."""
    return jnp.asarray(timesteps, jnp.float32) / jnp.float32(1000)


# --------------------------------------------------------------------------------------------
# Inference


def sigmas_for_inference(num_inference_steps, image_seq_len, *, base_shift=0.5, max_shift=1.15,
                         base_seq_len=256, max_seq_len=4096, use_dynamic_shifting=True, shift=1.0,
                         num_train_timesteps=1000):
    """(sigmas float32 [n + 1] ending in 0, timesteps float32 [n]) as FluxPipeline sets them.

    The defaults are FLUX.1-dev's scheduler config but for `shift`, which dynamic shifting ignores;
    FLUX.1-schnell's is use_dynamic_shifting=False, shift=1.0 (no shift at all). image_seq_len is
    the packed latent sequence length (H / 16) * (W / 16); it is unused without dynamic shifting.
    Step j calls the transformer with timesteps[j] / 1000 and steps from sigmas[j] to sigmas[j + 1].
    """
    n = int(num_inference_steps)
    if n < 1:
        raise UserError(f"--steps {num_inference_steps}: must be at least 1")
    c = np.linspace(1.0, 1 / n, n).astype(np.float32)
    if use_dynamic_shifting:
        mu = float(flux_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift))
        t = time_shift(mu, 1.0, c)
    else:
        shift = float(shift)  # a Python float: numpy keeps float32 (a numpy float64 would promote)
        t = shift * c / (1 + (shift - 1) * c)
    t = np.asarray(t, np.float32)
    timesteps = (t * np.float32(num_train_timesteps)).astype(np.float32)
    return np.concatenate([t, np.zeros(1, np.float32)]), timesteps


def euler_step(sample, model_output, sigma, sigma_next):
    """x + (sigma_next - sigma) v: FlowMatchEulerDiscreteScheduler.step (deterministic), returned in
    model_output's dtype as diffusers casts it back.

    As torch's type promotion makes diffusers do it: dt = sigma_next - sigma in float32, the product
    dt * v in model_output's dtype (dt rounded to it first: bf16 outputs step by a bf16 dt), the sum
    with the sample in float32. For float32 outputs that is all float32.
    """
    dtype = model_output.dtype
    dt = (jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)).astype(dtype)
    step = (dt.astype(jnp.float32) * model_output.astype(jnp.float32)).astype(dtype)
    return (sample.astype(jnp.float32) + step.astype(jnp.float32)).astype(dtype)
