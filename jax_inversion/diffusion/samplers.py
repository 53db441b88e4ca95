"""Inference samplers (DDIM, DPM-Solver++(2M), Euler, Euler ancestral; Karras sigmas) configured from a diffusers scheduler config.

Each sampler reproduces the diffusers scheduler of the same kind built from the same
``scheduler_config.json`` (``DDIMScheduler`` with ``eta=0``; ``DPMSolverMultistepScheduler`` with
``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``lower_order_final=True``;
``EulerDiscreteScheduler`` with linear interpolation; ``EulerAncestralDiscreteScheduler``). The
``_karras`` names (A1111's "DPM++ 2M Karras", "Euler Karras") are the same schedulers with
``use_karras_sigmas=True``; the plain names never use Karras sigmas, whatever the config says.
``euler_a`` (A1111's "Euler a") adds fresh noise each step, drawn from a key folded with the step
index (:meth:`Sampler.step_noise`), so a run is still a function of its seed. The timestep and
per-step coefficient tables are built once on the host in numpy with diffusers' dtype choices; the
per-step functions are pure JAX indexed by a (possibly traced) step index, so a whole sampling run
is one ``lax.fori_loop`` that can be jit-compiled and differentiated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_inversion.diffusion.schedule import NoiseSchedule

SAMPLERS = ("ddim", "dpm++2m", "euler", "euler_a", "dpm++2m_karras", "euler_karras")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

_DEFAULT_SPACING = {"ddim": "leading", "dpm++2m": "linspace", "euler": "linspace", "euler_a": "linspace"}
_KARRAS_RHO = 7.0


def _get(config: Mapping, key: str, default: Any) -> Any:
    value = config.get(key)
    return default if value is None else value


def _require(config: Mapping, key: str, default: Any, allowed: tuple) -> Any:
    value = _get(config, key, default)
    if value not in allowed:
        raise ValueError(
            f"unsupported scheduler config {key}={value!r} for sampling; supported: {', '.join(map(str, allowed))}"
        )
    return value


def _spaced_timesteps(spacing: str, num_train: int, steps: int, offset: int, last: Optional[int] = None) -> np.ndarray:
    """Descending float64 timesteps for ``timestep_spacing``, as diffusers' ``set_timesteps`` computes them.

    ``last`` selects DPM-Solver's variant, which spaces ``steps + 1`` points below ``last`` and
    drops the final one for ``linspace``/``leading``.
    """
    if spacing == "linspace":
        if last is None:
            return np.linspace(0, num_train - 1, steps)[::-1].copy()
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy()
    if spacing == "leading":
        if last is None:
            return (np.arange(0, steps) * (num_train // steps)).round()[::-1] + offset
        return (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + offset
    top = num_train if last is None else last
    return np.round(np.arange(top, 0, -num_train / steps)) - 1


def _train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """float32 ``sqrt((1 - acp) / acp)`` over all training timesteps."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod).astype(np.float32)


def _with_final_sigma(sigmas: np.ndarray, train_sigmas: np.ndarray, final: str) -> np.ndarray:
    """float32 ``sigmas`` followed by the sigma after the last step: 0 (``final="zero"``) or the smallest training one."""
    last = 0.0 if final == "zero" else float(train_sigmas[0])
    return np.concatenate([sigmas, [last]]).astype(np.float32)


def _inference_sigmas(train_sigmas: np.ndarray, timesteps: np.ndarray, final: str) -> np.ndarray:
    """Training sigmas linearly interpolated at ``timesteps`` plus the final sigma (0 or the smallest)."""
    return _with_final_sigma(np.interp(timesteps, np.arange(train_sigmas.size), train_sigmas), train_sigmas, final)


def _karras_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """Karras et al.'s float64 ``rho = 7`` ramp from ``sigma_max`` down to ``sigma_min`` (diffusers' ``_convert_to_karras``)."""
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / _KARRAS_RHO), sigma_max ** (1 / _KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** _KARRAS_RHO


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of ``sigmas`` by linear interpolation in log sigma (diffusers' ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high


def _x0_and_eps(prediction_type: str, out: jax.Array, x: jax.Array, alpha, sigma):
    """Data and noise predictions from a model output at a VP point ``x = alpha * x0 + sigma * eps``."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    return out, (x - alpha * out) / sigma


def _euler_x0(prediction_type: str, out: jax.Array, x: jax.Array, sigma):
    """Denoised estimate at a VE point ``x = x0 + sigma * eps`` (Karras ``c_skip``/``c_out`` for v)."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """Host-side tables of one sampler run; methods are pure JAX functions of a step index ``i``.

    ``name`` is one of :data:`SAMPLERS`. ``timesteps`` ``[N]`` are the model's timesteps (int32;
    float32 only for the Euler samplers with ``linspace`` spacing or Karras sigmas, which give
    fractional ones). ``sigmas`` ``[N + 1]`` are the noise levels in the
    sampler's own parameterisation (``sqrt((1 - acp) / acp)``), the last one after the final step.
    ``coefs`` holds the per-step float32 constants ``step`` reads. Hashed by identity, so it can be
    a static jit argument.
    """

    name: str
    prediction_type: str
    timesteps: np.ndarray
    sigmas: np.ndarray
    coefs: Mapping[str, np.ndarray]
    init_noise_sigma: float
    clip_sample_range: Optional[float] = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def kind(self) -> str:
        """The update rule: ``ddim``, ``dpm++2m``, ``euler`` or ``euler_a`` (the name without ``_karras``)."""
        return self.name.removesuffix("_karras")

    @property
    def sigma_space(self) -> bool:
        """Whether the latents are Euler's VE ``x0 + sigma * eps`` (else VP ``alpha * x0 + sigma' * eps``)."""
        return self.kind in ("euler", "euler_a")

    @property
    def stochastic(self) -> bool:
        """Whether each step adds fresh noise (``euler_a``): :meth:`step` then needs ``noise``."""
        return self.kind == "euler_a"

    def step_noise(self, key: jax.Array, i, shape) -> Optional[jax.Array]:
        """Unit Gaussian float32 noise of step ``i`` drawn from ``key`` folded with ``i``; None for deterministic samplers."""
        if not self.stochastic:
            return None
        return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)

    def _at(self, key: str, i) -> jax.Array:
        return jnp.asarray(self.coefs[key])[i]

    def initial_latents(self, noise: jax.Array) -> jax.Array:
        """Unit Gaussian noise scaled to the first step's noise level, as pipelines prepare latents."""
        return noise * jnp.asarray(self.init_noise_sigma, noise.dtype)

    def init_state(self, latents: jax.Array):
        """Solver memory carried between steps: DPM-Solver's previous data prediction, else nothing."""
        if self.kind == "dpm++2m":
            return jnp.zeros(latents.shape, jnp.float32)
        return ()

    def timestep(self, i) -> jax.Array:
        """The model's timestep at step ``i``."""
        return jnp.asarray(self.timesteps)[i]

    def sigma(self, i) -> jax.Array:
        """Noise level at step ``i`` in the sampler's parameterisation (for guidance step scaling)."""
        return jnp.asarray(self.sigmas)[i]

    def scale_model_input(self, latents: jax.Array, i) -> jax.Array:
        """The UNet input at step ``i``: Euler's VE latents divided by ``sqrt(sigma^2 + 1)``, else unchanged."""
        if not self.sigma_space:
            return latents
        return (latents / self._at("input_scale", i)).astype(latents.dtype)

    def step(self, state, model_output: jax.Array, i, latents: jax.Array, noise: Optional[jax.Array] = None):
        """Latents at step ``i + 1`` from the model output at step ``i``; returns ``(latents, state)``.

        ``noise``: unit Gaussian noise of this step, required by stochastic samplers (see :meth:`step_noise`).
        """
        x = latents.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        if self.stochastic:
            if noise is None:
                raise ValueError(f"the {self.name} sampler adds noise each step: pass step noise (Sampler.step_noise)")
            new, state = _euler_a_step(self, state, out, i, x, noise.astype(jnp.float32))
        else:
            new, state = _STEPS[self.kind](self, state, out, i, x)
        return new.astype(latents.dtype), state


def _ddim_step(sampler: Sampler, state, out, i, x):
    alpha, sigma = sampler._at("sqrt_alpha", i), sampler._at("sqrt_one_minus_alpha", i)
    x0, eps = _x0_and_eps(sampler.prediction_type, out, x, alpha, sigma)
    if sampler.clip_sample_range is not None:
        x0 = jnp.clip(x0, -sampler.clip_sample_range, sampler.clip_sample_range)
    return sampler._at("sqrt_alpha_prev", i) * x0 + sampler._at("sqrt_one_minus_alpha_prev", i) * eps, state


def _dpm_step(sampler: Sampler, prev_x0, out, i, x):
    x0, _ = _x0_and_eps(sampler.prediction_type, out, x, sampler._at("alpha", i), sampler._at("sigma", i))
    d0 = sampler._at("d0", i)
    new = sampler._at("skip", i) * x - d0 * x0 - sampler._at("d1", i) * (x0 - prev_x0)
    return new, x0


def _euler_step(sampler: Sampler, state, out, i, x):
    sigma, sigma_next = sampler.sigma(i), sampler.sigma(i + 1)
    x0 = _euler_x0(sampler.prediction_type, out, x, sigma)
    return x + (x - x0) / sigma * (sigma_next - sigma), state


def _euler_a_step(sampler: Sampler, state, out, i, x, noise):
    sigma = sampler.sigma(i)
    x0 = _euler_x0(sampler.prediction_type, out, x, sigma)
    return x + (x - x0) / sigma * (sampler._at("sigma_down", i) - sigma) + noise * sampler._at("sigma_up", i), state


_STEPS: dict[str, Callable] = {"ddim": _ddim_step, "dpm++2m": _dpm_step, "euler": _euler_step}


def _ddim(schedule: NoiseSchedule, config: Mapping, steps: int, spacing: str) -> Sampler:
    acp = np.asarray(schedule.alphas_cumprod, np.float32)
    num_train = schedule.num_train_timesteps
    timesteps = np.round(_spaced_timesteps(spacing, num_train, steps, int(_get(config, "steps_offset", 0))))
    timesteps = timesteps.astype(np.int64)
    final = np.float32(1.0) if _get(config, "set_alpha_to_one", True) else acp[0]
    prev = timesteps - num_train // steps
    alpha = acp[timesteps]
    alpha_prev = np.where(prev >= 0, acp[np.clip(prev, 0, None)], final).astype(np.float32)
    one = np.float32(1.0)
    coefs = {
        "sqrt_alpha": np.sqrt(alpha),
        "sqrt_one_minus_alpha": np.sqrt(one - alpha),
        "sqrt_alpha_prev": np.sqrt(alpha_prev),
        "sqrt_one_minus_alpha_prev": np.sqrt(one - alpha_prev),
    }
    sigmas = np.sqrt((one - np.append(alpha, final)) / np.append(alpha, final)).astype(np.float32)
    clip = float(_get(config, "clip_sample_range", 1.0)) if _get(config, "clip_sample", True) else None
    return Sampler("ddim", schedule.prediction_type, timesteps.astype(np.int32), sigmas, coefs, 1.0, clip)


def _dpm_coefficients(sigmas: np.ndarray, first_order: np.ndarray) -> dict[str, np.ndarray]:
    """DPM-Solver++ multistep update ``x' = skip * x - d0 * x0 - d1 * (x0 - x0_prev)`` per step.

    Computed in float64 from the float32 sigmas; ``d1`` is 0 on first-order steps.
    """
    s = sigmas.astype(np.float64)
    alpha = 1.0 / np.sqrt(s**2 + 1.0)
    sig = s * alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(alpha) - np.log(sig)
        h = lam[1:] - lam[:-1]
        d0 = alpha[1:] * np.expm1(-h)
        h_prev = np.concatenate([[np.nan], lam[1:-1] - lam[:-2]])
        d1 = np.where(first_order, 0.0, 0.5 * d0 * h / h_prev)
    return {
        "alpha": (np.float32(1.0) / np.sqrt(sigmas[:-1] ** 2 + np.float32(1.0))).astype(np.float32),
        "sigma": (sigmas[:-1] / np.sqrt(sigmas[:-1] ** 2 + np.float32(1.0))).astype(np.float32),
        "skip": (sig[1:] / sig[:-1]).astype(np.float32),
        "d0": d0.astype(np.float32),
        "d1": d1.astype(np.float32),
    }


def _zero_snr_floor(schedule: NoiseSchedule, config: Mapping) -> np.ndarray:
    """``alphas_cumprod`` with diffusers' 2**-24 floor on the last value under zero-terminal-SNR rescaling."""
    acp = np.array(schedule.alphas_cumprod, np.float32)
    if config.get("rescale_betas_zero_snr"):
        acp[-1] = 2.0**-24
    return acp


def _dpm(schedule: NoiseSchedule, config: Mapping, steps: int, spacing: str, karras: bool = False) -> Sampler:
    acp = _zero_snr_floor(schedule, config)
    num_train = schedule.num_train_timesteps
    final = _require(config, "final_sigmas_type", "zero", FINAL_SIGMAS_TYPES)
    train_sigmas = _train_sigmas(acp)
    if karras:  # the whole training range, whatever the spacing; timesteps rounded (truncated for cosine betas)
        sigmas = _karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), steps)
        timesteps = _sigma_to_t(sigmas, np.log(train_sigmas))
        if _get(config, "beta_schedule", "linear") != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
        sigmas = _with_final_sigma(sigmas, train_sigmas, final)
    else:
        lambdas = np.log(np.sqrt(acp)) - np.log(np.sqrt(np.float32(1.0) - acp))
        clipped = int(np.searchsorted(lambdas[::-1], float(_get(config, "lambda_min_clipped", -np.inf))))
        timesteps = _spaced_timesteps(
            spacing, num_train, steps, int(_get(config, "steps_offset", 0)), last=num_train - clipped
        ).astype(np.int64)
        sigmas = _inference_sigmas(train_sigmas, timesteps, final)
    n = timesteps.size
    last_first_order = final == "zero" or n < 15 or bool(_get(config, "euler_at_final", False))
    index = np.arange(n)
    first_order = (index == 0) | ((index == n - 1) & last_first_order)
    coefs = _dpm_coefficients(sigmas, first_order)
    return Sampler("dpm++2m", schedule.prediction_type, timesteps.astype(np.int32), sigmas, coefs, 1.0)


def _euler(schedule: NoiseSchedule, config: Mapping, steps: int, spacing: str, karras: bool = False,
           ancestral: bool = False) -> Sampler:
    if ancestral:  # EulerAncestralDiscreteScheduler has none of these options: it always ends at sigma 0
        final = "zero"
    else:
        _require(config, "interpolation_type", "linear", ("linear",))
        _require(config, "timestep_type", "discrete", ("discrete",))
        final = _require(config, "final_sigmas_type", "zero", FINAL_SIGMAS_TYPES)
    acp = _zero_snr_floor(schedule, config)
    offset = int(_get(config, "steps_offset", 0))
    timesteps = _spaced_timesteps(spacing, schedule.num_train_timesteps, steps, offset).astype(np.float32)
    train_sigmas = _train_sigmas(acp)
    if karras:  # between the spaced sigmas' ends (or the config's sigma_min/sigma_max); fractional timesteps
        spaced = np.interp(timesteps, np.arange(train_sigmas.size), train_sigmas)
        low, high = _get(config, "sigma_min", float(spaced[-1])), _get(config, "sigma_max", float(spaced[0]))
        karras_sigmas = _karras_sigmas(float(low), float(high), steps)
        timesteps = _sigma_to_t(karras_sigmas, np.log(train_sigmas)).astype(np.float32)
        sigmas = _with_final_sigma(karras_sigmas, train_sigmas, final)
    else:
        sigmas = _inference_sigmas(train_sigmas, timesteps, final)
    top = sigmas.max()
    init = top if spacing in ("linspace", "trailing") else (top**2 + np.float32(1.0)) ** np.float32(0.5)
    if np.all(timesteps == np.round(timesteps)):
        timesteps = timesteps.astype(np.int32)
    coefs = {"input_scale": np.sqrt(sigmas[:-1] ** 2 + np.float32(1.0)).astype(np.float32)}
    if ancestral:  # the step lands at sigma_down, then noise of scale sigma_up brings it to the next sigma
        s, s_next = sigmas[:-1], sigmas[1:]
        up = (s_next**2 * (s**2 - s_next**2) / s**2) ** np.float32(0.5)
        coefs["sigma_up"] = up.astype(np.float32)
        coefs["sigma_down"] = ((s_next**2 - up**2) ** np.float32(0.5)).astype(np.float32)
    return Sampler("euler_a" if ancestral else "euler", schedule.prediction_type, timesteps, sigmas, coefs, float(init))


_BUILDERS = {
    "ddim": _ddim,
    "dpm++2m": _dpm,
    "euler": _euler,
    "euler_a": lambda *args: _euler(*args, ancestral=True),
    "dpm++2m_karras": lambda *args: _dpm(*args, karras=True),
    "euler_karras": lambda *args: _euler(*args, karras=True),
}


def make_sampler(name: str, scheduler_config: Mapping, num_inference_steps: int) -> Sampler:
    """Builds sampler ``name`` (one of :data:`SAMPLERS`) for a model's scheduler config and step count.

    Unset config keys take the defaults of the matching diffusers scheduler (e.g. ``leading``
    spacing for DDIM, ``linspace`` for the others). Dynamic thresholding is not supported.
    The config's ``use_karras_sigmas`` is ignored: the ``_karras`` names choose Karras sigmas.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    config = dict(scheduler_config or {})
    schedule = NoiseSchedule.from_config(config)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= schedule.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must lie in [1, {schedule.num_train_timesteps}] "
            "(the model's num_train_timesteps)"
        )
    if config.get("thresholding"):
        raise ValueError(
            "scheduler config thresholding=True (dynamic thresholding) is not supported for sampling; "
            "set it to false (it is meant for pixel-space models, not latent diffusion)"
        )
    spacing = _require(config, "timestep_spacing", _DEFAULT_SPACING[name.removesuffix("_karras")], TIMESTEP_SPACINGS)
    sampler = _BUILDERS[name](schedule, config, int(num_inference_steps), spacing)
    return dataclasses.replace(sampler, name=name)


def sample_loop(
    sampler: Sampler,
    denoise: Callable,
    latents: jax.Array,
    guide: Optional[Callable] = None,
    extra: Any = None,
    key: Optional[jax.Array] = None,
    guide_state: Any = None,
):
    """Runs every step of ``sampler`` from ``latents`` in one ``lax.fori_loop``.

    Args:
      sampler: the configured :class:`Sampler`.
      denoise: ``denoise(x_in, t, i)`` -> the model output (any classifier-free guidance
        applied) for the scaled input ``x_in`` at timestep ``t`` of step ``i``; with ``extra``,
        ``(output, extra_i)``.
      latents: the initial latents, already at the first noise level (see
        :meth:`Sampler.initial_latents`).
      guide: optional ``guide(x, i) -> x``, applied to the unscaled latents before step ``i``
        (layout guidance); with ``guide_state``, ``guide(x, i, state) -> (x, state)``.
      extra: optional initial value of a quantity averaged over the steps (e.g. attention maps).
      key: PRNG key of the per-step noise of stochastic samplers (``euler_a``), folded with the step
        index (:meth:`Sampler.step_noise`); required by them, ignored by the others.
      guide_state: optional initial state ``guide`` carries from step to step (a pytree of arrays,
        e.g. layout guidance's "done" flag).

    Returns:
      The final latents; ``(latents, mean of extra_i)`` when ``extra`` is given.
    """

    if sampler.stochastic and key is None:
        raise ValueError(f"the {sampler.name} sampler adds noise each step: pass sample_loop a PRNG key")

    def body(i, carry):
        x, state, total, guided = carry
        if guide is not None:
            if guide_state is None:
                x = guide(x, i)
            else:
                x, guided = guide(x, i, guided)
        out = denoise(sampler.scale_model_input(x, i), sampler.timestep(i), i)
        if extra is not None:
            out, step_extra = out
            total = total + step_extra / sampler.num_steps
        x, state = sampler.step(state, out, i, x, sampler.step_noise(key, i, x.shape))
        return x, state, total, guided

    init = (latents, sampler.init_state(latents), extra, guide_state)
    final, _, total, _ = jax.lax.fori_loop(0, sampler.num_steps, body, init)
    return final if extra is None else (final, total)
