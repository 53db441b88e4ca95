"""DDPM training noise schedule read from a diffusers ``scheduler_config.json``.

The betas and ``alphas_cumprod`` are computed once on the host in numpy, reproducing the dtype
choices of diffusers' ``DDPMScheduler`` (torch float32 betas, float64-accumulated cumprod) so
that they agree with it to float32 rounding. Everything that runs per step (noising, targets,
SNR weights, timestep sampling) is a pure JAX function of a :class:`NoiseSchedule` pytree and can
be traced inside a jit-compiled train step.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace``: float32 step, fused multiply-add from each end toward the middle.

    ``np.linspace`` rounds differently, which shifts ``alphas_cumprod`` by up to ~1e-7.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    from_start = np.float64(start32) + step * idx
    from_end = np.float64(end32) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, from_start, from_end).astype(np.float32)


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide cosine schedule (diffusers ``betas_for_alpha_bar``): python floats, then float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """float32 cumulative product accumulated in float64, as torch's CPU ``cumprod`` does."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale float32 betas so the final timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    betas = np.asarray(betas, np.float32)
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = alphas_bar_sqrt - last
    alphas_bar_sqrt = alphas_bar_sqrt * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _choice(config: Mapping, key: str, allowed: tuple) -> str:
    value = config.get(key, _DEFAULTS[key])
    if value is None:
        value = _DEFAULTS[key]
    if value not in allowed:
        raise ValueError(
            f"unsupported scheduler config {key}={value!r}; supported: {', '.join(allowed)}"
        )
    return value


@flax.struct.dataclass
class NoiseSchedule:
    """Cumulative signal fractions ``alphas_cumprod[t]`` plus the static prediction setup."""

    alphas_cumprod: jax.Array
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)

    @classmethod
    def from_config(cls, config: Mapping) -> "NoiseSchedule":
        """Build the schedule from a diffusers scheduler config dict (DDPMScheduler semantics)."""
        config = dict(config or {})
        prediction_type = _choice(config, "prediction_type", PREDICTION_TYPES)
        trained_betas = config.get("trained_betas")
        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float32).reshape(-1)
        else:
            schedule = _choice(config, "beta_schedule", BETA_SCHEDULES)
            num_steps = config.get("num_train_timesteps", _DEFAULTS["num_train_timesteps"])
            if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
                raise ValueError(
                    f"unsupported scheduler config num_train_timesteps={num_steps!r}; "
                    "supported: a positive integer"
                )
            num_steps = int(num_steps)
            beta_start = float(config.get("beta_start", _DEFAULTS["beta_start"]))
            beta_end = float(config.get("beta_end", _DEFAULTS["beta_end"]))
            if schedule == "linear":
                betas = _linspace_f32(beta_start, beta_end, num_steps)
            elif schedule == "scaled_linear":
                betas = _linspace_f32(beta_start**0.5, beta_end**0.5, num_steps) ** 2
            else:
                betas = _cosine_betas(num_steps)
        if betas.size < 1:
            raise ValueError("unsupported scheduler config trained_betas=[]; supported: a non-empty list")
        if config.get("rescale_betas_zero_snr"):
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = _cumprod_f32(np.float32(1.0) - betas)
        return cls(
            alphas_cumprod=jnp.asarray(alphas_cumprod, dtype=jnp.float32),
            prediction_type=prediction_type,
            num_train_timesteps=int(betas.size),
        )


def _coefficients(schedule: NoiseSchedule, timesteps, like: jax.Array):
    """``sqrt(acp[t])`` and ``sqrt(1 - acp[t])`` in ``like``'s dtype, shaped to broadcast over it."""
    acp = schedule.alphas_cumprod[jnp.asarray(timesteps)]
    acp = acp.reshape(acp.shape + (1,) * (like.ndim - acp.ndim))
    return jnp.sqrt(acp).astype(like.dtype), jnp.sqrt(1.0 - acp).astype(like.dtype)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """Forward diffusion ``x_t = sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise`` (leading batch dim)."""
    a, s = _coefficients(schedule, timesteps, x0)
    return a * x0 + s * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """v-prediction target ``sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * x0``."""
    a, s = _coefficients(schedule, timesteps, x0)
    return a * noise - s * x0


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """What the UNet should predict for this schedule's ``prediction_type``."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, timesteps)
    if schedule.prediction_type == "sample":
        return x0
    raise ValueError(
        f"unsupported prediction_type={schedule.prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}"
    )


def snr(schedule: NoiseSchedule, timesteps) -> jax.Array:
    """Signal-to-noise ratio ``acp[t] / (1 - acp[t])``."""
    acp = schedule.alphas_cumprod[jnp.asarray(timesteps)]
    return acp / (1.0 - acp)


def min_snr_weights(schedule: NoiseSchedule, timesteps, gamma: Optional[float]) -> jax.Array:
    """Min-SNR-gamma per-sample loss weights (Hang et al. 2023), as in diffusers' training scripts.

    epsilon: ``min(snr, gamma) / snr`` (1 where snr == 0, its limit, so zero-terminal-SNR
    schedules stay finite); v_prediction: ``min(snr, gamma) / (snr + 1)``; sample:
    ``min(snr, gamma)``. Ones when ``gamma`` is None or <= 0.
    """
    timesteps = jnp.asarray(timesteps)
    if gamma is None or gamma <= 0:
        return jnp.ones(timesteps.shape, jnp.float32)
    ratio = snr(schedule, timesteps)
    clipped = jnp.minimum(ratio, jnp.float32(gamma))
    if schedule.prediction_type == "epsilon":
        positive = ratio > 0
        return jnp.where(positive, clipped / jnp.where(positive, ratio, 1.0), 1.0)
    if schedule.prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    if schedule.prediction_type == "sample":
        return clipped
    raise ValueError(
        f"unsupported prediction_type={schedule.prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}"
    )


def timestep_range(schedule: NoiseSchedule, low: int = 0, high: Optional[int] = None) -> tuple[int, int]:
    """``(low, high)`` with ``high`` defaulting to ``num_train_timesteps``.

    Raises:
      ValueError: ``[low, high)`` is empty or leaves ``[0, num_train_timesteps)``.
    """
    high = schedule.num_train_timesteps if high is None else high
    if not 0 <= low < high <= schedule.num_train_timesteps:
        raise ValueError(
            f"timestep range [{low}, {high}) must lie within [0, {schedule.num_train_timesteps})"
        )
    return low, high


def sample_timesteps(
    rng: jax.Array, batch: int, schedule: NoiseSchedule, low: int = 0, high: Optional[int] = None
) -> jax.Array:
    """``batch`` uniform int32 timesteps in ``[low, high)``; ``high`` defaults to ``num_train_timesteps``."""
    low, high = timestep_range(schedule, low, high)
    return jax.random.randint(rng, (batch,), low, high, dtype=jnp.int32)
