"""The optimizer of the learned rows: optional clipping, then AdamW on a warmup schedule."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jax_inversion.core.errors import ConfigError


def clip_per_concept(max_norm: float) -> optax.GradientTransformation:
    """``clip_by_global_norm`` applied to each concept (leading axis of every leaf) on its own."""

    def update(updates, state, params=None):
        leaves = jax.tree_util.tree_leaves(updates)
        norms = jnp.sqrt(sum(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for x in leaves))  # [C]

        def clip(x):
            norm = norms.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
            return jnp.where(norm < max_norm, x, (x / norm) * max_norm)

        return jax.tree_util.tree_map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


SCHEDULES = ("constant", "cosine", "linear", "cosine_restarts")


def parse_piecewise(text: str) -> tuple[list[float], list[int]]:
    """A1111's ``"5e-3:200, 1e-3:1000, 1e-4"``: rate 5e-3 until step 200, 1e-3 until 1000, then
    1e-4 (a last rate with a step is kept after it) -> ``(rates, boundaries)``."""
    rates, boundaries = [], []
    parts = [p.strip() for p in text.split(",")]
    try:
        for i, part in enumerate(parts):
            rate, _, until = part.partition(":")
            rates.append(float(rate))
            if until.strip():
                boundaries.append(int(until))
            elif i != len(parts) - 1:
                raise ValueError("only the last rate may omit its step")
        if any(r < 0 for r in rates) or any(b <= a for a, b in zip([0] + boundaries, boundaries)):
            raise ValueError("rates must be >= 0 and steps increasing")
    except ValueError as e:
        raise ConfigError(
            f"train.lr_schedule {text!r} is not a piecewise schedule ({e}): write rate:step pairs such as "
            f"'5e-3:200, 1e-3:1000' or one of {', '.join(SCHEDULES)}"
        ) from None
    if len(boundaries) == len(rates):  # the last rate also has a step: it holds after it
        boundaries = boundaries[:-1]
    return rates, boundaries


def lr_schedule(train_config: ml_collections.ConfigDict, global_batch: int) -> optax.Schedule:
    """Warmup then constant, cosine, linear (to 0 at num_steps), cosine with hard restarts
    (``train.lr_cycles``), or an A1111 piecewise string (rates as written: no ``scale_lr``)."""
    name = str(train_config.lr_schedule).strip()
    lr = train_config.learning_rate * (global_batch if train_config.scale_lr else 1)
    steps, warmup = train_config.num_steps, max(train_config.warmup_steps, 0)
    after = max(steps - warmup, 1)
    if ":" in name:
        rates, boundaries = parse_piecewise(name)
        return optax.join_schedules([optax.constant_schedule(r) for r in rates], boundaries)
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
    if name == "constant":
        main = optax.constant_schedule(lr)
    elif name == "linear":
        main = optax.linear_schedule(lr, 0.0, after)
    elif name == "cosine_restarts":
        cycles = max(int(train_config.get("lr_cycles", 1)), 1)
        length = -(-after // cycles)
        main = optax.join_schedules([optax.cosine_decay_schedule(lr, length)] * cycles, [length * i for i in range(1, cycles)])
    else:
        raise ConfigError(
            f"unknown train.lr_schedule {name!r}: use one of {', '.join(SCHEDULES)} or a piecewise '5e-3:200, 1e-3:1000'"
        )
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup]) if warmup else main


def make_optimizer(
    train_config: ml_collections.ConfigDict, global_batch: int, per_concept: bool = False
) -> optax.GradientTransformation:
    """AdamW on the learned rows on :func:`lr_schedule`, optional gradient clipping
    (by global norm, or by each concept's norm when ``per_concept``: rows ``[C, ...]``)."""
    schedule = lr_schedule(train_config, global_batch)
    clip = clip_per_concept if per_concept else optax.clip_by_global_norm
    parts = [clip(train_config.max_grad_norm)] if train_config.max_grad_norm > 0 else []
    parts.append(
        optax.adamw(
            schedule,
            b1=train_config.adam_b1,
            b2=train_config.adam_b2,
            eps=train_config.adam_eps,
            weight_decay=train_config.weight_decay,
        )
    )
    return optax.chain(*parts), schedule
