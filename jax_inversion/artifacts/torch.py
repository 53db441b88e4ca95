"""Use ``extended`` embedding files in PyTorch diffusers (torch and diffusers imported here only).

    from jax_inversion.artifacts.torch import ExtendedTokens
    tokens = ExtendedTokens.load("concept.safetensors")
    tokens.add_to(pipe.tokenizer, pipe.text_encoder)      # base rows: plain prompts work
    cond = tokens.encode(pipe.tokenizer, pipe.text_encoder, ["a photo of <subj>"])
    tokens.install(pipe.unet, cond)                       # per-stage K/V or per-layer states
    image = pipe(prompt_embeds=cond.base, ...).images[0]

``install`` sets an attention processor on every cross-attention layer that takes keys and
values from the token's states (stage chosen from the UNet's current timestep), and
``uninstall`` restores the previous processors.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from jax_inversion.artifacts.extended import read_extended, stage_of


@dataclasses.dataclass
class EncodedStates:
    """Encoder states for one batch of prompts: base, per-stage K/V ``[S, B, L, D]``, per-layer."""

    base: torch.Tensor
    keys: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    layers: Optional[dict] = None


class _Timestep:
    value: Optional[torch.Tensor] = None


class ExtendedAttnProcessor:
    """Cross-attention with keys/values from the extended token's states."""

    def __init__(self, name: str, tokens: "ExtendedTokens", states: EncodedStates, clock: _Timestep):
        self.name, self.tokens, self.states, self.clock = name, tokens, states, clock

    def _kv_states(self, batch: int):
        s = self.states
        if s.keys is not None:
            t = self.clock.value.reshape(-1).expand(batch) if self.clock.value.numel() == 1 else self.clock.value
            stage = torch.as_tensor(stage_of(t.cpu().numpy(), self.tokens.stages, self.tokens.num_train_timesteps))
            index = torch.arange(batch)
            return s.keys[stage, index], s.values[stage, index]
        layer = (s.layers or {}).get(self.name)
        states = layer if layer is not None else s.base
        return states, states

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        key_states, value_states = self._kv_states(batch)
        key_states = key_states.to(hidden_states.dtype)
        value_states = value_states.to(hidden_states.dtype)
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(key_states), attn.to_v(value_states)
        head_dim = query.shape[-1] // attn.heads
        split = lambda x: x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.upcast_attention:
            out = F.scaled_dot_product_attention(split(query).float(), split(key).float(), split(value).float())
            out = out.to(query.dtype)
        else:
            out = F.scaled_dot_product_attention(split(query), split(key), split(value))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


class ExtendedTokens:
    """One token of an extended file, ready for a diffusers pipeline."""

    def __init__(self, token: str, parts: dict):
        self.token = token
        self.base = torch.from_numpy(np.asarray(parts["base"]))
        self.stages = int(parts["stages"])
        self.num_train_timesteps = int(parts["num_train_timesteps"])
        self.key = torch.from_numpy(np.asarray(parts["key"])) if self.stages else None
        self.value = torch.from_numpy(np.asarray(parts["value"])) if self.stages else None
        self.layers = {k: torch.from_numpy(np.asarray(v)) for k, v in parts["layers"].items()}
        self.token_ids: list[int] = []
        self._previous = None
        self._hook = None

    @classmethod
    def load(cls, path: str, token: Optional[str] = None) -> "ExtendedTokens":
        tokens = read_extended(path)
        if token is None:
            if len(tokens) != 1:
                raise ValueError(f"{path} holds tokens {sorted(tokens)}: pass token=")
            token = next(iter(tokens))
        return cls(token, tokens[token])

    @property
    def strings(self) -> list[str]:
        n = self.base.shape[0]
        return [self.token] + [f"{self.token}_{i}" for i in range(1, n)]

    def add_to(self, tokenizer, text_encoder) -> None:
        """Adds the token strings and their base rows to the tokenizer and text encoder."""
        if tokenizer.add_tokens(self.strings) != len(self.strings):
            raise ValueError(f"{self.strings} already exist in the tokenizer")
        self.token_ids = tokenizer.convert_tokens_to_ids(self.strings)
        text_encoder.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():
            table = text_encoder.get_input_embeddings().weight
            table[self.token_ids] = self.base.to(table.dtype)

    def prompt(self, text: str) -> str:
        """Expands the token to its multi-vector form inside ``text``."""
        return text.replace(self.token, " ".join(self.strings))

    @torch.no_grad()
    def _encode_with(self, text_encoder, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """States of ``ids`` with the token's table rows temporarily set to ``rows``."""
        table = text_encoder.get_input_embeddings().weight
        saved = table[self.token_ids].clone()
        try:
            table[self.token_ids] = rows.to(table.dtype)
            return text_encoder(ids.to(table.device)).last_hidden_state
        finally:
            table[self.token_ids] = saved

    @torch.no_grad()
    def encode(self, tokenizer, text_encoder, prompts: list[str]) -> EncodedStates:
        ids = tokenizer([self.prompt(p) for p in prompts], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.encode_ids(text_encoder, ids)

    @torch.no_grad()
    def encode_ids(self, text_encoder, ids: torch.Tensor) -> EncodedStates:
        states = EncodedStates(base=self._encode_with(text_encoder, ids, self.base))
        if self.stages:
            states.keys = torch.stack([self._encode_with(text_encoder, ids, r) for r in self.key])
            states.values = torch.stack([self._encode_with(text_encoder, ids, r) for r in self.value])
        if self.layers:
            states.layers = {name: self._encode_with(text_encoder, ids, r) for name, r in self.layers.items()}
        return states

    def install(self, unet, states: EncodedStates) -> None:
        """Routes every cross-attention layer of ``unet`` through the token's states."""
        clock = _Timestep()

        def remember_timestep(module, args, kwargs):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            clock.value = torch.as_tensor(t)

        self.uninstall(unet)
        self._previous = dict(unet.attn_processors)
        processors = {}
        for name, processor in self._previous.items():
            layer = name[: -len(".processor")]
            processors[name] = ExtendedAttnProcessor(layer, self, states, clock) if layer.endswith("attn2") else processor
        unet.set_attn_processor(processors)
        self._hook = unet.register_forward_pre_hook(remember_timestep, with_kwargs=True)

    def uninstall(self, unet) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._previous is not None:
            unet.set_attn_processor(self._previous)
            self._previous = None
