"""Placeholder tokens: added to the tokenizer, their learned rows substituted by id.

The frozen embedding table is never copied or updated: the only trainable array is
``learned [n_tokens, d]``, looked up for ids in ``[first_id, first_id + n_tokens)``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_inversion.core.errors import UserError


class TokenError(UserError, ValueError):
    """A placeholder or initializer token the tokenizer cannot take."""


@dataclasses.dataclass(frozen=True)
class PlaceholderIds:
    """Which strings were added and the ids they got (contiguous, ``first_id`` onwards)."""

    tokens: tuple[str, ...]
    first_id: int

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "first_id": self.first_id}


def vector_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """``<cat>`` with 3 vectors -> ``<cat> <cat>_1 <cat>_2`` (diffusers' multi-vector convention)."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def add_placeholder_tokens(tokenizer, tokens: Sequence[str]) -> PlaceholderIds:
    """Adds ``tokens``; refuses any that already exist in the vocabulary."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if not token or any(c.isspace() for c in token):
            raise TokenError(f"placeholder token {token!r} is empty or has whitespace: use e.g. '<my-cat>'")
        if token in vocab or token + "</w>" in vocab:
            raise TokenError(
                f"placeholder token {token!r} already exists in the tokenizer vocabulary: choose a new string such as '<{token.strip('<>')}-concept>'"
            )
    first_id = len(tokenizer)
    added = tokenizer.add_tokens(list(tokens))
    if added != len(tokens):
        raise TokenError(f"the tokenizer took {added} of {len(tokens)} placeholder tokens {list(tokens)}: use distinct new strings")
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if list(ids) != list(range(first_id, first_id + len(tokens))):
        raise TokenError(f"placeholder tokens got non-contiguous ids {ids}")
    return PlaceholderIds(tuple(tokens), first_id)


def initializer_id(tokenizer, word: str) -> int:
    """The id of a one-token initializer word; a word of several tokens is an error."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise TokenError(
            f"initializer token {word!r} is {len(ids)} tokens {pieces}, not one: pick a single-token word (or leave it empty for random init)"
        )
    return ids[0]


def initializer_groups(tokenizer, phrase: str, num_vectors: int) -> list[tuple[int, ...]]:
    """The token ids each of ``num_vectors`` vectors starts from, for an initializer word or phrase.

    The phrase's m tokens are spread over the n vectors in order: vector i starts from the mean
    of tokens ``[floor(i*m/n), floor((i+1)*m/n))`` (at least token ``floor(i*m/n)``). So m = n maps
    token i to vector i; m < n repeats each token over consecutive vectors (A1111's rule, e.g.
    "red car" over 4 vectors: red, red, car, car); m > n averages neighbouring tokens ("a red toy
    car" over 2 vectors: mean(a, red), mean(toy, car); A1111 would drop tokens). A one-token word
    gives every vector its row, as before.
    """
    ids = tokenizer.encode(phrase, add_special_tokens=False)
    if not ids:
        raise TokenError(f"initializer {phrase!r} has no tokens: pass a word or phrase, or leave it empty for random init")
    m, n = len(ids), num_vectors
    groups = []
    for i in range(n):
        start = i * m // n
        stop = max((i + 1) * m // n, start + 1)
        groups.append(tuple(ids[start:stop]))
    return groups


def initial_embeddings(
    table: np.ndarray, init_ids: Sequence[Optional[int] | Sequence[int]], rng: np.random.Generator
) -> np.ndarray:
    """Rows to start from: the initializer's row (the mean of its rows for a tuple of ids), or
    random with the table's mean norm (None)."""
    table = np.asarray(table, np.float32)
    mean_norm = float(np.linalg.norm(table, axis=-1).mean())
    rows = []
    for token_id in init_ids:
        if token_id is None:
            v = rng.standard_normal(table.shape[-1]).astype(np.float32)
            rows.append(v / np.linalg.norm(v) * mean_norm)
        elif isinstance(token_id, (tuple, list)):
            rows.append(table[np.asarray(token_id)].mean(axis=0))
        else:
            rows.append(table[token_id])
    return np.stack(rows).astype(np.float32)


def word_embedding(tokenizer, table, word: str) -> np.ndarray:
    """Input embedding of ``word``: the mean of its token rows of ``table`` ``[V, d]`` -> ``[d]`` float32.

    A word of several tokens is averaged, so every word gives one vector in the space of a
    single learned token.
    """
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise TokenError(f"word {word!r} has no tokens under this tokenizer: use a non-empty word")
    if max(ids) >= len(table):
        raise TokenError(f"word {word!r} has token id {max(ids)} beyond the {len(table)}-row embedding table: it is a placeholder, not a word")
    return np.asarray(table, np.float32)[np.asarray(ids)].mean(axis=0)


def substitute(token_embeds: jax.Array, ids: jax.Array, learned: jax.Array, first_id: int) -> jax.Array:
    """Replaces the embeddings at placeholder ids with their learned rows.

    ``learned`` is ``[n, d]`` (shared by the batch) or ``[B, n, d]`` (per example, e.g. the
    rows of each example's timestep stage).
    """
    n = learned.shape[-2]
    offset = ids - first_id
    is_learned = (offset >= 0) & (offset < n)
    index = jnp.clip(offset, 0, n - 1)
    if learned.ndim == 3:
        rows = jnp.take_along_axis(learned, index[..., None], axis=1)
    else:
        rows = jnp.take(learned, index, axis=0)
    return jnp.where(is_learned[..., None], rows.astype(token_embeds.dtype), token_embeds)


def stage_rows(learned: jax.Array, stages: jax.Array | None, part: int) -> jax.Array:
    """Rows an example uses: ``[n, d]`` or per-example ``[B, n, d]`` as is, or ``[S, K, n, d]`` at each
    example's stage and part (0 key, K-1 value)."""
    if learned.ndim < 4:
        return learned
    return learned[stages, min(part, learned.shape[1] - 1)]


def safe_ids(ids: jax.Array, first_id: int) -> jax.Array:
    """Ids valid for the frozen table (placeholders mapped to 0; they are substituted anyway)."""
    return jnp.where(ids >= first_id, 0, ids)
