"""UNet forward + backward to the encoder states: our Flax UNet vs PyTorch diffusers.

Same SD1.5 architecture (random weights), same inputs, one process. This is the inner
cost of a textual-inversion step (gradients flow to the text conditioning only).

    python benchmarks/unet_step.py [--latent 32] [--batch 1] [--iters 5] [--warmup 3]

Each side runs ``--warmup`` untimed calls (ours: the first compiles), then ``--iters`` timed ones.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}


def bench_jax(latent: int, batch: int, iters: int, inputs, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jax_inversion.models.unet import UNet2DConditionConfig, UNet2DConditionModel

    model = UNet2DConditionModel(UNet2DConditionConfig.from_dict(SD15_UNET))
    sample, t, states, target = (jnp.asarray(x) for x in inputs)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), sample, t, states)["params"]

    @jax.jit
    def grad_step(params, states):
        def loss(states):
            return jnp.mean((model.apply({"params": params}, sample, t, states) - target) ** 2)

        return jax.value_and_grad(loss)(states)

    start = time.perf_counter()
    jax.block_until_ready(grad_step(params, states))
    compile_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        jax.block_until_ready(grad_step(params, states))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(grad_step(params, states))
        times.append(time.perf_counter() - start)
    return {"impl": "jax_inversion (Flax, jit)", "compile_plus_first_s": round(compile_s, 2),
            "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3)}


def bench_torch(latent: int, batch: int, iters: int, inputs, warmup: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**SD15_UNET).eval()
    model.requires_grad_(False)
    sample, t, states, target = inputs
    sample = torch.from_numpy(sample.transpose(0, 3, 1, 2).copy())
    target = torch.from_numpy(target.transpose(0, 3, 1, 2).copy())
    t = torch.from_numpy(t)
    states = torch.from_numpy(states)

    def step():
        s = states.clone().requires_grad_(True)
        loss = torch.mean((model(sample, t, s).sample - target) ** 2)
        loss.backward()
        return loss.item(), s.grad

    for _ in range(max(warmup, 1)):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"impl": f"diffusers {__import__('diffusers').__version__} (torch {torch.__version__}, SDPA)",
            "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first on each side (ours: the first compiles)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    inputs = (
        rng.standard_normal((args.batch, args.latent, args.latent, 4)).astype(np.float32),
        np.full((args.batch,), 500, np.int64),
        rng.standard_normal((args.batch, 77, 768)).astype(np.float32),
        rng.standard_normal((args.batch, args.latent, args.latent, 4)).astype(np.float32),
    )
    import jax

    common = {"config": "SD1.5 UNet, random weights, fp32", "latent": args.latent, "batch": args.batch, "warmup": args.warmup,
              "device": f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
                        f"{__import__('os').cpu_count()} cores)"}
    ours = bench_jax(args.latent, args.batch, args.iters, inputs, args.warmup)
    print(json.dumps({**common, **ours}), flush=True)
    theirs = bench_torch(args.latent, args.batch, args.iters, inputs, args.warmup)
    print(json.dumps({**common, **theirs}), flush=True)
    print(json.dumps({"speedup_torch_over_jax_median": round(theirs["median_s"] / ours["median_s"], 2)}))


if __name__ == "__main__":
    main()
