"""The TPU attention kernel for the UNet's long self-attention layers: Pallas splash attention per device.

Which layers it runs on is :func:`jax_inversion.core.platform.attention_kernel_fits`' rule (at least
1,024 queries and keys: the 64x64 and 32x32 latents' self-attention); the rest use XLA's attention.

Mosaic (Pallas TPU) kernels cannot be partitioned by XLA's SPMD partitioner, so on a multi-chip
slice the kernel runs under ``shard_map`` over the mesh's ``data`` axis (each chip its own
examples, as maxdiffusion does); with no mesh in context, or a batch the axis does not divide, it
is called as is.

The choices below were made from the TPU compiler's numbers (``python -m benchmarks.tpu_attention``:
fwd+bwd of SD1.5's and SDXL's long layers compiled for ``v5e:2x4`` without a TPU, batch 2 per chip;
``benchmarks/results/tpu_attention.jsonl``):

* splash, not flash: fewer HBM bytes accessed at 3 of the 4 shapes (SD1.5 4096x40: 424 vs 527 MB,
  1024x80: 97 vs 137 MB; SDXL 1024x64: 225 vs 322 MB) and less temporary memory at all four
  (4096x40: 0.9 vs 84 MB); at SDXL's 4096x64 flash reads 22 % fewer bytes (644 vs 827 MB) but holds
  2.3x the temporaries (147 vs 64 MB). Both are far below XLA's attention, which materialises the
  ``[B, heads, T, T]`` logits (4096x40: 7.1 GB accessed, 1.6 GB temporaries).
* the head dim is padded to the MXU's 128 lanes only below 64 (SD1.5's 40): there padding lowers
  bytes (442 -> 424 MB) and temporaries (18.1 -> 0.9 MB: no relayout copy); at 64 and 80 it raises
  bytes by 8-28 %, so they run unpadded.
* blocks of ``min(512, T)`` queries and keys: the compiler's numbers for splash do not change with
  the block size (128 to 1024 gave the same bytes and temporaries), so 512, maxdiffusion's choice
  for long sequences, stands until a chip times it.

What only a chip can confirm: wall time (the compiler's ``optimal_seconds`` is not a time), and the 4096x64
splash-vs-flash call. Splash declares no FLOPs to the compiler, so a step's ``cost_analysis()``
FLOPs leave out the attention of the layers it runs (flash's declared count covers its forward).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

MXU_LANES = 128  # the TPU matrix unit's width; head dims below PAD_BELOW are padded to a multiple of it
PAD_BELOW = 64  # padding pays below this head dim (40), not at 64 or 80 (see above)
MAX_BLOCK = 512  # queries / keys per kernel block
BATCH_AXIS = "data"


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernel runs at: below 64 rounded up to the MXU's 128 lanes (40 -> 128), else as is."""
    return -(-head_dim // MXU_LANES) * MXU_LANES if head_dim < PAD_BELOW else head_dim


def block_size(seq_len: int) -> int:
    """Queries (and keys) per block for a sequence of ``seq_len``: ``min(512, seq_len)``."""
    return min(MAX_BLOCK, seq_len)


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, q_len: int, kv_len: int, causal: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    one = masks.CausalMask((q_len, kv_len)) if causal else masks.FullMask((q_len, kv_len))
    bq, bkv = block_size(q_len), block_size(kv_len)
    blocks = splash.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
        block_q_dq=bq, block_kv_dq=bkv,
    )
    return splash.make_splash_mha(masks.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1)


def _per_device(qh: jax.Array, kh: jax.Array, vh: jax.Array, causal: bool, pad: Optional[bool] = None) -> jax.Array:
    """Splash attention over this device's ``[b, T, heads, dim]``: head dim padded, the ``b * heads`` (example,
    head) pairs as the kernel's heads (one kernel grid, no ``vmap`` over a Pallas call)."""
    batch, q_len, heads, dim = qh.shape
    width = padded_head_dim(dim) if pad is None else (-(-dim // MXU_LANES) * MXU_LANES if pad else dim)

    def heads_major(t, scale=1.0):
        t = jnp.swapaxes(t, 1, 2) * jnp.asarray(scale, t.dtype)  # [b, heads, T, dim]
        t = t.reshape((batch * heads,) + t.shape[2:])
        return jnp.pad(t, ((0, 0), (0, 0), (0, width - dim))) if width != dim else t

    kernel = _splash_kernel(batch * heads, q_len, kh.shape[1], causal)
    out = kernel(heads_major(qh, dim ** -0.5), heads_major(kh), heads_major(vh))  # zero lanes add nothing
    return jnp.swapaxes(out[..., :dim].reshape(batch, heads, q_len, dim), 1, 2)


def splash_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, causal: bool = False, pad: Optional[bool] = None) -> jax.Array:
    """Softmax attention over ``[B, T, heads, dim]`` by the splash kernel, per device of the ``data`` axis.

    ``pad``: pad the head dim to 128 lanes (True), never (False), or by :func:`padded_head_dim` (None).

    Under ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` it runs in Pallas' interpreter
    (how it is tested on a CPU).
    """
    run = functools.partial(_per_device, causal=causal, pad=pad)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or BATCH_AXIS not in mesh.axis_names or qh.shape[0] % mesh.shape[BATCH_AXIS]:
        return run(qh, kh, vh)
    spec = P(BATCH_AXIS)
    return jax.shard_map(run, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(qh, kh, vh)
