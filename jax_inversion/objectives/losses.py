"""Auxiliary losses of the inversion methods: pure, jit-able JAX functions of arrays.

Context InfoNCE (CoRe-style word contexts), the semantic-inversion anchor loss with its
non-negative OMP codes, the released-code anchor prompt loss, Compositional Inversion's
attention-location loss, SeFi-IDE's attention matching, and Break-A-Scene's masked
denoising loss. Math is float32 whatever the input dtype. The array functions are
``jax.jit``-wrapped (``max_atoms`` and ``side`` static) and compose inside a caller's jit.
``word_embedding`` and ``word_table`` are the numpy helpers that turn words into the
constant rows these take.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_inversion.text.tokens import word_embedding

RIDGE = 1e-6
NNLS_STEPS = 100
SELECTION_TOLERANCE = 1e-5
RATIO_EPS = 1e-8


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _unit(x: jax.Array) -> jax.Array:
    """Rows scaled to unit length; zero rows stay zero instead of becoming NaN."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` where ``mask``; 0.0 when the mask selects nothing."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@jax.jit
def info_nce_context(
    v: jax.Array,
    positives: jax.Array,
    positive_mask: jax.Array,
    negatives: jax.Array,
    negative_mask: jax.Array,
    temperature: float = 0.07,
) -> jax.Array:
    """Multi-positive InfoNCE pulling each concept embedding towards its context words.

    v [n, d]; positives [n, P, d] with positive_mask [n, P]; negatives [n, N, d] with
    negative_mask [n, N] (False marks padding). With s = cos(v_i, w) / temperature,
    loss_i = logsumexp(s over valid positives and negatives) - logsumexp(s over valid
    positives). Returns the mean over rows with at least one valid positive (0.0 if none).
    Words are constants: gradient reaches ``v`` only.
    """
    v = _unit(_f32(v))
    positives = _unit(jax.lax.stop_gradient(_f32(positives)))
    negatives = _unit(jax.lax.stop_gradient(_f32(negatives)))
    positive_mask = jnp.asarray(positive_mask, bool)
    negative_mask = jnp.asarray(negative_mask, bool)
    has_positive = jnp.any(positive_mask, axis=-1)
    # Rows without positives get a finite stand-in set (all columns) so no NaN reaches the gradient.
    positive_mask = positive_mask | ~has_positive[:, None]
    positive_logits = jnp.einsum("nd,npd->np", v, positives) / temperature
    negative_logits = jnp.einsum("nd,nkd->nk", v, negatives) / temperature
    all_logits = jnp.concatenate([positive_logits, negative_logits], axis=-1)
    all_mask = jnp.concatenate([positive_mask, negative_mask], axis=-1)
    per_row = jax.nn.logsumexp(all_logits, axis=-1, where=all_mask) - jax.nn.logsumexp(
        positive_logits, axis=-1, where=positive_mask
    )
    return _masked_mean(per_row, has_positive)


def word_table(tokenizer, table, word_lists: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Embeds n word lists as padded rows [n, W, d] float32 and a validity mask [n, W] bool.

    W is the longest list's length (at least 1); padding rows are zero and masked out.
    """
    table = np.asarray(table, np.float32)
    width = max([1] + [len(words) for words in word_lists])
    rows = np.zeros((len(word_lists), width, table.shape[-1]), np.float32)
    mask = np.zeros((len(word_lists), width), bool)
    for i, words in enumerate(word_lists):
        for j, word in enumerate(words):
            rows[i, j] = word_embedding(tokenizer, table, word)
            mask[i, j] = True
    return rows, mask


def _nonnegative_refit(gram: jax.Array, correlations: jax.Array, support: jax.Array) -> jax.Array:
    """Non-negative least squares restricted to ``support``: coefficients [A], zero off it.

    Starts from the clipped ridge solution of the normal equations, then takes projected
    gradient steps of size 1/L (L = the support Gram's largest eigenvalue). When the
    unconstrained solution is already non-negative it is a fixed point, so the fit is exact.
    """
    on = support.astype(jnp.float32)
    support_gram = gram * on[:, None] * on[None, :]
    system = support_gram + jnp.diag(1.0 - on) + RIDGE * jnp.eye(gram.shape[0], dtype=jnp.float32)
    start = jnp.maximum(jnp.linalg.solve(system, correlations * on), 0.0) * on
    step = 1.0 / jnp.maximum(jnp.linalg.eigvalsh(support_gram)[-1], 1e-12)

    def projected_step(_, coefficients):
        gradient = support_gram @ coefficients - correlations * on
        return jnp.maximum(coefficients - step * gradient, 0.0) * on

    return jax.lax.fori_loop(0, NNLS_STEPS, projected_step, start)


@functools.partial(jax.jit, static_argnames="max_atoms")
def nonnegative_omp(target: jax.Array, dictionary: jax.Array, max_atoms: int) -> jax.Array:
    """Non-negative orthogonal matching pursuit: sparse codes [A] of target [d] over dictionary [A, d].

    Runs ``max_atoms`` (static) rounds. Each adds the unselected atom with the largest
    positive correlation with the residual (positive beyond float noise: 1e-5 relative
    to |atom| |target|; none such, none added) and refits all support coefficients by
    non-negative least squares. The result is >= 0 with at most ``max_atoms`` nonzeros.
    The selection is discrete: callers treat the codes as constants (stop_gradient).
    """
    target = _f32(target)
    dictionary = _f32(dictionary)
    gram = dictionary @ dictionary.T
    correlations = dictionary @ target
    noise_floor = SELECTION_TOLERANCE * jnp.linalg.norm(dictionary, axis=-1) * jnp.linalg.norm(target)

    def add_atom(_, state):
        coefficients, support = state
        residual_correlations = correlations - gram @ coefficients
        candidates = jnp.where(support, -jnp.inf, residual_correlations - noise_floor)
        best = jnp.argmax(candidates)
        support = support.at[best].set(support[best] | (candidates[best] > 0.0))
        return _nonnegative_refit(gram, correlations, support), support

    atoms = dictionary.shape[0]
    state = (jnp.zeros(atoms, jnp.float32), jnp.zeros(atoms, bool))
    coefficients, _ = jax.lax.fori_loop(0, min(int(max_atoms), atoms), add_atom, state)
    return coefficients


@functools.partial(jax.jit, static_argnames="max_atoms")
def anchor_sparse_codes(v: jax.Array, anchors: jax.Array, max_atoms: int) -> jax.Array:
    """Non-negative OMP codes of each row of v [n, d] over anchors [A, d] -> [n, A]."""
    return jax.vmap(lambda row: nonnegative_omp(row, anchors, max_atoms))(v)


@functools.partial(jax.jit, static_argnames="max_atoms")
def anchor_sparse_loss(v: jax.Array, anchors: jax.Array, max_atoms: int = 5, elements=1.0) -> jax.Array:
    """Semantic-inversion anchor loss: pulls each embedding towards its own sparse anchor set.

    delta = stop_gradient(anchor_sparse_codes(v, anchors, max_atoms)) [n, A];
    returns sum_i sum_j delta_ij |v_i - e_j|^2 / elements. With ``elements`` = L x d (the
    prompt's input embeddings, 77 x 768 for SD1.5) it is on the scale of the released code's
    loss, :func:`anchor_prompt_loss` (a mean over those elements): for a row that is one
    anchor plus an offset, the two are equal.
    """
    v = _f32(v)
    anchors = _f32(anchors)
    codes = jax.lax.stop_gradient(anchor_sparse_codes(v, anchors, max_atoms))
    squared_distances = jnp.sum((v[:, None, :] - anchors[None, :, :]) ** 2, axis=-1)
    return jnp.sum(codes * squared_distances) / elements


@jax.jit
def anchor_prompt_loss(prompt_embeds: jax.Array, anchor_embeds: jax.Array) -> jax.Array:
    """Released-code anchor loss: mean squared error of prompt_embeds [B, L, d] to constant anchor_embeds."""
    difference = _f32(prompt_embeds) - jax.lax.stop_gradient(_f32(anchor_embeds))
    return jnp.mean(difference**2)


def _resize_masks(masks: jax.Array, height: int, width: int) -> jax.Array:
    """masks [B, H, W] -> [B, height, width] by area averaging.

    Exact block averages when H, W are multiples of height, width; otherwise
    ``jax.image.resize`` with antialiased "linear" (triangle-filter downsampling,
    bilinear upsampling), which keeps values in [0, 1].
    """
    masks = _f32(masks)
    batch, in_height, in_width = masks.shape
    if in_height % height == 0 and in_width % width == 0:
        blocks = masks.reshape(batch, height, in_height // height, width, in_width // width)
        return blocks.mean(axis=(2, 4))
    return jax.image.resize(masks, (batch, height, width), "linear", antialias=True)


@functools.partial(jax.jit, static_argnames="side")
def resize_mask(mask: jax.Array, side: int) -> jax.Array:
    """mask [B, H, W] in [0, 1] -> [B, side * side], area-averaged to side x side.

    Flattened row-major (h then w) to match the HW axis of attention maps. Block
    averages when H and W are multiples of side, else antialiased linear resize.
    """
    return _resize_masks(mask, side, side).reshape(mask.shape[0], side * side)


def _head_mean(probs: jax.Array) -> jax.Array:
    """Attention probabilities [B, heads, HW, L] -> [B, HW, L]."""
    return jnp.mean(_f32(probs), axis=1)


def _map_side(name: str, probs: jax.Array) -> int:
    positions = probs.shape[-2]
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"attention map {name!r} has {positions} positions, not a square grid")
    return side


def _share_inside(name: str, attention: jax.Array, masks: jax.Array) -> jax.Array:
    """Share of each token's attention inside the mask: attention [B, ..., HW, L] (HW a square
    grid), masks [B, H, W] in [0, 1] resized to that grid -> [B, ..., L]."""
    region = resize_mask(masks, _map_side(name, attention))
    inside = jnp.einsum("bp,b...pl->b...l", region, attention)
    return inside / (jnp.sum(attention, axis=-2) + RATIO_EPS)


def _require_layers(attention_maps: Mapping[str, jax.Array]) -> None:
    if not attention_maps:
        raise ValueError("no attention maps given")


@jax.jit
def location_loss(
    attention_maps: Mapping[str, jax.Array], token_mask: jax.Array, masks: jax.Array
) -> jax.Array:
    """Compositional Inversion's location loss: 1 - share of each token's attention inside the mask.

    attention_maps {layer: probs [B, heads, HW, L]} (HW a square side * side);
    token_mask [B, L] bool picks the (example, token) pairs; masks [B, H, W] in [0, 1].
    Per layer, heads are averaged and the mask resized to the map's grid; the loss
    1 - sum(M * A_l) / (sum(A_l) + 1e-8) is averaged over selected pairs, then over
    layers. 0 when all attention lies inside the mask, 1 when all outside; 0.0 if
    token_mask selects nothing.
    """
    _require_layers(attention_maps)
    token_mask = jnp.asarray(token_mask, bool)
    layer_losses = []
    for name, probs in attention_maps.items():
        layer_losses.append(_masked_mean(1.0 - _share_inside(name, _head_mean(probs), masks), token_mask))
    return jnp.mean(jnp.stack(layer_losses))


@jax.jit
def layout_guidance_loss(
    attention_maps: Mapping[str, jax.Array], token_mask: jax.Array, masks: jax.Array
) -> jax.Array:
    """Layout guidance's loss as the released code computes it: per head, (1 - inside / total)^2.

    attention_maps {layer: probs [B, heads, HW, L]}; token_mask [B, L] bool; masks [B, H, W]
    in [0, 1] (resized to each map's grid). For each selected (example, token) pair and head,
    r = sum(M * A_h) / (sum(A_h) + 1e-8); the loss is the mean of (1 - r)^2 over heads and
    pairs, then over layers. Unlike :func:`location_loss` (heads averaged first, unsquared),
    a token half inside its box gives 0.25, and 0.2 is reached at r ~ 0.55.
    """
    _require_layers(attention_maps)
    token_mask = jnp.asarray(token_mask, bool)
    layer_losses = []
    for name, probs in attention_maps.items():
        ratio = _share_inside(name, _f32(probs), masks)  # per head
        layer_losses.append(_masked_mean(jnp.mean((1.0 - ratio) ** 2, axis=1), token_mask))
    return jnp.mean(jnp.stack(layer_losses))


@functools.partial(jax.jit, static_argnames="reduction")
def attention_match_loss(
    attention_maps: Mapping[str, jax.Array],
    reference_maps: Mapping[str, jax.Array],
    token_mask: jax.Array,
    reduction: str = "mean",
) -> jax.Array:
    """SeFi-IDE's attention matching: head-averaged maps pulled towards constant reference maps.

    Both dicts map the same layers to probs [B, heads, HW, L]. Per layer, the squared
    difference of head means at the positions token_mask [B, L] selects: ``"mean"`` averages
    it over HW and those positions (0.0 if none); ``"sum"`` sums it over HW and the positions
    of each example and averages over examples (each token's map compared whole, the scale of
    a squared norm of maps). Then averaged over layers. Identical maps give 0.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}: use 'mean' or 'sum'")
    _require_layers(attention_maps)
    missing = sorted(set(attention_maps) - set(reference_maps))
    if missing:
        raise ValueError(f"reference maps lack layer(s) {missing}")
    token_mask = jnp.asarray(token_mask, bool)
    layer_losses = []
    for name, probs in attention_maps.items():
        reference = jax.lax.stop_gradient(_f32(reference_maps[name]))
        squared = _head_mean(_f32(probs) - reference) ** 2  # [B, HW, L]
        if reduction == "sum":
            layer_losses.append(jnp.sum(squared * token_mask[:, None, :]) / token_mask.shape[0])
        else:
            layer_losses.append(_masked_mean(jnp.mean(squared, axis=1), token_mask))
    return jnp.mean(jnp.stack(layer_losses))


@jax.jit
def masked_diffusion_mse(
    prediction: jax.Array, target: jax.Array, masks: jax.Array, snr_weights: jax.Array
) -> jax.Array:
    """Break-A-Scene masked denoising loss: per-example MSE inside the mask, weighted, batch-averaged.

    prediction, target [B, h, w, c]; masks [B, H, W] in [0, 1], area-resized to h x w;
    snr_weights [B]. err = mean_c (prediction - target)^2; per example
    sum(m * err) / max(sum(m), 1e-8); returns mean(per_example * snr_weights).
    """
    _, height, width, _ = prediction.shape
    region = _resize_masks(masks, height, width)
    error = jnp.mean((_f32(prediction) - _f32(target)) ** 2, axis=-1)
    inside = jnp.sum(region * error, axis=(1, 2))
    per_example = inside / jnp.maximum(jnp.sum(region, axis=(1, 2)), RATIO_EPS)
    return jnp.mean(per_example * _f32(snr_weights))
