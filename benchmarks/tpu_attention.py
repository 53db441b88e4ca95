"""The TPU attention kernels compared by the TPU compiler, without a TPU: what `tpu_attention` chose from.

For each long self-attention layer of SD1.5 (512 px) and SDXL (1024 px), the forward and backward
pass of attention over ``[B, T, heads, dim]`` (batch 2 per chip, bf16) is compiled for the
``v5e:2x4`` topology (8 chips, batch sharded over ``data``, each kernel under ``shard_map``) by
XLA's attention, the Pallas flash kernel (its default blocks), and our splash path
(:func:`jax_inversion.models.tpu_attention.splash_attention`) with and without head-dim padding.
Each line: HBM bytes accessed and FLOPs from ``cost_analysis()`` (a Pallas kernel's are its own
declared estimate), temporary bytes from ``memory_analysis()``, per chip. Needs libtpu
(``pip install 'jax[tpu]'``); runs on a CPU:

    JAX_PLATFORMS=cpu python -m benchmarks.tpu_attention > benchmarks/results/tpu_attention.jsonl
"""
from __future__ import annotations

import json
import platform
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_inversion.models.tpu_attention import splash_attention

# (model, tokens, heads, head dim) of the layers the TPU kernel runs on.
LAYERS = [("sd15", 4096, 8, 40), ("sd15", 1024, 8, 80), ("sdxl", 4096, 10, 64), ("sdxl", 1024, 20, 64)]


def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v)


def flash(q, k, v):
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    heads_major = lambda t: jnp.swapaxes(t, 1, 2)
    out = flash_attention(heads_major(q), heads_major(k), heads_major(v), sm_scale=q.shape[-1] ** -0.5)
    return heads_major(out)


KERNELS = {
    "xla": xla,
    "flash": lambda q, k, v: jax.shard_map(flash, in_specs=(P("data"),) * 3, out_specs=P("data"), check_vma=False)(q, k, v),
    "splash_padded": lambda q, k, v: splash_attention(q, k, v, pad=True),
    "splash_unpadded": lambda q, k, v: splash_attention(q, k, v, pad=False),
}


def measure(mesh, kernel: str, tokens: int, heads: int, dim: int, per_chip: int) -> dict:
    spec = jax.ShapeDtypeStruct((per_chip * mesh.size, tokens, heads, dim), jnp.bfloat16,
                                sharding=NamedSharding(mesh, P("data")))
    loss = lambda q, k, v: KERNELS[kernel](q, k, v).astype(jnp.float32).sum()
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    return {"kernel": kernel, "flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
            "temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes,
            "compile_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    from jax.experimental import topologies

    topology = "v5e:2x4"
    mesh = Mesh(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices, ("data",))
    for model, tokens, heads, dim in LAYERS:
        for kernel in KERNELS:
            row = {"topology": topology, "model": model, "tokens": tokens, "heads": heads, "head_dim": dim,
                   "batch_per_chip": 2, "dtype": "bfloat16", "pass": "forward+backward",
                   "machine": f"compiled on {platform.machine()} CPU, jax {jax.__version__}"}
            try:
                row.update(measure(mesh, kernel, tokens, heads, dim, 2))
            except Exception as e:  # a kernel that does not compile at this shape is a result too
                row.update(kernel=kernel, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
