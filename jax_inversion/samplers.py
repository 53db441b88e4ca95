"""Deterministic inference samplers (DDIM, DPM-Solver++(2M), Euler) configured from a diffusers scheduler config.

Each sampler reproduces the diffusers scheduler of the same kind built from the same
``scheduler_config.json`` (``DDIMScheduler`` with ``eta=0``; ``DPMSolverMultistepScheduler`` with
``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``lower_order_final=True`` and no Karras
sigmas; ``EulerDiscreteScheduler`` with linear interpolation and no Karras sigmas). The timestep and
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

from jax_inversion.schedule import NoiseSchedule

SAMPLERS = ("ddim", "dpm++2m", "euler")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

_DEFAULT_SPACING = {"ddim": "leading", "dpm++2m": "linspace", "euler": "linspace"}


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


def _inference_sigmas(train_sigmas: np.ndarray, timesteps: np.ndarray, final: str) -> np.ndarray:
    """Training sigmas linearly interpolated at ``timesteps`` plus the final sigma (0 or the smallest)."""
    sigmas = np.interp(timesteps, np.arange(train_sigmas.size), train_sigmas)
    last = 0.0 if final == "zero" else float(train_sigmas[0])
    return np.concatenate([sigmas, [last]]).astype(np.float32)


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

    ``timesteps`` ``[N]`` are the model's timesteps (int32; float32 only for Euler with ``linspace``
    spacing, which gives fractional ones). ``sigmas`` ``[N + 1]`` are the noise levels in the
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

    def _at(self, key: str, i) -> jax.Array:
        return jnp.asarray(self.coefs[key])[i]

    def initial_latents(self, noise: jax.Array) -> jax.Array:
        """Unit Gaussian noise scaled to the first step's noise level, as pipelines prepare latents."""
        return noise * jnp.asarray(self.init_noise_sigma, noise.dtype)

    def init_state(self, latents: jax.Array):
        """Solver memory carried between steps: DPM-Solver's previous data prediction, else nothing."""
        if self.name == "dpm++2m":
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
        if self.name != "euler":
            return latents
        return (latents / self._at("input_scale", i)).astype(latents.dtype)

    def step(self, state, model_output: jax.Array, i, latents: jax.Array):
        """Latents at step ``i + 1`` from the model output at step ``i``; returns ``(latents, state)``."""
        x = latents.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        new, state = _STEPS[self.name](self, state, out, i, x)
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


def _dpm(schedule: NoiseSchedule, config: Mapping, steps: int, spacing: str) -> Sampler:
    acp = _zero_snr_floor(schedule, config)
    num_train = schedule.num_train_timesteps
    final = _require(config, "final_sigmas_type", "zero", FINAL_SIGMAS_TYPES)
    lambdas = np.log(np.sqrt(acp)) - np.log(np.sqrt(np.float32(1.0) - acp))
    clipped = int(np.searchsorted(lambdas[::-1], float(_get(config, "lambda_min_clipped", -np.inf))))
    timesteps = _spaced_timesteps(
        spacing, num_train, steps, int(_get(config, "steps_offset", 0)), last=num_train - clipped
    ).astype(np.int64)
    sigmas = _inference_sigmas(_train_sigmas(acp), timesteps, final)
    n = timesteps.size
    last_first_order = final == "zero" or n < 15 or bool(_get(config, "euler_at_final", False))
    index = np.arange(n)
    first_order = (index == 0) | ((index == n - 1) & last_first_order)
    coefs = _dpm_coefficients(sigmas, first_order)
    return Sampler("dpm++2m", schedule.prediction_type, timesteps.astype(np.int32), sigmas, coefs, 1.0)


def _euler(schedule: NoiseSchedule, config: Mapping, steps: int, spacing: str) -> Sampler:
    _require(config, "interpolation_type", "linear", ("linear",))
    _require(config, "timestep_type", "discrete", ("discrete",))
    final = _require(config, "final_sigmas_type", "zero", FINAL_SIGMAS_TYPES)
    acp = _zero_snr_floor(schedule, config)
    offset = int(_get(config, "steps_offset", 0))
    timesteps = _spaced_timesteps(spacing, schedule.num_train_timesteps, steps, offset).astype(np.float32)
    sigmas = _inference_sigmas(_train_sigmas(acp), timesteps, final)
    top = sigmas.max()
    init = top if spacing in ("linspace", "trailing") else (top**2 + np.float32(1.0)) ** np.float32(0.5)
    if np.all(timesteps == np.round(timesteps)):
        timesteps = timesteps.astype(np.int32)
    coefs = {"input_scale": np.sqrt(sigmas[:-1] ** 2 + np.float32(1.0)).astype(np.float32)}
    return Sampler("euler", schedule.prediction_type, timesteps, sigmas, coefs, float(init))


_BUILDERS = {"ddim": _ddim, "dpm++2m": _dpm, "euler": _euler}


def make_sampler(name: str, scheduler_config: Mapping, num_inference_steps: int) -> Sampler:
    """Builds sampler ``name`` (one of :data:`SAMPLERS`) for a model's scheduler config and step count.

    Unset config keys take the defaults of the matching diffusers scheduler (e.g. ``leading``
    spacing for DDIM, ``linspace`` for the others). Dynamic thresholding is not supported.
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
    spacing = _require(config, "timestep_spacing", _DEFAULT_SPACING[name], TIMESTEP_SPACINGS)
    return _BUILDERS[name](schedule, config, int(num_inference_steps), spacing)


def sample_loop(
    sampler: Sampler,
    denoise: Callable,
    latents: jax.Array,
    guide: Optional[Callable] = None,
    extra: Any = None,
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
        (layout guidance).
      extra: optional initial value of a quantity averaged over the steps (e.g. attention maps).

    Returns:
      The final latents; ``(latents, mean of extra_i)`` when ``extra`` is given.
    """

    def body(i, carry):
        x, state, total = carry
        if guide is not None:
            x = guide(x, i)
        out = denoise(sampler.scale_model_input(x, i), sampler.timestep(i), i)
        if extra is not None:
            out, step_extra = out
            total = total + step_extra / sampler.num_steps
        x, state = sampler.step(state, out, i, x)
        return x, state, total

    final, _, total = jax.lax.fori_loop(0, sampler.num_steps, body, (latents, sampler.init_state(latents), extra))
    return final if extra is None else (final, total)
