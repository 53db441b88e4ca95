"""The train step: a pure function of (frozen weights, state, batch, rng), jit-compiled once per phase.

``make_forward`` turns a batch into everything the objective's terms read (prediction,
target, embeddings, attention maps, ...); :func:`train_step` differentiates the objective
with respect to the learned rows only and applies the optimizer; :func:`make_train_step`
binds the static pieces and jits it over the mesh. Noise, timesteps and latent samples are
drawn on device from ``fold_in(rng, step)``, so a run is independent of the device count and
of interruptions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_inversion.artifacts.extended import stage_of, stage_sources
from jax_inversion.core.errors import ConfigError
from jax_inversion.core.sharding import batch_sharded, replicated
from jax_inversion.diffusion.schedule import NoiseSchedule, add_noise, min_snr_weights, sample_timesteps, training_target
from jax_inversion.diffusion.schedule import timestep_range as schedule_timestep_range
from jax_inversion.models.loading import Pretrained
from jax_inversion.models.unet import Conditioning
from jax_inversion.models.vae import scale_latents
from jax_inversion.objectives.terms import Objective, term_gradients
from jax_inversion.text import tokens as tokens_lib
from jax_inversion.text.conditioning import encode_text, frozen_params, run_unet


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and nothing frozen)."""

    step: jax.Array
    embeddings: Any  # {encoder name: [n_tokens, d]} float32, the learned rows
    opt_state: Any
    rng: jax.Array  # the run's base key; step k uses fold_in(rng, k)
    nonfinite_steps: jax.Array  # steps skipped because loss or grads were NaN/inf


def init_state(embeddings: dict, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0 of a run that learns ``embeddings`` (``{encoder: rows}``) with ``optimizer``."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        embeddings=embeddings,
        opt_state=optimizer.init(embeddings),
        rng=jax.random.PRNGKey(seed),
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What shapes one phase's step beyond the model, its tokens and the objective: a frozen, hashable value bound
    to the step (flax's lm1b ``TransformerConfig``), not a dozen positional parameters.

    ``resolution``: training images' side (SDXL's time ids). ``min_snr_gamma``: Min-SNR weights (0 = off).
    ``trainable``: rows ``[a, b)`` this phase learns (None: all). ``num_stages`` > 1: rows ``[S, K, n, d]``, each
    example using its timestep's stage; ``separate_kv`` (K = 2): part 0 feeds keys, part 1 values. ``remat``: see
    :data:`conditioning.REMAT_POLICIES`. ``noise_offset``: diffusers' ``--noise_offset``. ``timestep_range``:
    ``(min, max)`` training timesteps (max 0: all). ``accumulation``: k sequential micro-batches per step.
    ``log_every`` > 0: per-term gradient norms at logged steps. ``concepts``: batch inversion's ``((name, seed), ...)``.
    ``whole_reference_forward``: the class-word reference forward (SeFi-IDE's attention term) runs to the UNet's
    output instead of being cut by XLA after its last captured layer; set on TPU, where libtpu (0.0.42) segfaults
    compiling the cut forward (tests/test_tpu_compile.py), at the cost of the reference's remaining layers.
    """

    resolution: int
    min_snr_gamma: float = 0.0
    trainable: Optional[tuple[int, int]] = None
    num_stages: int = 1
    separate_kv: bool = False
    remat: str = "none"
    noise_offset: float = 0.0
    timestep_range: tuple[int, int] = (0, 0)
    accumulation: int = 1
    log_every: int = 0
    concepts: tuple[tuple[str, int], ...] = ()
    whole_reference_forward: bool = False


def timestep_bounds(timestep_range: tuple[int, int], schedule: NoiseSchedule) -> tuple[int, int]:
    """``(low, high)`` of training timesteps from ``(min_timestep, max_timestep)`` (``max`` 0: all).

    Raises:
      ConfigError: the range is empty or leaves ``[0, num_train_timesteps)`` (:func:`schedule.timestep_range`'s check).
    """
    try:
        return schedule_timestep_range(schedule, timestep_range[0], timestep_range[1] or None)
    except ValueError as e:
        raise ConfigError(
            f"{e}: set 0 <= --config.train.min_timestep < --config.train.max_timestep <= {schedule.num_train_timesteps} (0 = all)"
        ) from None


def make_forward(
    model: Pretrained,
    schedule: NoiseSchedule,
    placeholder_ids: dict,
    objective,
    config: StepConfig,
    reference_ids: Optional[dict] = None,
):
    """``forward(learned, frozen, batch, rng) -> outputs``: everything the objective's terms read.

    ``config`` (:class:`StepConfig`): ``trainable`` marks the positions of the tokens this phase
    learns; ``num_stages``/``separate_kv`` pick each example's rows; ``noise_offset`` adds
    ``offset * N(0, 1)`` per example and channel to the noise; ``timestep_range`` ``(low, high)``
    draws timesteps uniformly from ``[low, high)`` (``high`` 0: ``num_train_timesteps``), as
    kohya's ``--min_timestep``/``--max_timestep``: a higher ``low`` spends the steps where an
    object's shape is decided rather than on fine detail. ``reference_ids`` (``{encoder: class
    word id}``) is used when the objective needs the class-word prompt's attention maps.

    A batch holding ``latents``/``noise``/``timesteps`` already (gradient accumulation's micro-batches
    of one batch drawn by :func:`make_draw`) is not drawn again.
    """
    min_snr_gamma, resolution, trainable = config.min_snr_gamma, config.resolution, config.trainable
    num_stages, separate_kv, remat = config.num_stages, config.separate_kv, config.remat
    needs = getattr(objective, "needs", frozenset())
    capture = tuple(getattr(objective, "capture_layers", ()))
    first_id, n_tokens = placeholder_ids["text_encoder"].first_id, len(placeholder_ids["text_encoder"].tokens)
    a, b = trainable if trainable is not None else (0, n_tokens)
    eos_id = model.tokenizer.eos_token_id
    if "reference_maps" in needs and not reference_ids:
        raise ConfigError("the objective compares with the class-word prompt: set --config.data.class_word")

    draw_batch = make_draw(model, schedule, config)

    def forward(learned, frozen, batch, rng):
        """``rng``: one key, or ``[C]`` keys (one per concept; the batch is concept-major, rows ``[C, n, d]``)."""
        concepts = rng.shape[0] if rng.ndim == 2 else 0  # stacked uint32 keys
        if "noise" in batch:
            latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
        else:
            latents, noise, timesteps = draw_batch(batch, rng)
        if concepts:
            index = jnp.repeat(jnp.arange(concepts), latents.shape[0] // concepts)
            learned_rows = {e: rows[index] for e, rows in learned.items()}  # [B, n, d]
        else:
            learned_rows = learned
        noisy = add_noise(schedule, latents, noise, timesteps)
        ids = batch["input_ids"]
        stages = stage_of(timesteps, num_stages, schedule.num_train_timesteps) if num_stages > 1 else None
        key_rows = {e: tokens_lib.stage_rows(rows, stages, 0) for e, rows in learned_rows.items()}
        states, added, token_embeds, prompt_embeds = encode_text(model, frozen, ids, key_rows, placeholder_ids, resolution)
        value_states = None
        if separate_kv:
            value_rows = {e: tokens_lib.stage_rows(rows, stages, 1) for e, rows in learned_rows.items()}
            value_states = encode_text(model, frozen, ids, value_rows, placeholder_ids, resolution)[0]
        conditioning = Conditioning(states, value_states=value_states, capture_maps=capture)
        prediction, maps = run_unet(model, frozen["unet"], noisy, timesteps, conditioning, added, remat)
        offset = ids["text_encoder"] - first_id
        positions = jnp.arange(offset.shape[-1])[None, :]
        outputs = {
            "prediction": prediction.astype(jnp.float32),
            "target": training_target(schedule, latents, noise, timesteps),
            "snr_weights": min_snr_weights(schedule, timesteps, min_snr_gamma),
            "timesteps": timesteps,
            "learned": learned,
            "token_embeds": token_embeds,
            "prompt_embeds": prompt_embeds,
            "placeholder_positions": (offset >= 0) & (offset < n_tokens),
            "trainable_positions": (offset >= a) & (offset < b),
            "prompt_positions": positions <= jnp.argmax(ids["text_encoder"] == eos_id, axis=-1)[:, None],
            "attention_maps": maps,
        }
        if "masks" in needs:
            outputs["masks"] = batch["masks"]
        if "reference_maps" in needs:
            reference = {
                e: jnp.where(v >= placeholder_ids[e].first_id, reference_ids[e], v).astype(v.dtype) for e, v in ids.items()
            }
            outputs["reference_maps"] = _attention_maps(model, frozen, reference, key_rows, placeholder_ids, resolution,
                                                        noisy, timesteps, capture, config.whole_reference_forward)
        return outputs

    return forward


def make_draw(model: Pretrained, schedule: NoiseSchedule, config: StepConfig) -> Callable:
    """``draw(batch, rng) -> (latents, noise, timesteps)``: what :func:`make_forward`'s forward draws for a
    batch (``rng`` one key, or ``[C]`` keys, one per concept of a concept-major batch)."""
    vae_config, noise_offset = model.vae.config, config.noise_offset
    low, high = timestep_bounds(config.timestep_range, schedule)

    def draw(rng, mean, std):
        rng_latent, rng_noise, rng_time = jax.random.split(rng, 3)
        latents = scale_latents(vae_config, mean + std * jax.random.normal(rng_latent, mean.shape))
        noise = jax.random.normal(rng_noise, latents.shape)
        if noise_offset:  # its own key: runs without an offset draw exactly what they drew before
            shape = (latents.shape[0],) + (1,) * (latents.ndim - 2) + (latents.shape[-1],)  # [B, 1, 1, C]
            noise = noise + noise_offset * jax.random.normal(jax.random.fold_in(rng_noise, 1), shape)
        return latents, noise, sample_timesteps(rng_time, latents.shape[0], schedule, low, high)

    def draw_batch(batch, rng):
        mean, std = batch["latent_mean"], batch["latent_std"]
        if rng.ndim == 2:  # stacked uint32 keys, one per concept
            per_concept = lambda x: x.reshape((rng.shape[0], -1) + x.shape[1:])
            drawn = jax.vmap(draw)(rng, per_concept(mean), per_concept(std))
            return tuple(x.reshape((-1,) + x.shape[2:]) for x in drawn)
        return draw(rng, mean, std)

    return draw_batch


def _attention_maps(model, frozen, ids, rows, placeholder_ids, resolution, noisy, timesteps, capture, whole_forward=False):
    """The captured cross-attention maps of the UNet on prompt ``ids`` (no gradient): SeFi-IDE's class-word reference.

    ``whole_forward``: the maps depend on the prediction (times 0, which XLA does not fold for floats), so the
    forward is not cut after the last captured layer (see :class:`StepConfig`)."""
    states, added, _, _ = encode_text(model, frozen, ids, rows, placeholder_ids, resolution)
    prediction, maps = run_unet(model, frozen["unet"], noisy, timesteps, Conditioning(states, capture_maps=capture), added)
    if whole_forward:
        kept = 0.0 * jnp.mean(prediction.astype(jnp.float32))
        maps = {name: value + kept.astype(value.dtype) for name, value in maps.items()}
    return jax.lax.stop_gradient(maps)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _per_concept_norms(tree) -> jax.Array:
    """``[C]``: the global norm of each concept's slice (leading axis) of ``tree``."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) for g in jax.tree_util.tree_leaves(tree)))


def concept_objective(objective: Callable, names: Sequence[str]) -> Callable:
    """Batch inversion: ``objective`` applied to each concept's slice of the (concept-major) outputs, summed."""

    def loss(outputs):
        split = {k: jax.tree_util.tree_map(lambda x: x.reshape((len(names), -1) + x.shape[1:]), v)
                 for k, v in outputs.items() if k != "learned"}
        totals, terms = jax.vmap(objective)({**split, "learned": outputs["learned"]})
        metrics = {k: v.mean() for k, v in terms.items()}
        metrics.update({f"concept/{name}": totals[i] for i, name in enumerate(names)})
        return totals.sum(), metrics

    return loss


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What :func:`train_step` is made of, built once by :func:`make_train_step` and bound to it.

    Attributes:
      forward: ``forward(learned, frozen, batch, rng) -> outputs`` (:func:`make_forward`).
      objective: ``objective(outputs) -> (loss, terms)``.
      optimizer, lr_schedule: the optax chain and its learning-rate schedule (for metrics).
      row_mask: ``[n, 1]`` bool, the rows this phase learns; the others get no gradient and
        no update (bit-identical).
      concept_keys, concept_names: batch inversion's per-concept keys and names, else None/().
      term_objective, log_every: when given (the :class:`Objective` behind ``objective``, and
        ``log_every`` > 0), also each term's gradient norm w.r.t. the learned rows,
        ``grad_norm/<term>``, at the steps the loop logs (``step + 1`` a multiple of ``log_every``;
        zeros at the others). The forward runs once; on a logged step each term costs one more
        backward pass (:func:`objectives.term_gradients`), inside a ``lax.cond``, so other steps
        pay nothing and there is one compiled program.
      accumulation: k > 1 splits the batch into k micro-batches (examples ``j, j + k, ...``) run one
        after the other (``lax.scan``: activations of one micro-batch at a time); noise and
        timesteps are drawn for the whole batch first, and the loss and gradients averaged, so
        the step equals the unsplit one up to float rounding. One optimizer step either way.
        (Per-term gradient norms are not computed then.)
      draw: with ``accumulation`` > 1, ``draw(batch, rng)`` (:func:`make_draw`) draws the whole batch.
      stage_source: stage rows ``[S, ...]``: after the update, stage ``s`` takes stage ``stage_source[s]``'s rows
        (:func:`extended.stage_sources`: stages no trained timestep reaches follow the nearest trained one).
    """

    forward: Callable
    objective: Callable
    optimizer: optax.GradientTransformation
    lr_schedule: Callable
    row_mask: jax.Array
    concept_keys: Optional[jax.Array] = None
    concept_names: Sequence[str] = ()
    term_objective: Optional[Objective] = None
    log_every: int = 0
    accumulation: int = 1
    draw: Optional[Callable] = None
    stage_source: Optional[tuple[int, ...]] = None


def train_step(frozen: dict, state: TrainState, batch: dict, rng: jax.Array, parts: StepParts) -> tuple[TrainState, dict]:
    """One optimizer step of the learned rows; a step whose loss, gradients or update are not
    finite is counted in ``nonfinite_steps`` and not applied.

    Args:
      frozen: the frozen weights (:func:`conditioning.frozen_params`).
      state: the current :class:`TrainState`.
      batch: sharded host batch (see :func:`make_train_step`).
      rng: the run's base key; this step draws from ``fold_in(rng, state.step)`` (batch
        inversion: from ``fold_in(concept_keys[c], state.step)`` per concept).
      parts: the step's :class:`StepParts`.

    Returns:
      ``(new_state, metrics)``: loss, ``loss/<term>``, ``grad_norm``, ``learning_rate``,
      ``embedding_norm`` and, in batch inversion, ``concept/<name>`` and ``concept/<name>/grad_norm``.
    """
    if parts.concept_keys is not None:
        step_rng = jax.vmap(lambda key: jax.random.fold_in(key, state.step))(parts.concept_keys)
    else:
        step_rng = jax.random.fold_in(rng, state.step)
    learned_rows_only = lambda tree: jax.tree_util.tree_map(lambda g: jnp.where(parts.row_mask, g, 0.0), tree)
    term_norms = {}
    if parts.accumulation > 1:
        (loss, terms), grads = _accumulated_grads(
            frozen, state.embeddings, batch, step_rng, parts.forward, parts.draw, parts.objective, parts.accumulation)
    elif parts.term_objective is None or parts.log_every <= 0:
        loss_fn = lambda learned: parts.objective(parts.forward(learned, frozen, batch, step_rng))
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.embeddings)
    else:
        loss, terms, grads, term_norms = _grads_with_term_norms(
            lambda learned: parts.forward(learned, frozen, batch, step_rng), state, parts.term_objective, parts.log_every,
            learned_rows_only)
    grads = learned_rows_only(grads)
    new_state, embeddings = _apply_if_finite(state, grads, loss, parts.optimizer, parts.row_mask)
    if parts.stage_source is not None:
        follow = lambda tree: jax.tree_util.tree_map(lambda rows: rows[jnp.asarray(parts.stage_source)], tree)
        new_state, embeddings = new_state.replace(embeddings=follow(new_state.embeddings)), follow(embeddings)
    metrics = {
        "loss": loss,
        **{(k if k.startswith("concept/") else f"loss/{k}"): v for k, v in terms.items()},
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": parts.lr_schedule(state.step),
        "embedding_norm": jnp.linalg.norm(embeddings["text_encoder"], axis=-1).mean(),
    }
    metrics.update({f"grad_norm/{name}": norm for name, norm in term_norms.items()})  # each term's part of the gradient
    if parts.concept_names:  # each concept's gradient norm (what its clipping sees)
        norms = _per_concept_norms(grads)
        metrics.update({f"concept/{name}/grad_norm": norms[i] for i, name in enumerate(parts.concept_names)})
    return new_state, metrics


def _grads_with_term_norms(forward_of: Callable, state: TrainState, term_objective: Objective, log_every: int,
                           learned_rows_only: Callable):
    """``(loss, terms, grads, term_norms)``: the objective's gradient through one forward whose pullback each
    term reuses; the terms' gradient norms only where ``step + 1`` is a multiple of ``log_every`` (zeros elsewhere)."""
    outputs, pullback = jax.vjp(forward_of, state.embeddings)
    loss, objective_pullback, terms = jax.vjp(term_objective, outputs, has_aux=True)
    (grads,) = pullback(objective_pullback(jnp.ones_like(loss))[0])

    def norms_of_terms():
        parts = term_gradients(term_objective, outputs, pullback)
        return {name: optax.tree.norm(learned_rows_only(g)) for name, g in parts.items()}

    skipped = lambda: {name: jnp.zeros((), jnp.float32) for name in term_objective.weights}
    return loss, terms, grads, jax.lax.cond((state.step + 1) % log_every == 0, norms_of_terms, skipped)


def _apply_if_finite(state: TrainState, grads, loss, optimizer, row_mask) -> tuple[TrainState, dict]:
    """``(new_state, candidate_rows)``: the optimizer's update of the learned rows, kept only when the loss, the
    gradients and the updated rows are all finite (else counted in ``nonfinite_steps``)."""
    finite = jnp.isfinite(loss) & _all_finite(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.embeddings)
    embeddings = optax.apply_updates(state.embeddings, updates)
    embeddings = jax.tree_util.tree_map(lambda new, old: jnp.where(row_mask, new, old), embeddings, state.embeddings)
    finite &= _all_finite(embeddings)  # an update can overflow even from finite gradients
    keep = lambda new, old: jnp.where(finite, new, old)
    new_state = state.replace(
        step=state.step + 1,
        embeddings=jax.tree_util.tree_map(keep, embeddings, state.embeddings),
        opt_state=jax.tree_util.tree_map(keep, opt_state, state.opt_state),
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
    )
    return new_state, embeddings


def _accumulated_grads(frozen, learned, batch, rng, forward, draw, objective, k: int):
    """``((loss, terms), grads)`` of ``batch`` as the mean over ``k`` strided micro-batches run in sequence."""
    latents, noise, timesteps = draw(batch, rng)
    full = {**batch, "latents": latents, "noise": noise, "timesteps": timesteps}
    # [B, ...] -> [k, B / k, ...], micro-batch j = examples j, j + k, ...: each stays spread over the devices
    # and, in batch inversion, concept-major.
    micro = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), full)

    def one(_, part):
        loss_fn = lambda rows: objective(forward(rows, frozen, part, rng))
        return None, jax.value_and_grad(loss_fn, has_aux=True)(learned)

    _, stacked = jax.lax.scan(one, None, micro)
    return jax.tree_util.tree_map(lambda x: x.mean(axis=0), stacked)


def _with_term_norm(step: Callable, term: str) -> Callable:
    """``step`` whose metrics also hold ``grad_norm/<term>`` (= ``grad_norm``): for one-term objectives."""

    def with_norm(*args):
        state, metrics = step(*args)
        return state, {**metrics, f"grad_norm/{term}": metrics["grad_norm"]}

    return with_norm


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """``step(state, batch, rng) -> (state, metrics)``: the jitted :func:`train_step` and the
    frozen weights it closes over (``jitted(frozen, state, batch, rng)``, e.g. to lower it)."""

    jitted: Any
    frozen: dict

    def __call__(self, state: TrainState, batch: dict, rng: jax.Array):
        return self.jitted(self.frozen, state, batch, rng)


def make_train_step(
    model: Pretrained,
    schedule: NoiseSchedule,
    placeholder_ids: dict,
    optimizer: optax.GradientTransformation,
    objective: Callable,
    lr_schedule: Callable,
    mesh: jax.sharding.Mesh,
    config: StepConfig,
    reference_ids: Optional[dict] = None,
) -> CompiledStep:
    """:func:`train_step` for this model and objective, jit-compiled over ``mesh`` (state donated).

    ``config.concepts`` (``((name, seed), ...)``, batch inversion): the learned rows are ``[C, n, d]`` and the
    batch is concept-major (``B / C`` examples each). Concept ``c`` draws its noise from
    ``fold_in(PRNGKey(seed_c), step)`` and has its own objective (summed over concepts), so its
    rows follow exactly the updates of training it alone with that seed.

    ``batch`` holds ``latent_mean``/``latent_std`` ``[B, h, w, c]``, ``input_ids``
    ``{encoder: [B, L]}`` and, when the objective needs them, ``masks`` ``[B, h, w]``, all
    sharded on ``data``. Only rows ``config.trainable`` change. See :func:`make_forward` for the rest.

    ``config.log_every`` > 0: every term's gradient norm w.r.t. the learned rows, ``grad_norm/<term>``,
    at the steps the loop logs (where ``step + 1`` is a multiple of it). One term: it is
    ``grad_norm``, every step, for free. Several: see :func:`train_step`. Not in batch inversion,
    nor with ``accumulation`` > 1 (gradient accumulation, see :func:`train_step`).
    """
    forward = make_forward(model, schedule, placeholder_ids, objective, config, reference_ids)
    trainable, concepts, accumulation, log_every = config.trainable, config.concepts, config.accumulation, config.log_every
    n_tokens = len(placeholder_ids["text_encoder"].tokens)
    a, b = trainable if trainable is not None else (0, n_tokens)
    names = tuple(name for name, _ in concepts or ())
    parts = StepParts(
        forward=forward,
        objective=concept_objective(objective, names) if concepts else objective,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        row_mask=jnp.asarray((np.arange(n_tokens) >= a) & (np.arange(n_tokens) < b))[:, None],
        concept_keys=jnp.stack([jax.random.PRNGKey(seed) for _, seed in concepts]) if concepts else None,
        concept_names=names,
        accumulation=accumulation,
        draw=make_draw(model, schedule, config),
        stage_source=_untrained_stage_source(config, schedule),
    )
    weights = getattr(objective, "weights", {})
    if log_every > 0 and not concepts and len(weights) > 1 and accumulation == 1:
        parts = dataclasses.replace(parts, term_objective=objective, log_every=log_every)
    step = functools.partial(train_step, parts=parts)
    if log_every > 0 and not concepts and len(weights) == 1:  # its gradient is the whole gradient
        step = _with_term_norm(step, next(iter(weights)))
    same, split = replicated(mesh), batch_sharded(mesh)
    jitted = jax.jit(step, in_shardings=(same, same, split, same), out_shardings=(same, same), donate_argnums=(1,))
    return CompiledStep(jitted, place_frozen(frozen_params(model), same))


def _untrained_stage_source(config: StepConfig, schedule: NoiseSchedule) -> Optional[tuple[int, ...]]:
    """:func:`extended.stage_sources` where some stage lies outside the training timesteps, else None."""
    if config.num_stages <= 1:
        return None
    source = stage_sources(config.num_stages, schedule.num_train_timesteps, *timestep_bounds(config.timestep_range, schedule))
    return None if source == tuple(range(config.num_stages)) else source


def place_frozen(frozen: dict, sharding) -> dict:
    """The frozen weights on the mesh; a shapes-only model's leaves become ``ShapeDtypeStruct`` s with that
    sharding (what lowering for a topology with no devices here needs)."""
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(frozen)):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), frozen)
    return jax.device_put(frozen, sharding)
