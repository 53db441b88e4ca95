"""Flax linen AutoencoderKL, numerically equal to diffusers' PyTorch ``AutoencoderKL``.

Layout is NHWC: images ``[B, H, W, C]`` in ``[-1, 1]``, latents ``[B, h, w, latent_channels]``.
Module names mirror the diffusers state-dict keys (``encoder.down_blocks.0.resnets.1.conv1.weight``
lives at ``encoder/down_blocks_0/resnets_1/conv1/kernel``) so that
:func:`jax_inversion.models.convert.convert_state_dict` maps a checkpoint onto
:func:`init_abstract_params` without a hand-written key table.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_inversion.models.layers import (
    DenseParams,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    fused_dense,
    group_norm,
    multi_head_attention,
)

Dtype = Any

_EPS = 1e-6
_SUPPORTED_ACTS = ("silu", "swish")
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The fields of a diffusers ``vae/config.json`` that define the architecture and latent scaling.

    ``force_upcast`` is only recorded: diffusers runs such VAEs in float32 because fp16
    overflows, so callers should pick ``dtype=jnp.float32`` (or bfloat16) when it is set.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (_UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Union[int, tuple[int, int]] = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True

    def __post_init__(self):
        if self.act_fn not in _SUPPORTED_ACTS:
            raise ValueError(f"AutoencoderKL act_fn {self.act_fn!r} is not supported; only 'silu' is implemented")
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError(
                f"down_block_types has {len(self.down_block_types)} entries but block_out_channels "
                f"has {len(self.block_out_channels)}"
            )
        if len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError(
                f"up_block_types has {len(self.up_block_types)} entries but block_out_channels "
                f"has {len(self.block_out_channels)}"
            )
        bad = [t for t in self.down_block_types if t != _DOWN_BLOCK] + [t for t in self.up_block_types if t != _UP_BLOCK]
        if bad:
            raise ValueError(f"unsupported VAE block types {bad}; only {_DOWN_BLOCK}/{_UP_BLOCK} are implemented")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderKLConfig":
        """Builds a config from a diffusers ``vae/config.json`` dict; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if isinstance(kwargs.get("sample_size"), (list, tuple)):
            kwargs["sample_size"] = tuple(kwargs["sample_size"])
        if kwargs.get("scaling_factor") is None:
            kwargs.pop("scaling_factor", None)
        kwargs["shift_factor"] = float(kwargs.get("shift_factor") or 0.0)
        if kwargs.get("mid_block_add_attention") is None:
            kwargs.pop("mid_block_add_attention", None)
        return cls(**kwargs)

    @property
    def downscale_factor(self) -> int:
        """Spatial ratio image / latent."""
        return 2 ** (len(self.block_out_channels) - 1)


class VAEAttention(nn.Module):
    """diffusers VAE mid-block ``Attention``: one head over all pixels, GroupNorm, residual; q, k and v
    are one matmul against the ``to_q``/``to_k``/``to_v`` kernels side by side (params unchanged)."""

    channels: int
    groups: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.group_norm = group_norm(self.groups, _EPS, self.dtype)
        self.to_q = DenseParams(self.channels)
        self.to_k = DenseParams(self.channels)
        self.to_v = DenseParams(self.channels)
        self.to_out = [nn.Dense(self.channels, dtype=self.dtype)]

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, height * width, channels)
        q, k, v = fused_dense(h, (self.to_q, self.to_k, self.to_v), self.dtype)
        out = multi_head_attention(q, k, v, heads=1, upcast=True)
        out = self.to_out[0](out).reshape(batch, height, width, channels)
        return out + x


class VAEMidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D`` without time embedding: resnet, (attention, resnet)."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        self.resnets = [ResnetBlock2D(self.channels, self.groups, _EPS, dtype=self.dtype) for _ in range(2)]
        if self.add_attention:
            self.attentions = [VAEAttention(self.channels, self.groups, dtype=self.dtype)]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` resnets, then an optional asymmetric-padding stride-2 conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    def setup(self):
        self.resnets = [
            ResnetBlock2D(self.out_channels, self.groups, _EPS, dtype=self.dtype) for _ in range(self.num_layers)
        ]
        if self.add_downsample:
            self.downsamplers = [Downsample2D(self.out_channels, padding=0, dtype=self.dtype)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_downsample:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` resnets, then an optional nearest-2x upsample + conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    def setup(self):
        self.resnets = [
            ResnetBlock2D(self.out_channels, self.groups, _EPS, dtype=self.dtype) for _ in range(self.num_layers)
        ]
        if self.add_upsample:
            self.upsamplers = [Upsample2D(self.out_channels, dtype=self.dtype)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_upsample:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image ``[B, H, W, in_channels]`` -> moments ``[B, H/f, W/f, 2*latent_channels]`` (before quant_conv)."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        channels = cfg.block_out_channels
        self.conv_in = conv(channels[0], 3, self.dtype, None)
        self.down_blocks = [
            DownEncoderBlock2D(
                out_channels=c,
                num_layers=cfg.layers_per_block,
                groups=cfg.norm_num_groups,
                add_downsample=i < len(channels) - 1,
                dtype=self.dtype,
            )
            for i, c in enumerate(channels)
        ]
        self.mid_block = VAEMidBlock(channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, dtype=self.dtype)
        self.conv_norm_out = group_norm(cfg.norm_num_groups, _EPS, self.dtype)
        self.conv_out = conv(2 * cfg.latent_channels, 3, self.dtype, None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent ``[B, h, w, latent_channels]`` (after post_quant_conv) -> image ``[B, h*f, w*f, out_channels]``."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        reversed_channels = tuple(reversed(cfg.block_out_channels))
        self.conv_in = conv(reversed_channels[0], 3, self.dtype, None)
        self.mid_block = VAEMidBlock(
            reversed_channels[0], cfg.norm_num_groups, cfg.mid_block_add_attention, dtype=self.dtype
        )
        self.up_blocks = [
            UpDecoderBlock2D(
                out_channels=c,
                num_layers=cfg.layers_per_block + 1,
                groups=cfg.norm_num_groups,
                add_upsample=i < len(reversed_channels) - 1,
                dtype=self.dtype,
            )
            for i, c in enumerate(reversed_channels)
        ]
        self.conv_norm_out = group_norm(cfg.norm_num_groups, _EPS, self.dtype)
        self.conv_out = conv(cfg.out_channels, 3, self.dtype, None)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """KL autoencoder of Stable Diffusion.

    ``dtype`` is the compute dtype; params are always float32. ``encode`` and ``decode``
    return float32 so that the posterior and pixel outputs keep full precision downstream.
    """

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, self.dtype, None)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, self.dtype, None)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images ``[B, H, W, C]`` in [-1, 1] -> posterior ``(mean, logvar)``, logvar clipped to [-30, 20]."""
        moments = self.encoder(images.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents ``[B, h, w, latent_channels]`` -> images ``[B, H, W, C]`` (roughly in [-1, 1])."""
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Encode then decode the posterior mean (used for ``init``)."""
        mean, _ = self.encode(images)
        return self.decode(mean)


def latent_dist_sample(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """Draws ``mean + exp(0.5 * logvar) * eps`` from the diagonal Gaussian posterior."""
    eps = jax.random.normal(rng, mean.shape, dtype=mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def scale_latents(config: AutoencoderKLConfig, z: jax.Array) -> jax.Array:
    """VAE sample -> diffusion latent: ``(z - shift_factor) * scaling_factor``."""
    return (z - config.shift_factor) * config.scaling_factor


def unscale_latents(config: AutoencoderKLConfig, z: jax.Array) -> jax.Array:
    """Diffusion latent -> VAE sample (the input of :meth:`AutoencoderKL.decode`)."""
    return z / config.scaling_factor + config.shift_factor


def _spatial_size(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


def init_abstract_params(module: AutoencoderKL, sample_size: Optional[Union[int, Sequence[int]]] = None) -> dict:
    """Shapes/dtypes of ``module``'s ``params`` collection via ``jax.eval_shape`` (nothing is allocated)."""
    cfg = module.config
    height, width = _spatial_size(cfg.sample_size if sample_size is None else sample_size)
    images = jax.ShapeDtypeStruct((1, height, width, cfg.in_channels), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
    return variables["params"]
