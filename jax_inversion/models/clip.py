"""CLIP text encoder (transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``) in Flax linen.

Module and parameter names mirror the PyTorch state dict (``text_model.encoder.layers.0.self_attn
.q_proj.weight`` -> ``text_model/encoder/layers_0/self_attn/q_proj/kernel``), so checkpoints are
mapped with :func:`jax_inversion.models.convert.convert_state_dict`. The token-embedding lookup is a
separate method so textual inversion can splice learned rows into ``inputs_embeds``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jax_inversion.models.layers import DenseParams, fused_dense, layer_norm, multi_head_attention

Dtype = Any

_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``CLIPTextConfig`` that shape the text encoder."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 49407
    has_projection: bool = False

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; expected one of {_ACTIVATIONS}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a diffusers ``text_encoder/config.json`` dict; unknown keys are ignored.

        ``has_projection`` is taken from ``architectures`` (``CLIPTextModelWithProjection``) unless
        given explicitly.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        if "has_projection" not in kwargs:
            kwargs["has_projection"] = "CLIPTextModelWithProjection" in (d.get("architectures") or ())
        return cls(**kwargs)


@flax.struct.dataclass
class CLIPTextOutput:
    """Encoder outputs; ``hidden_states`` = (embeddings, layer 1, ..., layer N), before the final norm.

    ``pooled_output`` (final-normed state at EOS) is None when neither ``input_ids`` nor
    ``eos_positions`` were given; ``text_embeds`` is None without a projection.
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooled_output: Optional[jax.Array] = None
    text_embeds: Optional[jax.Array] = None


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return lambda x: jax.nn.gelu(x, approximate=False)


def _layer_norm(config: CLIPTextConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
    return layer_norm(config.layer_norm_eps, dtype, name)


class CLIPTextEmbeddings(nn.Module):
    """Token and learned absolute position embeddings."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.token_embedding = nn.Embed(self.config.vocab_size, self.config.hidden_size, dtype=self.dtype)
        self.position_embedding = nn.Embed(
            self.config.max_position_embeddings, self.config.hidden_size, dtype=self.dtype
        )

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return self.token_embedding(input_ids)

    def __call__(self, inputs_embeds: jax.Array) -> jax.Array:
        seq_len = inputs_embeds.shape[1]
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )
        positions = self.position_embedding(jnp.arange(seq_len))
        return inputs_embeds.astype(self.dtype) + positions[None]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention (no padding mask, as Stable Diffusion uses it); q, k and v are
    one matmul against the ``q_proj``/``k_proj``/``v_proj`` kernels side by side (params unchanged)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.config.hidden_size
        q, k, v = fused_dense(x, [DenseParams(hidden, name=name) for name in ("q_proj", "k_proj", "v_proj")], self.dtype)
        out = multi_head_attention(q, k, v, self.config.num_attention_heads, causal=True)
        return nn.Dense(hidden, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = _activation(self.config.hidden_act)(x)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _layer_norm(self.config, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(h)
        h = _layer_norm(self.config, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.layers = [
            CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")
            for i in range(self.config.num_hidden_layers)
        ]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Returns the input followed by every layer's output."""
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return tuple(states)


class CLIPTextModel(nn.Module):
    """The ``text_model`` submodule: embeddings, encoder and final LayerNorm."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.config, self.dtype)
        self.encoder = CLIPEncoder(self.config, self.dtype)
        self.final_layer_norm = _layer_norm(self.config, self.dtype, "final_layer_norm")

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return self.embeddings.embed_tokens(input_ids)

    def __call__(self, inputs_embeds: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        hidden_states = self.encoder(self.embeddings(inputs_embeds))
        return self.final_layer_norm(hidden_states[-1]), hidden_states


def eos_positions_from_ids(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """EOS index per row, as transformers pools: argmax of ids for legacy ``eos_token_id == 2``,
    else the first position holding ``eos_token_id``."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nn.Module):
    """Full text encoder; params ``{text_model, [text_projection]}`` as in the PyTorch checkpoint.

    ``dtype`` is the compute dtype; params are float32.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.text_model = CLIPTextModel(self.config, self.dtype)
        if self.config.has_projection:
            self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """``[B, L]`` ids -> ``[B, L, hidden]`` token embeddings (no positions)."""
        return self.text_model.embed_tokens(input_ids)

    def __call__(
        self,
        input_ids: Optional[jax.Array] = None,
        *,
        inputs_embeds: Optional[jax.Array] = None,
        eos_positions: Optional[jax.Array] = None,
    ) -> CLIPTextOutput:
        """Encodes ``input_ids`` or token ``inputs_embeds`` (exactly one).

        ``eos_positions`` ``[B]`` selects the pooled token; it defaults to the transformers rule
        applied to ``input_ids``. Without either, ``pooled_output``/``text_embeds`` are None.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        elif self.is_initializing():
            self.embed_tokens(jnp.zeros((1, 1), jnp.int32))
        last_hidden_state, hidden_states = self.text_model(inputs_embeds)

        if eos_positions is None and input_ids is not None:
            eos_positions = eos_positions_from_ids(input_ids, self.config.eos_token_id)
        pooled = text_embeds = None
        if eos_positions is not None:
            pooled = last_hidden_state[jnp.arange(last_hidden_state.shape[0]), eos_positions]
            if self.config.has_projection:
                text_embeds = self.text_projection(pooled)
        elif self.config.has_projection and self.is_initializing():
            self.text_projection(last_hidden_state[:, 0])
        return CLIPTextOutput(last_hidden_state, hidden_states, pooled, text_embeds)


def init_abstract_params(module: CLIPTextTransformer) -> dict:
    """Shapes/dtypes of the module's ``params`` tree (no allocation), for checkpoint conversion."""
    ids = jnp.zeros((1, module.config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(lambda rng: module.init(rng, ids)["params"], jax.random.PRNGKey(0))


def add_text_model_prefix(state_dict: Mapping[str, Any]) -> dict:
    """Prefixes ``text_model.`` where missing: transformers >= 5 saves ``CLIPTextModel`` without it,
    while older (and most hub) checkpoints keep it. ``text_projection.*`` is left as is."""
    return {
        k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
        for k, v in state_dict.items()
    }
