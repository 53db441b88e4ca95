"""Writes a diffusers-format model as one original-layout (LDM / SGM) checkpoint, as A1111 users have them.

A port to numpy of diffusers' published converters ``scripts/convert_diffusers_to_original_stable_diffusion.py``
(SD 1.x / 2.x) and ``scripts/convert_diffusers_to_original_sdxl.py`` (SDXL): the same rename tables, applied
in the same order. Three generalisations and one fix, each marked below:

- the scripts hardcode the released models' block counts (4 or 3 levels, 2 resnets per down block, which
  levels have attention); here they come from the model's ``unet/config.json`` and ``vae/config.json``,
  so tiny test models get the layout the LDM code would build for them;
- transformers >= 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix the scripts expect (and
  real SD 1.x files have): it is put back first;
- the SD 2 script tells OpenCLIP text encoders by their depth (23 layers); here the caller says which;
- fix: the SDXL script leaves ``text_projection.weight`` as is, which no loader reads; real SDXL files hold
  ``conditioner.embedders.1.model.text_projection``, the transposed matrix (``x @ P``), as written here.

Test helper only: the package never writes this layout.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
from safetensors.numpy import load_file


# =================#
# UNet Conversion #
# =================#

unet_conversion_map = [
    # (stable-diffusion, HF Diffusers)
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
    # the following are for sdxl
    ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
    ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
    ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
]

unet_conversion_map_resnet = [
    # (stable-diffusion, HF Diffusers)
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def unet_conversion_map_layer(config: dict) -> list[tuple[str, str]]:
    """The scripts' prefix table; generalised: levels, resnets per block and attention from ``config``
    (the scripts: ``for i in range(4)``, ``for j in range(2)``, ``3*i + j + 1``, ``if i < 3``...)."""
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    down_attention = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    table = []
    for i in range(n):
        # loop over downblocks/upblocks
        for j in range(layers):
            # loop over resnets/attentions for downblocks
            table.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attention[i]:
                table.append((f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(layers + 1):
            # loop over resnets/attentions for upblocks
            table.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attention[i]:
                table.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            # no downsample/upsample in the last level; the upsampler follows the attention where there is one
            table.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            table.append((f"output_blocks.{(layers + 1) * i + layers}.{2 if up_attention[i] else 1}.",
                          f"up_blocks.{i}.upsamplers.0."))
    table.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        table.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return table


def convert_unet_state_dict(unet_state_dict: dict, config: dict) -> dict:
    # buyer beware: this is a *brittle* function,
    # and correct output requires that all of these pieces interact in
    # the exact order in which I have arranged them.
    mapping = {k: k for k in unet_state_dict.keys()}
    for sd_name, hf_name in unet_conversion_map:
        if hf_name in mapping:
            mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in unet_conversion_map_resnet:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    for k, v in mapping.items():
        for sd_part, hf_part in unet_conversion_map_layer(config):
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    return {sd_name: unet_state_dict[hf_name] for hf_name, sd_name in mapping.items()}


# ================#
# VAE Conversion #
# ================#


def vae_conversion_map(config: dict) -> list[tuple[str, str]]:
    """Generalised: levels and resnets per block from ``config`` (the scripts: 4 levels, ``3-i``, 2 and 3 resnets)."""
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    table = [
        # (stable-diffusion, HF Diffusers)
        ("nin_shortcut", "conv_shortcut"),
        ("norm_out", "conv_norm_out"),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ]
    for i in range(n):
        for j in range(layers):
            table.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            table.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            table.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        # up blocks in hf are numbered in reverse from sd
        for j in range(layers + 1):
            table.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    # this part accounts for mid blocks in both the encoder and the decoder
    for i in range(2):
        table.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    return table


vae_conversion_map_attn = [
    # (stable-diffusion, HF Diffusers)
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def reshape_weight_for_sd(w):
    # convert HF linear weights to SD conv2d weights
    return w.reshape(*w.shape, 1, 1) if w.ndim != 1 else w


def convert_vae_state_dict(vae_state_dict: dict, config: dict) -> dict:
    mapping = {k: k for k in vae_state_dict.keys()}
    for k, v in mapping.items():
        for sd_part, hf_part in vae_conversion_map(config):
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    for k, v in mapping.items():
        if "attentions" in k:
            for sd_part, hf_part in vae_conversion_map_attn:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    new_state_dict = {v: vae_state_dict[k] for k, v in mapping.items()}
    for k, v in new_state_dict.items():
        for weight_name in ("q", "k", "v", "proj_out"):
            if f"mid.attn_1.{weight_name}.weight" in k:
                new_state_dict[k] = reshape_weight_for_sd(v)
    return new_state_dict


# =========================#
# Text Encoder Conversion #
# =========================#

# SD 2 (convert_diffusers_to_original_stable_diffusion.py: keys get "transformer." first)
textenc_conversion_lst_v20 = [
    ("resblocks.", "text_model.encoder.layers."),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."),
    (".c_proj.", ".fc2."),
    (".attn", ".self_attn"),
    ("ln_final.", "transformer.text_model.final_layer_norm."),
    ("token_embedding.weight", "transformer.text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "transformer.text_model.embeddings.position_embedding.weight"),
]
# SDXL's second encoder (convert_diffusers_to_original_sdxl.py)
textenc_conversion_lst_sdxl = [
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."),
    (".c_proj.", ".fc2."),
    (".attn", ".self_attn"),
    ("ln_final.", "text_model.final_layer_norm."),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
]
# Ordering is from https://github.com/pytorch/pytorch/blob/master/test/cpp/api/modules.cpp
code2idx = {"q": 0, "k": 1, "v": 2}


def convert_openclip_text_enc_state_dict(text_enc_dict: dict, conversion_lst) -> dict:
    protected = {re.escape(x[1]): x[0] for x in conversion_lst}
    textenc_pattern = re.compile("|".join(protected.keys()))
    relabel = lambda k: textenc_pattern.sub(lambda m: protected[re.escape(m.group(0))], k)  # noqa: E731
    new_state_dict, capture_qkv_weight, capture_qkv_bias = {}, {}, {}
    for k, v in text_enc_dict.items():
        if k.endswith((".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight")):
            k_pre, k_code = k[: -len(".q_proj.weight")], k[-len("q_proj.weight")]
            capture_qkv_weight.setdefault(k_pre, [None, None, None])[code2idx[k_code]] = v
            continue
        if k.endswith((".self_attn.q_proj.bias", ".self_attn.k_proj.bias", ".self_attn.v_proj.bias")):
            k_pre, k_code = k[: -len(".q_proj.bias")], k[-len("q_proj.bias")]
            capture_qkv_bias.setdefault(k_pre, [None, None, None])[code2idx[k_code]] = v
            continue
        new_state_dict[relabel(k)] = v
    for k_pre, tensors in capture_qkv_weight.items():
        new_state_dict[relabel(k_pre) + ".in_proj_weight"] = np.concatenate(tensors)
    for k_pre, tensors in capture_qkv_bias.items():
        new_state_dict[relabel(k_pre) + ".in_proj_bias"] = np.concatenate(tensors)
    return new_state_dict


def _with_text_model_prefix(state: dict) -> dict:
    """Generalisation: transformers >= 5 saves CLIPTextModel without ``text_model.``; the scripts expect it."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}


# ==========#
# The file #
# ==========#


def _read(directory: str, name: str) -> tuple[dict, dict]:
    with open(os.path.join(directory, name, "config.json")) as f:
        config = json.load(f)
    weights = [f for f in os.listdir(os.path.join(directory, name)) if f.endswith(".safetensors")]
    return load_file(os.path.join(directory, name, weights[0])), config


def original_state_dict(directory: str, kind: str) -> dict[str, np.ndarray]:
    """The whole model in the original layout: ``kind`` is ``sd1``, ``sd2`` or ``sdxl``."""
    unet, unet_config = _read(directory, "unet")
    vae, vae_config = _read(directory, "vae")
    text, _ = _read(directory, "text_encoder")
    state = {"model.diffusion_model." + k: v for k, v in convert_unet_state_dict(unet, unet_config).items()}
    state.update({"first_stage_model." + k: v for k, v in convert_vae_state_dict(vae, vae_config).items()})
    text = _with_text_model_prefix(text)
    if kind == "sd1":
        state.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
    elif kind == "sd2":
        text = convert_openclip_text_enc_state_dict({"transformer." + k: v for k, v in text.items()},
                                                    textenc_conversion_lst_v20)
        state.update({"cond_stage_model.model." + k: v for k, v in text.items()})
    else:
        state.update({"conditioner.embedders.0.transformer." + k: v for k, v in text.items()})
        text_2, _ = _read(directory, "text_encoder_2")
        text_2 = _with_text_model_prefix(text_2)
        projection = text_2.pop("text_projection.weight")
        text_2 = convert_openclip_text_enc_state_dict(text_2, textenc_conversion_lst_sdxl)
        text_2["text_projection"] = np.ascontiguousarray(projection.T)  # fix: the real SGM key and layout
        state.update({"conditioner.embedders.1.model." + k: v for k, v in text_2.items()})
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def write_checkpoint(directory: str, kind: str, path: str, half: bool = False, **extra) -> str:
    """``path`` ``.safetensors`` (safetensors.numpy) or ``.ckpt`` (``torch.save({"state_dict": ...})``, as the
    scripts without ``--use_safetensors``); ``extra`` top-level entries go into a ``.ckpt`` (``global_step``)."""
    state = original_state_dict(directory, kind)
    if half:
        state = {k: v.astype(np.float16) for k, v in state.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(state, path)
    else:
        import torch

        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}, **extra}, path)
    return path
