"""Tiny diffusers-format Stable Diffusion models built with PyTorch diffusers/transformers.

They are the independent reference: our Flax code must load them and agree with the
PyTorch modules that wrote them.
"""
from __future__ import annotations

import os

import torch

from jax_inversion.models.tiny import write_model_index
from jax_inversion.models.tokenizer_files import write_clip_tokenizer

# SD 1.x style: conv projections, one scalar head count, quick_gelu CLIP, epsilon.
_SD1 = dict(
    unet=dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=32,
        layers_per_block=2,
        norm_num_groups=8,
        sample_size=16,
    ),
    text=dict(hidden_act="quick_gelu", num_hidden_layers=3),
    prediction_type="epsilon",
    beta_schedule="scaled_linear",
)

VARIANTS = {
    "sd1": _SD1,
    # SD1 at one level: the model of the tests that train or sample (they compile whole train
    # steps and sampling loops; one resolution level, one resnet per block and two text layers
    # compile in about half the time). Parity tests keep "sd1", with SD1's two layers per block.
    "sd1_one_level": dict(
        _SD1,
        unet=dict(_SD1["unet"], block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1),
        text=dict(_SD1["text"], num_hidden_layers=2),
    ),
    # SD 2.x style: linear projections, per-block head counts, upcast attention,
    # two transformer layers in deeper blocks, gelu CLIP, v-prediction.
    "sd2": dict(
        unet=dict(
            block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=32,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=16,
            use_linear_projection=True,
            upcast_attention=True,
            transformer_layers_per_block=(1, 2, 2),
        ),
        text=dict(hidden_act="gelu", num_hidden_layers=2),
        prediction_type="v_prediction",
        beta_schedule="scaled_linear",
    ),
    # SDXL style: two text encoders (the second with a projection, another width), concatenated
    # penultimate states, added text/time embedding in the UNet.
    "sdxl": dict(
        unet=dict(
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            cross_attention_dim=80,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=16,
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 6 * 8,
        ),
        text=dict(hidden_act="quick_gelu", num_hidden_layers=2),
        text_2=dict(hidden_act="gelu", num_hidden_layers=2, hidden_size=48, intermediate_size=96, projection_dim=24),
        prediction_type="epsilon",
        beta_schedule="scaled_linear",
    ),
}


def _perturb(module: torch.nn.Module, scale: float = 0.02) -> None:
    """Random init leaves norms at identity; nudge everything so parity tests see real values."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def build_pipeline(directory: str, variant: str = "sd1", seed: int = 0) -> str:
    """Writes a diffusers-format model directory and returns its path."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = VARIANTS[variant]
    torch.manual_seed(seed)
    os.makedirs(directory, exist_ok=True)
    write_clip_tokenizer(os.path.join(directory, "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))

    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        layers_per_block=1,
    )
    def text_config(**overrides):
        fields = dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        fields.update(overrides)
        return CLIPTextConfig(**fields)

    text_encoder = CLIPTextModel(text_config(**spec["text"]))
    modules = [unet, vae, text_encoder]
    if "text_2" in spec:
        write_clip_tokenizer(os.path.join(directory, "tokenizer_2"))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(**spec["text_2"]))
        modules.append(text_encoder_2)
    for module in modules:
        _perturb(module)
    if "text_2" in spec:
        text_encoder_2.save_pretrained(os.path.join(directory, "text_encoder_2"))
    unet.save_pretrained(os.path.join(directory, "unet"))
    vae.save_pretrained(os.path.join(directory, "vae"))
    text_encoder.save_pretrained(os.path.join(directory, "text_encoder"))
    DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=spec["beta_schedule"],
        prediction_type=spec["prediction_type"],
        clip_sample=False,
    ).save_pretrained(os.path.join(directory, "scheduler"))
    write_model_index(directory, sdxl="text_2" in spec)
    return directory
