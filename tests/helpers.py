"""Shared test helpers."""
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from jax_inversion.artifacts.extended import stage_of
from jax_inversion.configs.ti import get_config
from jax_inversion.models.unet import Conditioning
from jax_inversion.text.conditioning import prompt_embeddings


def encode_with_rows(text_encoder, params, ids: jax.Array, learned: jax.Array, first_id: int, eos_token_id=None):
    """Text encoder outputs with the learned rows (``[n, d]`` or per example ``[B, n, d]``) at the placeholder ids
    (the tests' direct way in; the library encodes through ``conditioning.encode_text``). The pooled output is
    taken at the first ``eos_token_id`` (placeholder ids are larger than EOS, so transformers' legacy argmax
    rule would pick them)."""
    _, embeds = prompt_embeddings(text_encoder, params, ids, learned, first_id)
    eos = None if eos_token_id is None else jnp.argmax(ids == eos_token_id, axis=-1)
    return text_encoder.apply({"params": params}, inputs_embeds=embeds, eos_positions=eos)


def make_config(model, concept_dir, **train):
    """A small TI config on ``model``: ``<ball>`` with 2 vectors, global batch 8; ``train`` overrides."""
    config = get_config()
    config.model = model
    config.data.concept_dir = concept_dir
    config.data.placeholder_token = "<ball>"
    config.data.initializer_token = "ball"
    config.data.num_vectors = 2
    config.train.batch_size = 8
    config.train.num_steps = 6
    config.train.log_every = 3
    config.train.checkpoint_every = 3
    config.train.learning_rate = 5e-3
    config.train.scale_lr = False  # the rates the tests give are the rates applied
    for key, value in train.items():
        config.train[key] = value
    return config


def flax_conditioning(
    text_encoder,
    text_params,
    ids: jax.Array,
    first_id: int,
    parts: Mapping,
    timesteps: Optional[jax.Array] = None,
):
    """Our UNet's :class:`Conditioning` for prompts holding one extended token at ``first_id``..."""
    encode = lambda rows: encode_with_rows(text_encoder, text_params, ids, jnp.asarray(rows), first_id).last_hidden_state
    base = encode(parts["base"])
    if parts.get("stages"):
        stage = stage_of(timesteps, parts["stages"], parts["num_train_timesteps"])
        keys = jnp.stack([encode(r) for r in parts["key"]])  # [S, B, L, D]
        values = jnp.stack([encode(r) for r in parts["value"]])
        batch = jnp.arange(ids.shape[0])
        return Conditioning(keys[stage, batch], value_states=values[stage, batch])
    layers = {name: (encode(rows),) * 2 for name, rows in (parts.get("layers") or {}).items()}
    return Conditioning(base, layer_states=layers or None)
