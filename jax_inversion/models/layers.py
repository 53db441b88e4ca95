"""Building blocks shared by our UNet and VAE (NHWC, diffusers module names)."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def group_norm(groups: int, eps: float, dtype: Dtype, name: Optional[str] = None) -> nn.GroupNorm:
    """GroupNorm with the two-pass variance PyTorch uses (exact parity in fp32)."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1, padding=None) -> nn.Conv:
    pad = kernel // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (default time-scale-shift) with optional time embedding."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` is the VAE variant: pad right/bottom by one first."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((self.padding, self.padding),) * 2 if self.padding else ((0, 1), (0, 1))
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, self.dtype, "conv")(x)


def multi_head_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    *,
    return_probs: bool = False,
    upcast: bool = False,
    causal: bool = False,
):
    """Scaled dot-product attention over ``[B, T, heads*dim]`` inputs.

    Without ``return_probs`` it calls ``jax.nn.dot_product_attention`` (fused kernel on GPU).
    With it, the softmax is computed explicitly and ``(out, probs)`` is returned, ``probs``
    of shape ``[B, heads, T_q, T_k]`` (rows sum to one). ``upcast`` computes scores and
    softmax in float32 (diffusers ``upcast_attention``/``upcast_softmax``).
    """
    batch, q_len, inner = q.shape
    head_dim = inner // heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, head_dim)
    qh, kh, vh = split(q), split(k), split(v)
    if not return_probs:
        if upcast and q.dtype != jnp.float32:
            out = jax.nn.dot_product_attention(
                qh.astype(jnp.float32), kh.astype(jnp.float32), vh.astype(jnp.float32), is_causal=causal
            ).astype(q.dtype)
        else:
            out = jax.nn.dot_product_attention(qh, kh, vh, is_causal=causal)
        return out.reshape(batch, q_len, inner)
    compute_dtype = jnp.float32 if upcast else q.dtype
    scores = jnp.einsum("bqhd,bkhd->bhqk", qh.astype(compute_dtype), kh.astype(compute_dtype))
    scores = scores * (head_dim ** -0.5)
    if causal:
        mask = jnp.tril(jnp.ones((q_len, kh.shape[1]), dtype=bool))
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32) if upcast else scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(vh.dtype), vh)
    return out.reshape(batch, q_len, inner), probs
