"""What runs where: the compute dtype and the attention kernel for each platform (cpu, gpu, tpu).

Pure functions of (requested name, platform, dtype, shapes), so every choice is testable on a CPU:

* :func:`resolve_dtype` - ``auto`` is bfloat16 on accelerators (tensor cores / MXU, and what cuDNN's
  fused attention needs) and float32 on CPU (no bf16 matmul units, and exact parity with PyTorch).
* :func:`select_attention_backend` - ``auto`` is cuDNN flash attention on GPU in bf16/fp16, the Pallas
  splash-attention kernel on TPU (long layers), ``chunked`` on CPU (flash attention's algorithm in XLA
  ops with its own backward pass, :mod:`jax_inversion.models.cpu_attention`: on a 2-core CPU 1.6-8.7x
  faster forward+backward than ``jax.nn.dot_product_attention``'s unfused path on 1,024- and
  4,096-token layers, holding ``[B, heads, T, S]`` probabilities only where they fit 16 MiB), ``xla``
  (``jax.nn.dot_product_attention``'s unfused path) on GPU in float32; a backend that cannot run on
  the platform or dtype is a :class:`PlatformError`.
* :func:`attention_kernel_fits` - the shape limits of the fused kernels; a layer outside them (e.g.
  cross-attention over 77 keys on TPU, whose kernel tiles keys by 128) uses XLA's attention.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp

from jax_inversion.core.errors import ConfigError

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "xla", "chunked", "cudnn", "pallas")
ACCELERATORS = ("gpu", "tpu")
# cuDNN's fused (flash) attention takes half precision only.
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
PALLAS_TILE = 128  # the TPU kernel's sequence lengths are multiples of this tile
PALLAS_MIN_TOKENS = 1024  # the TPU kernel runs on self-attention over 64x64 and 32x32 latents, not shorter layers
CHUNK_QUERIES = 128  # the most queries (keys) per block of the ``chunked`` backend


class PlatformError(ConfigError):
    """A dtype or attention backend this platform cannot run; the message names the fix."""


_TARGET: list[str] = []  # the platform programs are compiled for, when it is not this machine's (``compiling_for``)


def current_platform() -> str:
    """``cpu``, ``gpu`` or ``tpu``: the platform programs are traced for, by default the default backend's."""
    if _TARGET:
        return _TARGET[-1]
    return platform_name(jax.default_backend())


def platform_name(backend: str) -> str:
    """``cpu``, ``gpu`` or ``tpu`` for a backend or device platform name (``cuda`` and ``rocm`` are ``gpu``)."""
    return "gpu" if backend in ("cuda", "rocm") else backend


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Within it, :func:`current_platform` is ``platform``: traces pick that platform's kernels and dtypes.

    Used to compile for a TPU topology on a machine without a TPU (:mod:`jax_inversion.core.aot`).
    """
    _TARGET.append(platform)
    try:
        yield
    finally:
        _TARGET.pop()


def resolve_dtype(name: str, platform: Optional[str] = None) -> jnp.dtype:
    """The dtype for the frozen models' weights and compute: ``auto`` -> bf16 on gpu/tpu, fp32 on cpu.

    Explicit names (``float32``, ``bfloat16``, ``float16``) pass through; ``platform`` defaults to
    the current one.
    """
    if name == "auto":
        platform = platform or current_platform()
        return jnp.dtype(jnp.bfloat16 if platform in ACCELERATORS else jnp.float32)
    if name not in DTYPE_NAMES:
        raise PlatformError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_NAMES)}")
    return jnp.dtype(name)


def select_attention_backend(requested: str, platform: str, dtype: Any) -> str:
    """The attention kernel for ``requested`` (one of :data:`ATTENTION_BACKENDS`) on ``platform``.

    ``dtype`` is the dtype attention computes in (float32 where the layer upcasts). ``auto``:
    ``cudnn`` on gpu for bf16/fp16, ``pallas`` on tpu, ``chunked`` on cpu, else ``xla``. An explicit choice that cannot
    run here raises :class:`PlatformError` rather than silently running something else.
    """
    dtype = jnp.dtype(dtype)
    if requested not in ATTENTION_BACKENDS:
        raise PlatformError(f"unknown attention backend {requested!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    if requested == "auto":
        if platform == "gpu" and dtype in CUDNN_DTYPES:
            return "cudnn"
        return {"tpu": "pallas", "cpu": "chunked"}.get(platform, "xla")
    if requested == "cudnn" and platform != "gpu":
        raise PlatformError(f"attention backend 'cudnn' needs a GPU, this is {platform}: use attention_backend=auto or xla")
    if requested == "cudnn" and dtype not in CUDNN_DTYPES:
        raise PlatformError(
            f"attention backend 'cudnn' needs bfloat16 or float16, this attention computes in {dtype.name} "
            "(dtype, or upcast_attention in the UNet config): set dtype=bfloat16 or use attention_backend=auto or xla"
        )
    if requested == "pallas" and platform != "tpu":
        raise PlatformError(
            f"attention backend 'pallas' (TPU splash attention) needs a TPU, this is {platform}: "
            "use attention_backend=auto or xla"
        )
    return requested


def attention_kernel_fits(backend: str, q_len: int, kv_len: int, head_dim: int, max_cudnn_head_dim: int = 256) -> bool:
    """Whether ``backend``'s kernel takes these shapes (``xla`` and ``chunked`` take all).

    cuDNN: head dim a multiple of 8, at most 256 on Hopper and later (128 before; pass
    ``max_cudnn_head_dim``). The TPU kernel (:mod:`jax_inversion.models.tpu_attention`): the long
    layers only, at least 1,024 queries and keys, multiples of its 128 tile (any head dim: it is
    padded to 128 lanes); the 77-key cross-attention and short layers run XLA's attention.
    """
    if backend == "cudnn":
        return head_dim % 8 == 0 and head_dim <= max_cudnn_head_dim
    if backend == "pallas":
        return min(q_len, kv_len) >= PALLAS_MIN_TOKENS and q_len % PALLAS_TILE == 0 and kv_len % PALLAS_TILE == 0
    return True


def max_cudnn_head_dim() -> int:
    """cuDNN flash attention's largest head dim on this GPU: 256 from Hopper (sm90) on, else 128."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return 256 if float(capability) >= 9.0 else 128
    except (TypeError, ValueError):
        return 128
