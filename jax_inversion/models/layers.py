"""Building blocks shared by our UNet and VAE (NHWC, diffusers module names)."""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_inversion.models.cpu_attention import blocked_attention
from jax_inversion.models.tpu_attention import splash_attention
from jax_inversion.core.platform import (
    CHUNK_QUERIES,
    attention_kernel_fits,
    current_platform,
    max_cudnn_head_dim,
    select_attention_backend,
)

Dtype = Any


def one_pass_variance(dtype: Dtype) -> bool:
    """Whether norms computing in ``dtype`` take the variance in one pass, ``E[x²] - E[x]²`` (statistics
    still in float32; one read of the activations instead of two): in bf16/fp16, whose own rounding
    is far above the difference. float32 keeps PyTorch's two-pass ``E[(x - E[x])²]`` (exact parity)."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def group_norm(groups: int, eps: float, dtype: Dtype, name: Optional[str] = None) -> nn.GroupNorm:
    """GroupNorm; variance as :func:`one_pass_variance` says for ``dtype``."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=one_pass_variance(dtype), name=name)


def layer_norm(eps: float, dtype: Dtype, name: Optional[str] = None) -> nn.LayerNorm:
    """LayerNorm; variance as :func:`one_pass_variance` says for ``dtype``."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=one_pass_variance(dtype), name=name)


class DenseParams(nn.Module):
    """An ``nn.Dense``'s ``kernel`` and ``bias`` (same names, shapes, dtype and init), returned rather
    than applied, so that :func:`fused_dense` can run several layers on one input as one matmul."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, Optional[jax.Array]]:
        kernel = self.param("kernel", nn.linear.default_kernel_init, (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32) if self.use_bias else None
        return kernel, bias


def fused_dense(x: jax.Array, layers: Sequence[DenseParams], dtype: Dtype) -> list[jax.Array]:
    """What ``nn.Dense`` gives for each of ``layers`` (alike in ``use_bias``) on ``x`` in ``dtype``, as
    one matmul of ``x`` against their kernels side by side (fused q/k/v projections; each layer's
    params stay under its own name)."""
    kernels, biases = zip(*(layer(x.shape[-1]) for layer in layers))
    x, kernel = nn.dtypes.promote_dtype(x, jnp.concatenate(kernels, axis=-1), dtype=dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if biases[0] is not None:
        y = y + jnp.concatenate(biases).astype(y.dtype)
    return jnp.split(y, list(itertools.accumulate(layer.features for layer in layers))[:-1], axis=-1)


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


def chunked_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, causal: bool = False, block: int = CHUNK_QUERIES):
    """Softmax attention over ``[B, T, heads, dim]``, ``block`` queries (keys) at a time: the ``chunked``
    backend, flash attention's algorithm in XLA ops with its own backward pass
    (:mod:`jax_inversion.models.cpu_attention`). No ``[B, heads, T, S]`` array outlives its block;
    logits and softmax are float32."""
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (qh, kh, vh))  # [B, heads, T, dim]
    return jnp.swapaxes(blocked_attention(q, k, v, causal, block), 1, 2)


def fused_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, backend: str, causal: bool = False) -> jax.Array:
    """Softmax attention over ``[B, T, heads, dim]`` by ``backend`` (``xla``, ``chunked``, ``cudnn`` or ``pallas``).

    ``pallas`` is the TPU splash-attention kernel, run per device under ``shard_map`` over the
    ``data`` axis (:mod:`jax_inversion.models.tpu_attention`); under
    ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` it runs in Pallas' interpreter, which
    is how it is tested on a CPU.
    """
    if backend == "pallas":
        return splash_attention(qh, kh, vh, causal)
    if backend == "chunked":
        return chunked_attention(qh, kh, vh, causal)
    return jax.nn.dot_product_attention(qh, kh, vh, is_causal=causal, implementation=backend)


def attention_backend_for(requested: str, dtype, q_len: int, kv_len: int, head_dim: int) -> str:
    """The kernel one attention call uses: the platform's choice for ``requested`` (an error if it
    cannot run here) where the kernel takes these shapes, XLA's attention where it does not."""
    platform = current_platform()
    backend = select_attention_backend(requested, platform, dtype)
    limit = max_cudnn_head_dim() if backend == "cudnn" else 256
    return backend if attention_kernel_fits(backend, q_len, kv_len, head_dim, limit) else "xla"


_KERNEL_RECORDS: list[dict] = []  # open record_attention_kernels() blocks, innermost last


@contextlib.contextmanager
def record_attention_kernels() -> Iterator[dict]:
    """Within it, each named attention layer traced (the UNet's) notes the kernel it got:
    ``{layer name: kernel}``, kernel one of ``xla``, ``chunked``, ``cudnn``, ``splash`` (the TPU kernel)."""
    record: dict = {}
    _KERNEL_RECORDS.append(record)
    try:
        yield record
    finally:
        _KERNEL_RECORDS.remove(record)


def multi_head_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    *,
    return_probs: bool = False,
    upcast: bool = False,
    causal: bool = False,
    backend: str = "xla",
    layer: str = "",
):
    """Scaled dot-product attention over ``[B, T, heads*dim]`` inputs.

    Without ``return_probs`` it runs ``backend``'s kernel (see :mod:`jax_inversion.core.platform`:
    ``auto``, ``xla``, ``chunked``, ``cudnn`` or ``pallas``). With it, the softmax is computed explicitly
    and ``(out, probs)`` is returned, ``probs`` of shape ``[B, heads, T_q, T_k]`` (rows sum to
    one): the fused kernels never materialise the probabilities. ``upcast`` computes scores and
    softmax in float32 (diffusers ``upcast_attention``/``upcast_softmax``). ``layer`` names the call
    for :func:`record_attention_kernels`.
    """
    batch, q_len, inner = q.shape
    head_dim = inner // heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, head_dim)
    qh, kh, vh = split(q), split(k), split(v)
    compute_dtype = jnp.float32 if upcast else q.dtype
    if not return_probs:
        kernel = attention_backend_for(backend, compute_dtype, q_len, kh.shape[1], head_dim)
        if layer and _KERNEL_RECORDS:
            _KERNEL_RECORDS[-1][layer] = "splash" if kernel == "pallas" else kernel
        cast = lambda t: t.astype(compute_dtype)
        out = fused_attention(cast(qh), cast(kh), cast(vh), kernel, causal=causal).astype(q.dtype)
        return out.reshape(batch, q_len, inner)
    scores = jnp.einsum("bqhd,bkhd->bhqk", qh.astype(compute_dtype), kh.astype(compute_dtype))
    scores = scores * (head_dim ** -0.5)
    if causal:
        mask = jnp.tril(jnp.ones((q_len, kh.shape[1]), dtype=bool))
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32) if upcast else scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(vh.dtype), vh)
    return out.reshape(batch, q_len, inner), probs
