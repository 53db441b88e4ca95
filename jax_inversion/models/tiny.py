"""Writes small random diffusers-format models with our own modules (no torch needed).

Used by the demos (``check-parity`` with no ``--model``) and anywhere a model is needed
offline. Output loads in PyTorch diffusers/transformers as well as in ``load_pretrained``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import numpy as np
from safetensors.numpy import save_file

from jax_inversion.models import clip, unet as unet_lib, vae as vae_lib
from jax_inversion.models.convert import flax_params_to_state_dict
from jax_inversion.models.tokenizer_files import write_clip_tokenizer

TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}
TINY_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}


def tiny_text_config(vocab_size: int, bos: int, eos: int, **sizes) -> dict:
    """A small CLIP text encoder's ``config.json``; ``sizes`` override the widths, depth or positions."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 32,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        **sizes,
    }


def write_component(directory: str, config: dict, params, weights_name: str) -> None:
    """One diffusers component folder: ``config.json`` + safetensors in PyTorch layout."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flax_params_to_state_dict(params).items()}
    save_file(state, os.path.join(directory, weights_name), metadata={"format": "pt"})


SD_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "force_zeros_for_empty_prompt": True,
}


def write_model_index(directory: str, sdxl: bool = False) -> None:
    """``model_index.json`` of a StableDiffusion(XL)Pipeline without safety checker."""
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump(SDXL_MODEL_INDEX if sdxl else SD_MODEL_INDEX, f, indent=2)


def random_params(abstract: dict, rng: np.random.Generator) -> dict:
    """Random float32 params in the shapes of ``abstract`` (a module's ``params`` tree of shapes), drawn with numpy.

    Kernels and embeddings: normal with std 1/sqrt(fan-in) (0.02 for embedding tables); biases: normal with
    std 0.02; norm scales: 1 + normal with std 0.1 (biases and scales off their defaults, so that a
    conversion that drops or swaps one shows). Drawn on the host: compiling a jitted ``init`` of a
    UNet takes ~10 s on a CPU, this no time.
    """

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            values = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif name in ("bias", "embedding"):
            values = 0.02 * rng.standard_normal(leaf.shape)
        else:
            values = rng.standard_normal(leaf.shape) / np.sqrt(max(1, int(np.prod(leaf.shape[:-1]))))
        return values.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def make_tiny_model(directory: str, seed: int = 0) -> str:
    """Writes a random SD1-style model (tokenizer, text encoder, UNet, VAE, scheduler)."""
    from transformers import CLIPTokenizer

    os.makedirs(directory, exist_ok=True)
    write_clip_tokenizer(os.path.join(directory, "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
    rng = np.random.default_rng(seed)

    text_config = tiny_text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    text_encoder = clip.CLIPTextTransformer(clip.CLIPTextConfig.from_dict(text_config))
    text_params = random_params(clip.init_abstract_params(text_encoder), rng)
    write_component(os.path.join(directory, "text_encoder"), text_config, text_params, "model.safetensors")

    unet = unet_lib.UNet2DConditionModel(unet_lib.UNet2DConditionConfig.from_dict(TINY_UNET))
    unet_params = random_params(unet_lib.init_abstract_params(unet), rng)
    write_component(os.path.join(directory, "unet"), TINY_UNET, unet_params, "diffusion_pytorch_model.safetensors")

    vae = vae_lib.AutoencoderKL(vae_lib.AutoencoderKLConfig.from_dict(TINY_VAE))
    vae_params = random_params(vae_lib.init_abstract_params(vae), rng)
    write_component(os.path.join(directory, "vae"), TINY_VAE, vae_params, "diffusion_pytorch_model.safetensors")

    write_scheduler_and_index(directory, TINY_SCHEDULER)
    return directory


def write_scheduler_and_index(directory: str, scheduler_config: dict) -> None:
    """``scheduler/scheduler_config.json`` and ``model_index.json``: what completes a diffusers directory."""
    os.makedirs(os.path.join(directory, "scheduler"), exist_ok=True)
    with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config, f, indent=2)
    write_model_index(directory)


def write_config_only_model(directory: str, unet: dict, vae: dict, text: dict, scheduler: dict,
                            text_2: Optional[dict] = None) -> str:
    """A diffusers directory with every config, tokenizer and scheduler but no weight file: what
    ``load_pretrained(shapes_only=True)`` (``jax-inversion compile``) needs to plan a model's memory."""
    from transformers import CLIPTokenizer

    encoders = {"text_encoder": text, **({"text_encoder_2": text_2} if text_2 else {})}
    for name, config in encoders.items():
        tokenizer_dir = os.path.join(directory, name.replace("text_encoder", "tokenizer"))
        write_clip_tokenizer(tokenizer_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        config = {**config, "vocab_size": config.get("vocab_size") or len(tokenizer),
                  "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        _write_json(os.path.join(directory, name, "config.json"), config)
    _write_json(os.path.join(directory, "unet", "config.json"), unet)
    _write_json(os.path.join(directory, "vae", "config.json"), vae)
    write_scheduler_and_index(directory, scheduler)
    write_model_index(directory, sdxl=text_2 is not None)
    return directory


def _write_json(path: str, value: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
