"""Loss terms: pure functions of the arrays a train step produces.

Each term maps the step's ``outputs`` dict (``prediction``, ``target``, ``snr_weights``,
plus whatever a method's forward adds) to a scalar. An objective is a weighted sum of
terms, chosen by name in the config (``config.loss.<term> = weight``), so the train loop
never knows which method it runs.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

Term = Callable[[Mapping[str, jax.Array]], jax.Array]


def diffusion_mse(outputs: Mapping[str, jax.Array]) -> jax.Array:
    """Denoising loss: per-example mean squared error, weighted (Min-SNR), averaged over the batch."""
    error = (outputs["prediction"].astype(jnp.float32) - outputs["target"].astype(jnp.float32)) ** 2
    per_example = error.reshape(error.shape[0], -1).mean(axis=-1)
    return jnp.mean(per_example * outputs["snr_weights"])


TERMS: dict[str, Term] = {"diffusion": diffusion_mse}


def build_objective(weights: Mapping[str, float]) -> Callable:
    """``{term: weight}`` -> ``outputs -> (total, {term: value})``; zero weights are dropped."""
    unknown = sorted(set(weights) - set(TERMS))
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown}: known terms are {sorted(TERMS)}")
    active = {name: float(w) for name, w in weights.items() if float(w) != 0.0}
    if not active:
        raise ValueError("every loss weight is zero: set e.g. --config.loss.diffusion=1.0")

    def objective(outputs):
        values = {name: TERMS[name](outputs) for name in active}
        total = sum(active[name] * value for name, value in values.items())
        return total, values

    return objective
