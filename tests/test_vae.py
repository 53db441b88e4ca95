"""Parity of our Flax AutoencoderKL with diffusers' PyTorch one on tiny random models."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import traverse_util

from jax_inversion.models.convert import WeightMismatchError, convert_state_dict, flax_path_to_torch_key
from jax_inversion.models.vae import (
    AutoencoderKL,
    AutoencoderKLConfig,
    init_abstract_params,
    latent_dist_sample,
    scale_latents,
    unscale_latents,
)

TOL = 1e-4

CONFIGS = {
    "lpb1_g32": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32),
    "lpb2_g8": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8),
    "noattn_noquant": dict(
        block_out_channels=(16, 16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}


@functools.lru_cache(maxsize=None)
def _torch_vae(name: str) -> TorchAutoencoderKL:
    """A tiny diffusers VAE whose weights are perturbed so norms and biases are not identity/zero."""
    kwargs = dict(CONFIGS[name])
    n = len(kwargs["block_out_channels"])
    kwargs.update(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        sample_size=32,
    )
    torch.manual_seed(0)
    model = TorchAutoencoderKL(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.02))
    return model


def _state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _flax(name: str, dtype=jnp.float32):
    """(module, converted params, jitted encode, jitted decode), cached so compiles are shared."""
    model = _torch_vae(name)
    config = AutoencoderKLConfig.from_dict(dict(model.config))
    module = AutoencoderKL(config, dtype=dtype)
    params = convert_state_dict(_state_dict_numpy(model), init_abstract_params(module))
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode))
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))
    return module, params, encode, decode


def _nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_tree_matches_state_dict_keys(name):
    model = _torch_vae(name)
    module = AutoencoderKL(AutoencoderKLConfig.from_dict(dict(model.config)))
    flat = traverse_util.flatten_dict(init_abstract_params(module))
    assert {flax_path_to_torch_key(p) for p in flat} == set(model.state_dict())
    assert all(v.dtype == jnp.float32 for v in flat.values())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_decode_match_diffusers(name):
    model = _torch_vae(name)
    module, params, encode, decode = _flax(name)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
    factor = module.config.downscale_factor
    latents = rng.standard_normal((2, 4, 32 // factor, 32 // factor)).astype(np.float32)

    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(images)).latent_dist
        decoded = model.decode(torch.from_numpy(latents)).sample

    mean, logvar = encode(params, jnp.asarray(images.transpose(0, 2, 3, 1)))
    out = decode(params, jnp.asarray(latents.transpose(0, 2, 3, 1)))

    assert mean.shape == (2, 32 // factor, 32 // factor, 4) and mean.dtype == jnp.float32
    assert out.shape == (2, 32, 32, 3) and out.dtype == jnp.float32
    diffs = {
        "mean": float(np.abs(np.asarray(mean) - _nchw_to_nhwc(posterior.mean)).max()),
        "logvar": float(np.abs(np.asarray(logvar) - _nchw_to_nhwc(posterior.logvar)).max()),
        "decoded": float(np.abs(np.asarray(out) - _nchw_to_nhwc(decoded)).max()),
    }
    print(f"{name}: max abs diff {diffs}")
    assert max(diffs.values()) < TOL, diffs
    assert float(np.abs(np.asarray(mean)).max()) > 1e-2 and float(np.abs(np.asarray(out)).max()) > 1e-2


def _to_deprecated_attention(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames attention weights to the pre-0.14 diffusers names, stored as 1x1 convs."""
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state_dict.items():
        match = re.match(r"(.*\.attentions\.0)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", key)
        if match:
            prefix, name, leaf = match.groups()
            key = f"{prefix}.{renames[name]}.{leaf}"
            if leaf == "weight":
                value = value[:, :, None, None]
        out[key] = value
    return out


def test_deprecated_attention_names_convert_identically():
    model = _torch_vae("lpb1_g32")
    module = AutoencoderKL(AutoencoderKLConfig.from_dict(dict(model.config)))
    abstract = init_abstract_params(module)
    state_dict = _state_dict_numpy(model)
    old = _to_deprecated_attention(state_dict)
    assert "encoder.mid_block.attentions.0.query.weight" in old
    assert old["decoder.mid_block.attentions.0.proj_attn.weight"].shape == (64, 64, 1, 1)
    assert not any(".to_q." in k for k in old)

    new_params = traverse_util.flatten_dict(convert_state_dict(state_dict, abstract))
    old_params = traverse_util.flatten_dict(convert_state_dict(old, abstract))
    assert new_params.keys() == old_params.keys()
    for path, value in new_params.items():
        np.testing.assert_array_equal(old_params[path], value, err_msg="/".join(path))


def test_misshaped_weight_raises_naming_key():
    model = _torch_vae("lpb1_g32")
    module = AutoencoderKL(AutoencoderKLConfig.from_dict(dict(model.config)))
    state_dict = _state_dict_numpy(model)
    key = "decoder.up_blocks.1.resnets.0.conv1.weight"
    state_dict[key] = np.zeros((16, 64, 3, 3), np.float32)
    with pytest.raises(WeightMismatchError, match=re.escape(key)):
        convert_state_dict(state_dict, init_abstract_params(module))


def test_missing_and_unexpected_weights_raise():
    model = _torch_vae("lpb1_g32")
    module = AutoencoderKL(AutoencoderKLConfig.from_dict(dict(model.config)))
    state_dict = _state_dict_numpy(model)
    del state_dict["quant_conv.bias"]
    state_dict["decoder.mid_block.attentions.1.to_q.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(WeightMismatchError, match=r"quant_conv\.bias.*attentions\.1\.to_q\.weight"):
        convert_state_dict(state_dict, init_abstract_params(module))


def test_bfloat16_compute_keeps_float32_params():
    _, params, encode32, _ = _flax("lpb1_g32")
    _, params16, encode16, decode16 = _flax("lpb1_g32", jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params16))
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32))
    mean32, _ = encode32(params, images)
    mean16, logvar16 = encode16(params16, images)
    decoded16 = decode16(params16, mean16)
    assert mean16.dtype == logvar16.dtype == decoded16.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(decoded16)))
    scale = float(jnp.abs(mean32).max())
    assert float(jnp.abs(mean16 - mean32).max()) < 0.05 * scale + 0.05


def test_config_from_dict():
    d = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": [512, 512],
        "shift_factor": None,
        "latents_mean": None,
    }
    cfg = AutoencoderKLConfig.from_dict(d)
    assert cfg.block_out_channels == (128, 256, 512, 512)
    assert cfg.scaling_factor == 0.18215 and cfg.shift_factor == 0.0
    assert cfg.mid_block_add_attention and cfg.use_quant_conv and cfg.use_post_quant_conv
    assert cfg.sample_size == (512, 512) and cfg.downscale_factor == 8
    abstract = init_abstract_params(AutoencoderKL(cfg), sample_size=64)
    assert abstract["encoder"]["conv_out"]["kernel"].shape == (3, 3, 512, 8)

    sdxl = AutoencoderKLConfig.from_dict({**d, "scaling_factor": 0.13025, "shift_factor": 0.0609})
    assert (sdxl.scaling_factor, sdxl.shift_factor) == (0.13025, 0.0609)

    with pytest.raises(ValueError, match="act_fn"):
        AutoencoderKLConfig.from_dict({**d, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="block types"):
        AutoencoderKLConfig.from_dict({**d, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})


def test_latent_scaling_and_sampling():
    cfg = AutoencoderKLConfig(scaling_factor=0.3611, shift_factor=0.1159)
    z = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(scale_latents(cfg, z), (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(cfg, scale_latents(cfg, z)), z, atol=1e-6)

    mean = jnp.full((4, 16, 16, 4), 2.0)
    logvar = jnp.full_like(mean, np.log(0.25))
    s1 = jax.jit(latent_dist_sample)(mean, logvar, jax.random.PRNGKey(3))
    # the reparameterisation by hand: mean + sigma * N(0, 1) from the same key, sigma = exp(log(0.25) / 2) = 0.5
    np.testing.assert_allclose(np.asarray(s1), 2.0 + 0.5 * np.asarray(jax.random.normal(jax.random.PRNGKey(3), mean.shape)), atol=1e-6)
    assert abs(float(s1.mean()) - 2.0) < 0.05 and abs(float(s1.std()) - 0.5) < 0.05
