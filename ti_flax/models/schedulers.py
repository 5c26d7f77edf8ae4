"""Noise schedules and samplers (PNDM/PLMS, DDIM, Euler, DPM-Solver++) as pure jnp.

A sampler is a static `Plan` (timesteps and per-step coefficients, computed here in numpy from the
scheduler's config.json) plus a pure `step` over a fixed-shape state, so a whole sampling loop runs
inside `jax.lax.fori_loop`:

    >>> p = plan("dpm", scheduler_config, 25)                       # doctest: +SKIP
    >>> x = noise * init_noise_sigma(p); state = init_state(p, x)   # doctest: +SKIP
    >>> def body(i, carry):                                         # doctest: +SKIP
    ...     x, state = carry
    ...     out = unet(scale_model_input(p, x, i), jnp.asarray(p.timesteps)[i])
    ...     return step(p, state, out, i, x)
    >>> x, _ = jax.lax.fori_loop(0, p.num_steps, body, (x, state))  # doctest: +SKIP

Each sampler follows diffusers' *PyTorch* scheduler of the same name, as a diffusers pipeline builds it
with `Scheduler.from_config(model's scheduler config)`: config keys the class does not know are ignored
and missing ones take the class's constructor defaults (so DDIM clips x0 unless the config says
`clip_sample: false`, and Euler / DPM space timesteps "linspace" unless it names a spacing). Two places
where diffusers' Flax schedulers differ from the PyTorch ones, and we follow PyTorch: PNDM runs all of
its num_inference_steps + 1 PLMS timesteps, and Euler looks sigmas up by step index, not by an int cast
of its fractional timesteps.

The step formulas are diffusers' own, rearranged as linear combinations whose scalar coefficients are
computed once per plan in float64 from the float32 alphas_cumprod diffusers uses; the arrays stay float32.
"""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from ..config.choices import PREDICTION_TYPES, SAMPLERS  # noqa: F401 (PREDICTION_TYPES is part of this module's API)
from ..errors import UserError

# diffusers' scheduler classes and the sampler here that runs each.
SAMPLER_OF_CLASS = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                    "DPMSolverMultistepScheduler": "dpm"}
# Constructor defaults of diffusers' PyTorch classes (for keys a config.json leaves out).
_COMMON = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    prediction_type="epsilon", steps_offset=0, rescale_betas_zero_snr=False,
)
_DEFAULTS = {
    "ddpm": dict(_COMMON),
    "pndm": dict(_COMMON, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
    "ddim": dict(_COMMON, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, thresholding=False,
                 timestep_spacing="leading"),
    "euler": dict(_COMMON, interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
                  use_beta_sigmas=False, timestep_type="discrete", final_sigmas_type="zero",
                  timestep_spacing="linspace"),
    "dpm": dict(_COMMON, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
                final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None, thresholding=False,
                timestep_spacing="linspace"),
}
# PNDMScheduler has no rescale_betas_zero_snr argument: it ignores the key.
del _DEFAULTS["pndm"]["rescale_betas_zero_snr"]


def _settings(kind, config):
    """The config as scheduler `kind` sees it: its known keys, with its defaults for missing or null ones."""
    out = {}
    for key, default in _DEFAULTS[kind].items():
        value = config.get(key, default)
        out[key] = default if value is None and key != "trained_betas" else value
    return out


# --------------------------------------------------------------------------------------------
# Noise schedule


def _torch_linspace_f32(start, end, n):
    """torch.linspace(start, end, n, dtype=float32) bit for bit: float32 ends and step, each value
    fused-multiply-added from the nearer end (PyTorch's CPU kernel), rounded once to float32."""
    start, end = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start], np.float32)
    step = np.float64((end - start) / np.float32(n - 1))
    idx = np.arange(n, dtype=np.float64)
    values = np.where(idx < n // 2, np.float64(start) + step * idx, np.float64(end) - step * (n - 1 - idx))
    return values.astype(np.float32)


def _cumprod_f32(x):
    # torch.cumprod of float32 accumulates in double, then rounds each product to float32.
    return np.cumprod(np.asarray(x, np.float64)).astype(np.float32)


def _glide_cosine_betas(n, max_beta=0.999):
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def _rescale_zero_terminal_snr(betas):
    # diffusers' rescale_zero_terminal_snr, in float32 as it computes it.
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(np.float32(1) - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def betas(config, _kind="ddpm"):
    """float32 [num_train_timesteps] betas of a scheduler config, as diffusers' DDPMScheduler makes them.

    Supports beta_schedule linear | scaled_linear | squaredcos_cap_v2, trained_betas, and
    rescale_betas_zero_snr.
    """
    s = _settings(_kind, config)
    n = int(s["num_train_timesteps"])
    if s["trained_betas"] is not None:
        out = np.asarray(s["trained_betas"], np.float32)
    elif s["beta_schedule"] == "linear":
        out = _torch_linspace_f32(s["beta_start"], s["beta_end"], n)
    elif s["beta_schedule"] == "scaled_linear":
        out = _torch_linspace_f32(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, n) ** 2
    elif s["beta_schedule"] == "squaredcos_cap_v2":
        out = _glide_cosine_betas(n)
    else:
        raise UserError(
            f"scheduler config: beta_schedule {s['beta_schedule']!r} is not supported "
            "(use linear, scaled_linear or squaredcos_cap_v2)"
        )
    if s.get("rescale_betas_zero_snr"):
        out = _rescale_zero_terminal_snr(out)
    return out


def with_zero_terminal_snr(config, zero_terminal_snr):
    """The scheduler config with its noise schedule rescaled to zero terminal SNR (True), kept as it
    is (None), or with a rescaling it asks for turned off (False).

    True sets diffusers' `rescale_betas_zero_snr` and the "trailing" timestep spacing that
    diffusers recommends with it (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed": sampling must start at the last timestep, the one of pure noise).
    """
    if zero_terminal_snr is None:
        return dict(config)
    if zero_terminal_snr:
        return dict(config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return dict(config, rescale_betas_zero_snr=False)


def zero_terminal_snr(config):
    """Whether a scheduler config rescales its noise schedule to zero terminal SNR."""
    return bool(dict(config).get("rescale_betas_zero_snr"))


def noisy_latents(alphas_cumprod, latents, noise, timesteps):
    """DDPM's forward diffusion q(x_t | x_0) for NCHW latents and per-example timesteps."""
    a = jnp.asarray(alphas_cumprod)[timesteps][:, None, None, None]
    return jnp.sqrt(a) * latents + jnp.sqrt(1.0 - a) * noise


def velocity(alphas_cumprod, latents, noise, timesteps):
    """The v-prediction target sqrt(a) * noise - sqrt(1 - a) * x_0."""
    a = jnp.asarray(alphas_cumprod)[timesteps][:, None, None, None]
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * latents


def alphas_cumprod(config, _kind="ddpm"):
    """float32 [num_train_timesteps] cumulative products of 1 - betas (DDPMScheduler.alphas_cumprod)."""
    return _cumprod_f32(np.float32(1) - betas(config, _kind))


# --------------------------------------------------------------------------------------------
# Plans


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Everything static about one sampling run; hashable, so it can be a jit static argument.

    Attributes:
      name: one of SAMPLERS. prediction_type: "epsilon" or "v_prediction".
      timesteps: [num_steps] what the model is given at step i (int64; float32 for euler, whose
        linspace timesteps are fractional).
      init_noise_sigma: the standard deviation the starting noise is scaled to.
      input_scale: float32 [num_steps], scale_model_input's factor at step i.
      coefs: float32 [num_steps, len(columns)] per-step coefficients of the sampler's step.
      columns: the names of coefs' columns. clip: DDIM's clip_sample_range, or None.
    """

    name: str
    prediction_type: str
    timesteps: np.ndarray
    init_noise_sigma: float
    input_scale: np.ndarray
    coefs: np.ndarray
    columns: tuple
    clip: float = None

    @property
    def num_steps(self):
        """How many times the model is called (PNDM: num_inference_steps + 1)."""
        return int(self.timesteps.shape[0])

    def column(self, name):
        """float32 [num_steps] coefficient `name`."""
        return self.coefs[:, self.columns.index(name)]

    def _key(self):
        arrays = (self.timesteps, self.input_scale, self.coefs)
        return (self.name, self.prediction_type, self.init_noise_sigma, self.columns, self.clip) + tuple(
            (a.dtype.str, a.shape, a.tobytes()) for a in arrays
        )

    def __eq__(self, other):
        return isinstance(other, Plan) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())


def _table(rows, columns):
    return np.asarray([[row[c] for c in columns] for row in rows], np.float64).astype(np.float32)


def _check(kind, s, num_inference_steps):
    n = int(s["num_train_timesteps"])
    if not 1 <= int(num_inference_steps) <= n:
        raise UserError(f"--steps {num_inference_steps}: must be between 1 and {n}")
    if s["prediction_type"] not in PREDICTION_TYPES:
        raise UserError(
            f"scheduler config: prediction_type {s['prediction_type']!r} is not supported by the {kind} sampler "
            "(epsilon or v_prediction)"
        )
    spacing = s.get("timestep_spacing")
    if spacing is not None and spacing not in ("linspace", "leading", "trailing"):
        raise UserError(f"scheduler config: timestep_spacing {spacing!r} is not linspace, leading or trailing")
    for key in ("thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "use_lu_lambdas", "use_flow_sigmas"):
        if s.get(key):
            raise UserError(f"scheduler config: {key}=true is not supported by the {kind} sampler; "
                            "remove it from the config or choose another --scheduler")


def _spaced_timesteps(spacing, n_train, steps, offset):
    """Descending integer timesteps as PNDM/DDIM space them."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, steps) * (n_train // steps)).round()[::-1].astype(np.int64) + offset
    return np.round(np.arange(n_train, 0, -n_train / steps)).astype(np.int64) - 1


def plan(name, config, num_inference_steps):
    """The static Plan of sampler `name` (one of SAMPLERS) for a scheduler config.json dict.

    Raises UserError for an unknown sampler or a config option it does not implement.
    """
    if name not in SAMPLERS:
        raise UserError(f"--scheduler {name!r}: choose one of {', '.join(SAMPLERS)}")
    config = dict(config)
    s = _settings(name, config)
    _check(name, s, num_inference_steps)
    return {"pndm": _plan_pndm, "ddim": _plan_ddim, "euler": _plan_euler, "dpm": _plan_dpm}[name](
        s, config, int(num_inference_steps)
    )


def _plan_pndm(s, config, steps):
    # PNDMScheduler with skip_prk_steps: the PLMS sampler of CompVis' latent-diffusion (Liu et al.'s
    # pseudo linear multistep), whose second step re-evaluates the first one's timestep.
    if not s["skip_prk_steps"]:
        raise UserError("scheduler config: PNDM with Runge-Kutta warm-up steps (skip_prk_steps false) is not "
                        "supported; set skip_prk_steps true or choose another --scheduler")
    if zero_terminal_snr(config):  # diffusers' PNDMScheduler would silently sample another schedule
        raise UserError("--scheduler pndm: PNDM has no zero-terminal-SNR schedule (diffusers' PNDMScheduler ignores "
                        "rescale_betas_zero_snr); choose ddim, euler or dpm")
    n_train = int(s["num_train_timesteps"])
    ac = alphas_cumprod(config, "pndm").astype(np.float64)
    final = 1.0 if s["set_alpha_to_one"] else ac[0]
    base = _spaced_timesteps(s["timestep_spacing"], n_train, steps, s["steps_offset"])[::-1]  # ascending
    timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64)
    ratio = n_train // steps
    # Weights of [model_output, history[0], history[1], history[2]] (history newest first) per counter.
    weights = [(1, 0, 0, 0), (1 / 2, 1 / 2, 0, 0), (3 / 2, -1 / 2, 0, 0), (23 / 12, -16 / 12, 5 / 12, 0)]
    rows = []
    for c, t in enumerate(timesteps):
        t, prev = (int(t) + ratio, int(t)) if c == 1 else (int(t), int(t) - ratio)
        if t >= n_train:
            raise UserError(f"--steps {steps}: PNDM would need timestep {t} of a {n_train}-step schedule")
        a_t = ac[t]
        a_prev = ac[prev] if prev >= 0 else final
        w = weights[c] if c < 4 else (55 / 24, -59 / 24, 37 / 24, -9 / 24)
        v = s["prediction_type"] == "v_prediction"
        rows.append(dict(
            w0=w[0], w1=w[1], w2=w[2], w3=w[3],
            push=float(c != 1), use_cur=float(c == 1), store_cur=float(c == 0),
            # v_prediction: eps = sqrt(a_t) v + sqrt(1 - a_t) x, on the combined output (as diffusers does)
            ve=math.sqrt(a_t) if v else 1.0, vx=math.sqrt(1 - a_t) if v else 0.0,
            # formula (9) of the PNDM paper
            sc=math.sqrt(a_prev / a_t),
            cc=(a_prev - a_t) / (a_t * math.sqrt(1 - a_prev) + math.sqrt(a_t * (1 - a_t) * a_prev)),
        ))
    columns = ("w0", "w1", "w2", "w3", "push", "use_cur", "store_cur", "ve", "vx", "sc", "cc")
    ones = np.ones(len(timesteps), np.float32)
    return Plan("pndm", s["prediction_type"], timesteps, 1.0, ones, _table(rows, columns), columns)


def _plan_ddim(s, config, steps):
    # DDIMScheduler.step with eta=0 (deterministic).
    n_train = int(s["num_train_timesteps"])
    ac = alphas_cumprod(config, "ddim").astype(np.float64)
    final = 1.0 if s["set_alpha_to_one"] else ac[0]
    timesteps = _spaced_timesteps(s["timestep_spacing"], n_train, steps, s["steps_offset"])
    rows = []
    if timesteps.max() >= n_train:
        raise UserError(f"--steps {steps}: with steps_offset {s['steps_offset']} DDIM would need timestep "
                        f"{timesteps.max()} of a {n_train}-step schedule; use fewer steps")
    if s["prediction_type"] == "epsilon" and ac[timesteps].min() == 0:  # diffusers' DDIM: NaN images
        raise UserError("--scheduler ddim: an epsilon model's image cannot be told from pure noise, where zero "
                        "terminal SNR starts (x0 = (x - sqrt(1 - a) eps) / sqrt(a) with a = 0); choose euler or dpm")
    for t in timesteps:
        prev = int(t) - n_train // steps
        a_t, b_t = ac[int(t)], 1 - ac[int(t)]
        a_prev = ac[prev] if prev >= 0 else final
        if s["prediction_type"] == "epsilon":  # x0 = (x - sqrt(b) eps) / sqrt(a)
            x0 = dict(cx=1 / math.sqrt(a_t), cm=-math.sqrt(b_t) / math.sqrt(a_t), ex=0.0, em=1.0)
        else:  # x0 = sqrt(a) x - sqrt(b) v;  eps = sqrt(a) v + sqrt(b) x
            x0 = dict(cx=math.sqrt(a_t), cm=-math.sqrt(b_t), ex=math.sqrt(b_t), em=math.sqrt(a_t))
        rows.append(dict(x0, s0=math.sqrt(a_prev), s1=math.sqrt(1 - a_prev)))
    columns = ("cx", "cm", "ex", "em", "s0", "s1")
    clip = float(s["clip_sample_range"]) if s["clip_sample"] else None
    ones = np.ones(len(timesteps), np.float32)
    return Plan("ddim", s["prediction_type"], timesteps, 1.0, ones, _table(rows, columns), columns, clip)


def _model_sigmas(config, kind):
    """float32 [n_train] sigma_t = sqrt((1 - a_t) / a_t), and alphas_cumprod, as Euler/DPM compute them."""
    ac = alphas_cumprod(config, kind)
    if _settings(kind, config)["rescale_betas_zero_snr"]:
        ac[-1] = 2.0**-24  # diffusers: close to 0 without being 0, so the first sigma is finite
    return ((np.float32(1) - ac) / ac) ** np.float32(0.5), ac


def _final_sigma(s, ac):
    if s["final_sigmas_type"] == "zero":
        return 0.0
    if s["final_sigmas_type"] == "sigma_min":
        return float(((1 - ac[0]) / ac[0]) ** 0.5)
    raise UserError(f"scheduler config: final_sigmas_type {s['final_sigmas_type']!r} is not zero or sigma_min")


def _plan_euler(s, config, steps):
    # EulerDiscreteScheduler with s_churn=0: x_prev = x + (x - x0) / sigma * (sigma_next - sigma).
    if s["interpolation_type"] != "linear" or s["timestep_type"] != "discrete":
        raise UserError("scheduler config: the euler sampler supports interpolation_type linear and "
                        "timestep_type discrete only")
    n_train = int(s["num_train_timesteps"])
    spacing = s["timestep_spacing"]
    if spacing == "linspace":
        timesteps = np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        timesteps = (np.arange(0, steps) * (n_train // steps)).round()[::-1].astype(np.float32) + s["steps_offset"]
    else:
        timesteps = np.arange(n_train, 0, -n_train / steps).round().astype(np.float32) - 1
    timesteps = timesteps.astype(np.float32)
    train_sigmas, ac = _model_sigmas(config, "euler")
    sigmas = np.interp(timesteps, np.arange(n_train), train_sigmas)
    sigmas = np.concatenate([sigmas, [_final_sigma(s, ac)]]).astype(np.float32).astype(np.float64)
    rows = []
    for i in range(steps):
        sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        if s["prediction_type"] == "epsilon":  # derivative = eps
            rows.append(dict(a=1.0, b=dt))
        else:  # x0 = -sigma / sqrt(sigma^2+1) v + x / (sigma^2+1)
            rows.append(dict(a=1 + dt * sigma / (sigma**2 + 1), b=dt / math.sqrt(sigma**2 + 1)))
    max_sigma = float(np.float32(sigmas.max()))
    init = max_sigma if spacing in ("linspace", "trailing") else math.sqrt(max_sigma**2 + 1)
    scale = (1 / np.sqrt(sigmas[:-1] ** 2 + 1)).astype(np.float32)
    return Plan("euler", s["prediction_type"], timesteps, init, scale, _table(rows, ("a", "b")), ("a", "b"))


def _plan_dpm(s, config, steps):
    # DPMSolverMultistepScheduler, deterministic dpmsolver++ of order 1 or 2: x_prev = a x + b m0 + c m1,
    # where m0 is this step's data prediction (x0) and m1 the previous step's.
    if s["algorithm_type"] != "dpmsolver++":
        raise UserError(f"scheduler config: DPM-Solver algorithm_type {s['algorithm_type']!r} is not supported "
                        "(dpmsolver++ only)")
    if s["solver_type"] not in ("midpoint", "heun") or int(s["solver_order"]) not in (1, 2):
        raise UserError("scheduler config: the dpm sampler supports solver_order 1 or 2 with solver_type "
                        "midpoint or heun")
    if s["variance_type"] is not None:
        raise UserError(f"scheduler config: variance_type {s['variance_type']!r} is not supported by the dpm sampler")
    n_train = int(s["num_train_timesteps"])
    train_sigmas, ac = _model_sigmas(config, "dpm")
    alpha32 = np.sqrt(ac)
    lambdas = np.log(alpha32) - np.log(np.sqrt(np.float32(1) - ac))
    last = n_train - int(np.searchsorted(lambdas[::-1], s["lambda_min_clipped"]))
    spacing = s["timestep_spacing"]
    if spacing == "linspace":
        timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last // (steps + 1)
        if ratio == 0:
            raise UserError(f"--steps {steps}: too many for the dpm sampler with leading timestep spacing")
        timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + s["steps_offset"]
    else:
        timesteps = np.arange(last, 0, -n_train / steps).round().astype(np.int64) - 1
    sigmas = np.interp(timesteps, np.arange(n_train), train_sigmas)
    sigmas = np.concatenate([sigmas, [_final_sigma(s, ac)]]).astype(np.float32).astype(np.float64)
    n = len(timesteps)

    def alpha_sigma_lambda(sigma):
        alpha = 1 / math.sqrt(sigma**2 + 1)
        sig = sigma * alpha
        return alpha, sig, (math.log(alpha) - math.log(sig)) if sig > 0 else math.inf

    rows = []
    for i in range(n):
        lower_final = i == n - 1 and (
            s["euler_at_final"] or (s["lower_order_final"] and n < 15) or s["final_sigmas_type"] == "zero"
        )
        first_order = int(s["solver_order"]) == 1 or i == 0 or lower_final
        alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(sigmas[i])
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(sigmas[i + 1])
        if s["prediction_type"] == "epsilon":  # x0 = (x - sigma eps) / alpha
            conv = dict(p=1 / alpha_s0, q=-sigma_s0 / alpha_s0)
        else:  # x0 = alpha x - sigma v
            conv = dict(p=alpha_s0, q=-sigma_s0)
        h = lambda_t - lambda_s0
        em1 = -1.0 if math.isinf(h) else math.expm1(-h)  # exp(-h) - 1
        a, b0 = sigma_t / sigma_s0, -alpha_t * em1
        _, _, lambda_s1 = alpha_sigma_lambda(sigmas[i - 1])
        # h == 0 (a timestep repeated by rounding, e.g. 1000 linspace steps) leaves x as it is, as
        # diffusers' formulas do in the limit; a zero previous step (r0 == 0) falls back to first order.
        if first_order or h == 0 or lambda_s0 == lambda_s1:
            rows.append(dict(conv, a=a, b=b0, c=0.0))
            continue
        r0 = (lambda_s0 - lambda_s1) / h
        # D1 = (m0 - m1) / r0, weighted by c1
        c1 = -0.5 * alpha_t * em1 if s["solver_type"] == "midpoint" else alpha_t * (em1 / h + 1.0)
        rows.append(dict(conv, a=a, b=b0 + c1 / r0, c=-c1 / r0))
    columns = ("p", "q", "a", "b", "c")
    ones = np.ones(n, np.float32)
    return Plan("dpm", s["prediction_type"], timesteps, 1.0, ones, _table(rows, columns), columns)


# --------------------------------------------------------------------------------------------
# Running a plan (pure; i may be a traced loop index)


def init_noise_sigma(plan):
    """The factor diffusers' pipelines scale standard-normal starting latents by."""
    return float(plan.init_noise_sigma)


def init_state(plan, x):
    """The sampler's fixed-shape state for latents shaped like x (float32 zeros)."""
    zeros = jnp.zeros(x.shape, jnp.float32)
    if plan.name == "pndm":  # the last 3 model outputs (newest first) and the first step's sample
        return {"ets": jnp.zeros((3,) + x.shape, jnp.float32), "cur": zeros}
    if plan.name == "dpm":  # the previous step's data prediction
        return {"prev": zeros}
    return {}


def scale_model_input(plan, x, i):
    """The model's input at step i (Euler divides by sqrt(sigma^2 + 1); the others pass x through)."""
    if plan.name != "euler":
        return x
    return (x * jnp.asarray(plan.input_scale)[i]).astype(x.dtype)


def step(plan, state, model_output, i, x):
    """One sampler step: (latents at the next, less noisy timestep, new state).

    Args:
      plan: the Plan. state: from init_state or the previous step. model_output: the model's epsilon or
        v at step i, shaped like x. i: the step index (int or traced int32). x: current latents.
    """
    c = {name: jnp.asarray(plan.coefs[:, j])[i] for j, name in enumerate(plan.columns)}
    m = model_output.astype(jnp.float32)
    xf = x.astype(jnp.float32)
    new_state = state
    if plan.name == "pndm":
        ets, cur = state["ets"], state["cur"]
        e = c["w0"] * m + c["w1"] * ets[0] + c["w2"] * ets[1] + c["w3"] * ets[2]
        sample = jnp.where(c["use_cur"] > 0, cur, xf)
        e = c["ve"] * e + c["vx"] * sample
        prev = c["sc"] * sample - c["cc"] * e
        pushed = jnp.concatenate([m[None], ets[:2]])
        new_state = {
            "ets": jnp.where(c["push"] > 0, pushed, ets),
            "cur": jnp.where(c["store_cur"] > 0, xf, cur),
        }
    elif plan.name == "ddim":
        x0 = c["cx"] * xf + c["cm"] * m
        eps = c["ex"] * xf + c["em"] * m
        if plan.clip is not None:
            x0 = jnp.clip(x0, -plan.clip, plan.clip)
        prev = c["s0"] * x0 + c["s1"] * eps
    elif plan.name == "euler":
        prev = c["a"] * xf + c["b"] * m
    else:  # dpm
        m0 = c["p"] * xf + c["q"] * m
        prev = c["a"] * xf + c["b"] * m0 + c["c"] * state["prev"]
        new_state = {"prev": m0}
    return prev.astype(x.dtype), new_state
