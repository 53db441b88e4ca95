"""Loss terms and the objective: a weighted sum of terms chosen by name in the config.

A term is a pure function of the arrays a train step produces (``outputs``) and of
constants prepared once from the frozen model (word embeddings, chosen attention layers).
It also declares what the step must produce for it (``needs``): masks, attention maps,
reference maps of the class-word prompt. Methods are configs that weight these terms
(``config.loss.<term>``) with options (``config.loss_options.<term>``); the train loop only
asks the objective what to compute and calls it.

``outputs`` keys: ``prediction``, ``target``, ``snr_weights``, ``timesteps``, ``learned``
(``{encoder: rows}``), ``token_embeds``/``prompt_embeds`` (``{encoder: [B, L, d]}``, before
and after substitution), ``placeholder_positions``/``trainable_positions``/``prompt_positions``
(``[B, L]`` bool), and when needed ``masks`` ``[B, h, w]``, ``attention_maps`` and
``reference_maps`` (``{layer: [B, heads, HW, L]}``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_inversion.core.errors import UserError
from jax_inversion.objectives import losses

# The 80 COCO class names: Compositional Inversion's default anchor vocabulary.
COCO_CLASSES = tuple(
    w.replace("_", " ")
    for w in (
        "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
        "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag "
        "tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
        "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
        "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
        "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
    ).split()
)


class ObjectiveError(UserError, ValueError):
    """A loss configuration that cannot be built; the message names the key to set."""


@dataclasses.dataclass(frozen=True)
class TermSetup:
    """What terms may read while preparing their constants (all frozen, all host-side)."""

    options: Any  # config.loss_options
    tokenizers: Mapping[str, Any]  # {encoder: tokenizer}
    tables: Mapping[str, np.ndarray]  # {encoder: frozen input-embedding table [V, d]}
    concept_rows: tuple[int, int]  # the concept's rows in the learned array
    initializer: str  # the concept's initializer word ("" if random)
    class_word: str  # the concept's class word for reference prompts
    attention_layers: Mapping[str, int]  # {cross-attention layer: side of its map}


@dataclasses.dataclass(frozen=True)
class Term:
    loss: Callable[[Mapping, Mapping], jax.Array]  # (outputs, prepared) -> scalar
    prepare: Optional[Callable[[TermSetup], dict]] = None
    needs: tuple = ()  # of "masks", "attention_maps", "reference_maps"


def _option(setup: TermSetup, term: str, key: str, default=None):
    group = getattr(setup.options, term, None) if setup.options is not None else None
    value = group.get(key, default) if group is not None else default
    return default if value is None else value


def _concept_rows(learned: jax.Array, rows: tuple[int, int]) -> jax.Array:
    """The concept's vectors ``[V * n, d]`` (all stage/part variants of each vector, variant-major)."""
    a, b = rows
    picked = learned[..., a:b, :]
    return picked.reshape(-1, picked.shape[-1])


def _variants(learned_shape: tuple) -> int:
    return int(np.prod(learned_shape[:-2])) if len(learned_shape) > 2 else 1


def _layers_at(setup: TermSetup, term: str, resolution: int, include_mid: bool) -> tuple[str, ...]:
    at_resolution = [name for name, side in setup.attention_layers.items() if side == resolution]
    layers = tuple(
        name for name in setup.attention_layers if name in at_resolution or (include_mid and name.startswith("mid_block"))
    )
    if not at_resolution:
        sides = sorted(set(setup.attention_layers.values()))
        raise ObjectiveError(
            f"loss {term}: the UNet has no cross-attention layer at {resolution}x{resolution} (it has {sides}): "
            f"set --config.loss_options.{term}.resolution to one of them"
        )
    return layers


# ----------------------------------------------------------------------------- terms


def _diffusion(outputs, prepared):
    error = (outputs["prediction"].astype(jnp.float32) - outputs["target"].astype(jnp.float32)) ** 2
    per_example = error.reshape(error.shape[0], -1).mean(axis=-1)
    return jnp.mean(per_example * outputs["snr_weights"])


def _masked_diffusion(outputs, prepared):
    return losses.masked_diffusion_mse(outputs["prediction"], outputs["target"], outputs["masks"], outputs["snr_weights"])


def _word_lists(setup: TermSetup, term: str, key: str) -> list[list[str]]:
    lists = [list(words) for words in (_option(setup, term, key, []) or [])]
    n = setup.concept_rows[1] - setup.concept_rows[0]
    if lists and len(lists) not in (1, n):
        raise ObjectiveError(
            f"loss_options.{term}.{key} has {len(lists)} word lists for {n} concept vectors: give 1 (shared) or {n}"
        )
    return lists * n if len(lists) == 1 else lists


def _prepare_context(setup: TermSetup) -> dict:
    positives, negatives = _word_lists(setup, "context", "positives"), _word_lists(setup, "context", "negatives")
    if not positives or not any(positives):
        raise ObjectiveError(
            "loss.context needs positive words: set --config.loss_options.context.positives='[[\"word\", ...]]' "
            "(one list per concept vector) and .negatives (antonyms)"
        )
    negatives = negatives or [[] for _ in positives]
    tables = {}
    for encoder, tokenizer in setup.tokenizers.items():
        pos, pos_mask = losses.word_table(tokenizer, setup.tables[encoder], positives)
        neg, neg_mask = losses.word_table(tokenizer, setup.tables[encoder], negatives)
        tables[encoder] = (pos, pos_mask, neg, neg_mask)
    return {"tables": tables, "temperature": float(_option(setup, "context", "temperature", 0.07)), "rows": setup.concept_rows}


def _context(outputs, prepared):
    values = []
    for encoder, (pos, pos_mask, neg, neg_mask) in prepared["tables"].items():
        learned = outputs["learned"][encoder]
        v = _concept_rows(learned, prepared["rows"])
        tile = lambda x: jnp.tile(jnp.asarray(x), (_variants(learned.shape),) + (1,) * (x.ndim - 1))
        values.append(losses.info_nce_context(v, tile(pos), tile(pos_mask), tile(neg), tile(neg_mask), prepared["temperature"]))
    return sum(values) / len(values)


def _prepare_anchor(setup: TermSetup) -> dict:
    words = list(_option(setup, "anchor", "words", []) or COCO_CLASSES)
    anchors = {
        encoder: np.stack([losses.word_embedding(tok, setup.tables[encoder], w) for w in words]).astype(np.float32)
        for encoder, tok in setup.tokenizers.items()
    }
    # Normalised per prompt input element (L x d), as the released code's MSE over the prompt's
    # input embeddings (anchor_prompt): lambda = 0.95 then weighs both variants alike.
    elements = {e: float(tok.model_max_length * setup.tables[e].shape[-1]) for e, tok in setup.tokenizers.items()}
    return {"anchors": anchors, "max_atoms": int(_option(setup, "anchor", "max_atoms", 5)), "rows": setup.concept_rows,
            "elements": elements}


def _anchor(outputs, prepared):
    values = []
    for e, a in prepared["anchors"].items():
        learned = outputs["learned"][e]
        rows = _concept_rows(learned, prepared["rows"])  # the concept's n vectors per stage/part: mean over those
        elements = prepared["elements"][e] * _variants(learned.shape)
        values.append(losses.anchor_sparse_loss(rows, jnp.asarray(a), prepared["max_atoms"], elements))
    return sum(values) / len(values)


def _prepare_anchor_prompt(setup: TermSetup) -> dict:
    word = _option(setup, "anchor_prompt", "word", "") or setup.initializer
    if not word:
        raise ObjectiveError("loss.anchor_prompt needs an anchor word: set --config.loss_options.anchor_prompt.word or data.initializer_token")
    rows = {e: losses.word_embedding(tok, setup.tables[e], word).astype(np.float32) for e, tok in setup.tokenizers.items()}
    return {"rows": rows}


def _anchor_prompt(outputs, prepared):
    """The prompt's input embeddings vs the same prompt with the anchor word in the placeholders' places."""
    positions = outputs["placeholder_positions"][..., None]
    values = []
    for encoder, row in prepared["rows"].items():
        anchored = jnp.where(positions, jnp.asarray(row), outputs["token_embeds"][encoder])
        values.append(losses.anchor_prompt_loss(outputs["prompt_embeds"][encoder], anchored))
    return sum(values) / len(values)


def _prepare_maps(term: str, default_mid: bool):
    def prepare(setup: TermSetup) -> dict:
        resolution = int(_option(setup, term, "resolution", 16))
        include_mid = bool(_option(setup, term, "include_mid", default_mid))
        return {"layers": _layers_at(setup, term, resolution, include_mid)}

    return prepare


def _location(outputs, prepared):
    maps = {name: outputs["attention_maps"][name] for name in prepared["layers"]}
    return losses.location_loss(maps, outputs["trainable_positions"], outputs["masks"])


def _prepare_attention(setup: TermSetup) -> dict:
    """The attention term's layers and reduction; its class word must be one token (it replaces the placeholder)."""
    if not setup.class_word:
        raise ObjectiveError("loss.attention compares with the class-word prompt: set --config.data.class_word (e.g. person)")
    for tokenizer in setup.tokenizers.values():
        pieces = tokenizer.tokenize(setup.class_word)
        if len(pieces) != 1:
            raise ObjectiveError(
                f"data.class_word {setup.class_word!r} is {len(pieces)} tokens {pieces}, not one: "
                "set --config.data.class_word to a single-token word (e.g. person, dog)"
            )
    reduction = str(_option(setup, "attention", "reduction", "mean"))
    if reduction not in ("mean", "sum"):
        raise ObjectiveError(f"loss_options.attention.reduction={reduction!r}: use 'sum' or 'mean'")
    return {**_prepare_maps("attention", False)(setup), "reduction": reduction}


def _attention(outputs, prepared):
    maps = {name: outputs["attention_maps"][name] for name in prepared["layers"]}
    reference = {name: outputs["reference_maps"][name] for name in prepared["layers"]}
    return losses.attention_match_loss(maps, reference, outputs["prompt_positions"], prepared["reduction"])


TERMS: dict[str, Term] = {
    "diffusion": Term(_diffusion),
    "masked_diffusion": Term(_masked_diffusion, needs=("masks",)),
    "context": Term(_context, _prepare_context),
    "anchor": Term(_anchor, _prepare_anchor),
    "anchor_prompt": Term(_anchor_prompt, _prepare_anchor_prompt),
    "location": Term(_location, _prepare_maps("location", True), needs=("masks", "attention_maps")),
    "attention": Term(_attention, _prepare_attention, needs=("attention_maps", "reference_maps")),
}


class Objective:
    """``outputs -> (total, {term: value})`` plus what the step must compute for it.

    Built from ``{term: weight}`` (zero weights dropped; an unknown term or all zeros is an
    :class:`ObjectiveError`) and, for terms with constants to prepare, the :class:`TermSetup`.
    """

    def __init__(self, weights: Mapping[str, float], setup: Optional[TermSetup] = None):
        unknown = sorted(set(weights) - set(TERMS))
        if unknown:
            raise ObjectiveError(f"unknown loss term(s) {unknown}: known terms are {sorted(TERMS)}")
        self.weights = {name: float(w) for name, w in weights.items() if float(w) != 0.0}
        if not self.weights:
            raise ObjectiveError("every loss weight is zero: set e.g. --config.loss.diffusion=1.0")
        self.prepared = {}
        for name in self.weights:
            prepare = TERMS[name].prepare
            if prepare is not None:
                if setup is None:
                    raise ObjectiveError(f"loss term {name!r} needs the model to prepare its constants")
                self.prepared[name] = prepare(setup)
        self.needs = frozenset(n for name in self.weights for n in TERMS[name].needs)
        self.capture_layers = tuple(sorted({l for p in self.prepared.values() for l in p.get("layers", ())}))

    def __call__(self, outputs: Mapping) -> tuple[jax.Array, dict]:
        values = {name: TERMS[name].loss(outputs, self.prepared.get(name, {})) for name in self.weights}
        total = sum(self.weights[name] * value for name, value in values.items())
        return total, values


def term_cotangents(objective: "Objective", outputs: Mapping) -> dict:
    """``{term: d(weight * term) / d outputs}``: what each term sends back into the forward pass."""
    cotangents = {}
    for name, weight in objective.weights.items():
        term = lambda o, name=name, weight=weight: weight * TERMS[name].loss(o, objective.prepared.get(name, {}))
        _, term_pullback = jax.vjp(term, outputs)
        (cotangents[name],) = term_pullback(jnp.ones((), jnp.float32))
    return cotangents


def term_gradients(objective: "Objective", outputs: Mapping, pullback: Callable) -> dict:
    """``{term: gradient of weight * term w.r.t. the learned rows}``, each in the shape of the rows.

    ``outputs, pullback = jax.vjp(forward, learned)``: the forward ran once; each term costs one
    pullback through it (a backward pass: for terms that read the UNet's outputs, about two
    forwards). The gradients sum to the objective's. The train step logs their norms.

    The pullbacks run one after another in a ``lax.map`` over the terms' stacked cotangents: the
    backward pass is compiled once, not once per term (a three-term step compiles about half as
    long), and runs one term at a time (the memory of one backward pass, as before).
    """
    cotangents = term_cotangents(objective, outputs)
    names = list(cotangents)
    stacked = jax.tree_util.tree_map(lambda *parts: jnp.stack(parts), *(cotangents[name] for name in names))
    grads = jax.lax.map(lambda cotangent: pullback(cotangent)[0], stacked)
    return {name: jax.tree_util.tree_map(lambda g, i=i: g[i], grads) for i, name in enumerate(names)}

