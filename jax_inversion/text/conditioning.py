"""Frozen-model text conditioning, shared by training and sampling.

The text encoder(s) of a model with learned rows substituted at the placeholder ids (the
vocabulary table is never copied), the UNet's encoder states (SDXL: both encoders and the
added embedding), and one UNet call that can also return cross-attention maps.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_inversion.core.errors import ConfigError
from jax_inversion.models.clip import CLIPTextTransformer
from jax_inversion.models.loading import Pretrained
from jax_inversion.models.unet import Conditioning, collect_attention_maps
from jax_inversion.text import tokens as tokens_lib


def encoders_of(model: Pretrained) -> dict:
    """``{encoder name: (module, tokenizer)}``: one for SD 1/2, two for SDXL."""
    encoders = {"text_encoder": (model.text_encoder, model.tokenizer)}
    if model.text_encoder_2 is not None:
        encoders["text_encoder_2"] = (model.text_encoder_2, model.tokenizer_2 or model.tokenizer)
    return encoders


def vae_factor(model: Pretrained) -> int:
    """Pixels per latent pixel along a side (8 for SD)."""
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


def frozen_params(model: Pretrained) -> dict:
    """The frozen arrays a step reads: UNet and text encoder(s)."""
    frozen = {"unet": model.unet_params, "text_encoder": model.text_encoder_params}
    if model.text_encoder_2 is not None:
        frozen["text_encoder_2"] = model.text_encoder_2_params
    return frozen


def input_embedding_table(model: Pretrained, encoder: str) -> np.ndarray:
    """The frozen token-embedding table ``[V, d]`` of ``encoder`` (float32, host); zeros of its shape for a
    shapes-only model (``load_pretrained(shapes_only=True)``: compiling needs the shape, not the values)."""
    params = model.text_encoder_params if encoder == "text_encoder" else model.text_encoder_2_params
    table = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    if isinstance(table, jax.ShapeDtypeStruct):
        return np.zeros(table.shape, np.float32)
    return np.asarray(table, np.float32)


def prompt_embeddings(text_encoder: CLIPTextTransformer, params, ids: jax.Array, learned: jax.Array, first_id: int):
    """Input embeddings of tokenized prompts: frozen lookups, and the same with learned rows substituted."""
    token_embeds = text_encoder.apply({"params": params}, tokens_lib.safe_ids(ids, first_id), method="embed_tokens")
    return token_embeds, tokens_lib.substitute(token_embeds, ids, learned, first_id)


def with_clip_skip(model: Pretrained, clip_skip: int) -> Pretrained:
    """``model`` conditioned by its text encoder's ``clip_skip``-th layer from the end (A1111's "Clip skip", kohya's
    ``--clip_skip``): 1 = the last layer (the default), 2 = the penultimate (what anime models are trained with),
    each passed through the final LayerNorm as diffusers' ``clip_skip`` (= ours - 1) does. SD 1/2 only: SDXL
    always reads the penultimate layers."""
    layers = model.text_encoder.config.num_hidden_layers
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= layers:
        raise ConfigError(f"clip_skip {clip_skip!r} is out of range: use 1 (the last layer) to {layers} for this text encoder")
    if clip_skip != 1 and model.text_encoder_2 is not None:
        raise ConfigError(f"clip_skip {clip_skip} applies to SD 1/2: SDXL already reads the penultimate layers; use clip_skip=1")
    return dataclasses.replace(model, clip_skip=clip_skip)


def _final_layer_norm(module: CLIPTextTransformer, x: jax.Array) -> jax.Array:
    return module.text_model.final_layer_norm(x)


def encode_text(model: Pretrained, frozen: dict, input_ids: dict, learned: dict, placeholder_ids: dict, resolution: int):
    """UNet encoder states, SDXL's added embedding, and each encoder's input embeddings (frozen, and with the rows).

    SD 1/2 read the layer ``model.clip_skip`` from the end (see :func:`with_clip_skip`)."""
    encoders = encoders_of(model)
    outputs, token_embeds, prompt_embeds = {}, {}, {}
    for name, (module, tok) in encoders.items():
        first_id = placeholder_ids[name].first_id
        token_embeds[name], prompt_embeds[name] = prompt_embeddings(module, frozen[name], input_ids[name], learned[name], first_id)
        eos = jnp.argmax(input_ids[name] == tok.eos_token_id, axis=-1)
        outputs[name] = module.apply({"params": frozen[name]}, inputs_embeds=prompt_embeds[name], eos_positions=eos)
    if len(encoders) == 1:
        out = outputs["text_encoder"]
        if model.clip_skip == 1:
            return out.last_hidden_state, None, token_embeds, prompt_embeds
        states = model.text_encoder.apply(
            {"params": frozen["text_encoder"]}, out.hidden_states[-model.clip_skip], method=_final_layer_norm
        )
        return states, None, token_embeds, prompt_embeds
    states = jnp.concatenate([outputs[name].hidden_states[-2] for name in encoders], axis=-1)
    batch = states.shape[0]
    time_ids = jnp.tile(jnp.asarray([[resolution, resolution, 0, 0, resolution, resolution]], jnp.float32), (batch, 1))
    added = {"text_embeds": outputs["text_encoder_2"].text_embeds, "time_ids": time_ids}
    return states, added, token_embeds, prompt_embeds


def text_conditioning(model: Pretrained, frozen: dict, input_ids: dict, learned: dict, placeholder_ids: dict, resolution: int):
    """UNet encoder states (and SDXL's added text/time embedding) for tokenized prompts.

    SD 1/2: the last hidden state. SDXL: both encoders' penultimate states concatenated, the
    second encoder's projected pooled output and (size, crop, size) time ids, as diffusers does.
    """
    states, added, _, _ = encode_text(model, frozen, input_ids, learned, placeholder_ids, resolution)
    return states, added


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep nothing, recompute the UNet in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
    # keep each ResNet / transformer block's input, recompute one block at a time in the backward pass (the UNet's
    # remat_blocks): the peak holds one block's activations. "full" recomputes the whole UNet as one unit, so its
    # backward pass holds every block's activations again.
    "blocks": None,
}


def run_unet(model: Pretrained, params, noisy, timesteps, conditioning: Conditioning, added, remat: str = "none"):
    """The UNet's prediction and the attention maps of ``conditioning.capture_maps`` (``{}`` if none).

    ``remat`` trades compute for memory in the backward pass (see :data:`REMAT_POLICIES`).
    """
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"unknown train.remat {remat!r}: use one of {', '.join(REMAT_POLICIES)}")
    x = noisy.astype(model.unet.dtype)
    unet = model.unet.clone(remat_blocks=True) if remat == "blocks" else model.unet

    def apply(params, x, conditioning, added):
        if not conditioning.capture_maps:
            return unet.apply({"params": params}, x, timesteps, conditioning, added), {}
        prediction, variables = unet.apply({"params": params}, x, timesteps, conditioning, added, mutable=["attention_maps"])
        return prediction, collect_attention_maps(variables["attention_maps"])

    if REMAT_POLICIES[remat] is not None:
        apply = jax.checkpoint(apply, policy=REMAT_POLICIES[remat])
    return apply(params, x, conditioning, added)
