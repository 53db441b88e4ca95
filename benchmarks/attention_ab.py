"""Attention kernels side by side at SD1.5 shapes: forward and forward+backward time per backend.

Each backend runs :func:`jax_inversion.models.layers.fused_attention` (the call our UNet makes) on
the same ``[B, T, heads, dim]`` inputs; the forward output is compared with XLA's. One JSON line
per (shape, backend); a backend that fails (e.g. ``cudnn`` off a GPU) gives a line with ``error``.

Timing: ``--steps`` calls chained inside one jit (``lax.fori_loop``: each call's output feeds the
next, so none can be hoisted or dropped) with one host sync per loop; the time per call is the
median of 3 such loops divided by ``--steps``. A single kernel of a fraction of a millisecond
timed with a host sync per call would mostly time dispatch and synchronisation.

    python -m benchmarks.attention_ab [--backends xla,cudnn] [--dtype bfloat16] [--steps 20]
    python -m benchmarks.attention_ab --smoke --backends xla,chunked     # tiny shapes, any machine
    python -m benchmarks.attention_ab --shapes cpu --backends xla,chunked --dtype float32 --steps 5   # CPU users' shapes

Shapes (SD1.5 at 512 px, batch 8): 64x64 self-attention ``[8, 4096, 8, 40]`` and cross-attention
over 77 keys, 32x32 ``[8, 1024, 8, 80]`` self-attention, 16x16 ``[8, 256, 8, 160]``
self-attention. ``--shapes cpu``: the small config's 1,024-token layers (head dim 4) and SD1.5's
at 256 and 512 px, batch 1. FLOPs (the two attention matmuls, ``4 B H T S D`` forward, 2.5x that backward)
give TFLOP/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_inversion.models.layers import fused_attention

SD15_SHAPES = (  # (name, batch, queries, keys, heads, head dim)
    ("64x64 self", 8, 4096, 4096, 8, 40),
    ("64x64 cross", 8, 4096, 77, 8, 40),
    ("32x32 self", 8, 1024, 1024, 8, 80),
    ("16x16 self", 8, 256, 256, 8, 160),
)
SMOKE_SHAPES = (("16x16 self", 2, 256, 256, 2, 8), ("16x16 cross", 2, 256, 77, 2, 8))
CPU_SHAPES = (  # what CPU users run: benchmarks.train_step's small config (batch 8) and SD1.5 at 256 px (batch 1)
    ("small 32x32 self", 8, 1024, 1024, 8, 4),
    ("small 32x32 cross", 8, 1024, 77, 8, 4),
    ("sd15 256px 32x32 self", 1, 1024, 1024, 8, 40),
    ("sd15 256px 16x16 self", 1, 256, 256, 8, 80),
    ("sd15 512px 64x64 self", 1, 4096, 4096, 8, 40),
)
SHAPES = {"sd15": SD15_SHAPES, "cpu": CPU_SHAPES}


LOOPS = 3  # timed loops per measurement (their median)


def loop_ms(body, carry, calls: int) -> float:
    """Milliseconds per ``body`` call: ``carry = body(carry)`` ``calls`` times inside one jit
    (``lax.fori_loop``), one sync at the end; compiled and run once before the median of
    ``LOOPS`` timed loops."""
    loop = jax.jit(lambda carry: jax.lax.fori_loop(0, calls, lambda _, c: body(c), carry))
    jax.block_until_ready(loop(carry))
    times = []
    for _ in range(LOOPS):
        start = time.perf_counter()
        jax.block_until_ready(loop(carry))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / calls


def measure(shape: tuple, backend: str, dtype, steps: int, reference: np.ndarray | None) -> dict:
    name, batch, queries, keys, heads, dim = shape
    rngs = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(rngs[0], (batch, queries, heads, dim), dtype)
    k, v = (jax.random.normal(r, (batch, keys, heads, dim), dtype) for r in rngs[1:3])
    weights = jax.random.normal(rngs[3], q.shape, dtype)
    attention = lambda q, k, v: fused_attention(q, k, v, backend)
    grads = jax.grad(lambda q, k, v, w: (attention(q, k, v) * w).astype(jnp.float32).sum(), argnums=(0, 1, 2))

    def forward(carry):  # the output (shaped as q) is the next call's queries
        q, k, v = carry
        return attention(q, k, v), k, v

    def backward(carry):  # a small step along every gradient, so all three are computed every call
        q, k, v, w = carry
        return (*((x + 1e-3 * g).astype(x.dtype) for x, g in zip((q, k, v), grads(q, k, v, w))), w)

    out = np.asarray(jax.jit(attention)(q, k, v), np.float32)
    fwd_ms, fwd_bwd_ms = loop_ms(forward, (q, k, v), steps), loop_ms(backward, (q, k, v, weights), steps)
    flops = 4.0 * batch * heads * queries * keys * dim
    return {
        "fwd_ms": round(fwd_ms, 3), "fwd_bwd_ms": round(fwd_bwd_ms, 3), "calls_per_loop": steps,
        "timing": f"{steps} calls in one jit (lax.fori_loop), one sync; median of {LOOPS} loops / {steps}",
        "fwd_tflops": round(flops / fwd_ms / 1e9, 2), "fwd_bwd_tflops": round(3.5 * flops / fwd_bwd_ms / 1e9, 2),
        "max_abs_diff_vs_xla": None if reference is None else float(np.abs(out - reference).max()),
        "output": out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="xla,cudnn")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--steps", type=int, default=20, help="calls per timed loop")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a quick end-to-end check on a CPU)")
    parser.add_argument("--shapes", default="sd15", choices=sorted(SHAPES), help="sd15 (batch 8) or cpu")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    for shape in SMOKE_SHAPES if args.smoke else SHAPES[args.shapes]:
        reference = None
        for backend in [b for b in args.backends.split(",") if b]:
            line = {"bench": "attention", "shape": shape[0], "batch": shape[1], "queries": shape[2], "keys": shape[3],
                    "heads": shape[4], "head_dim": shape[5], "attention_backend": backend, "dtype": dtype.name,
                    "device": device.device_kind, "jax": jax.__version__}
            try:
                result = measure(shape, backend, dtype, args.steps, reference)
                if backend == "xla":
                    reference = result["output"]
                result.pop("output")
                line.update(result)
            except Exception as e:  # one backend failing must not stop the others
                line["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
