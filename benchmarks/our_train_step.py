"""Steps/s and compile time of our textual-inversion step at SD1.5 architecture size.

Random weights (SD1.5 UNet, CLIP ViT-L/14 text encoder), cached latents as the real job
uses, one process, every local device on the ``data`` axis.

    python -m benchmarks.our_train_step [--resolution 256] [--batch 1] [--steps 5] [--warmup 3] [--dtype auto] [--attention_backend auto]

``--warmup`` untimed steps (the first compiles), then ``--steps`` timed ones with one sync at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.unet_step import SD15_UNET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, the compiling one included")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--attention_backend", default="auto", help="auto, xla, chunked, cudnn or pallas (jax_inversion.core.platform)")
    args = parser.parse_args()

    from transformers import CLIPTokenizer

    from jax_inversion.text import tokens as tokens_lib
    from jax_inversion.configs.ti import get_config, resolve_unset
    from jax_inversion.models.loading import Pretrained
    from jax_inversion.models import clip, unet as unet_lib, vae as vae_lib
    from jax_inversion.objectives.terms import Objective
    from jax_inversion.diffusion.schedule import NoiseSchedule
    from jax_inversion.models.tokenizer_files import write_clip_tokenizer
    from jax_inversion.training.optim import make_optimizer
    from jax_inversion.core.sharding import make_mesh
    from jax_inversion.training.step import StepConfig, init_state, make_train_step
    from jax_inversion.core.platform import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    tokenizer_dir = tempfile.mkdtemp()
    write_clip_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_config = clip.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12, eos_token_id=tokenizer.eos_token_id)
    text_encoder = clip.CLIPTextTransformer(text_config, dtype=dtype)
    unet = unet_lib.UNet2DConditionModel(unet_lib.UNet2DConditionConfig.from_dict(SD15_UNET), dtype=dtype,
                                         attention_backend=args.attention_backend)
    latent = args.resolution // 8
    cast = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)
    text_params = cast(jax.jit(text_encoder.init)(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))["params"])
    unet_params = cast(jax.jit(unet.init)(jax.random.PRNGKey(1), jnp.zeros((1, latent, latent, 4)), jnp.zeros((1,)),
                                          jnp.zeros((1, 77, 768)))["params"])
    model = Pretrained(path="random-sd15", unet=unet, unet_params=unet_params, text_encoder=text_encoder,
                       text_encoder_params=text_params, vae=vae_lib.AutoencoderKL(vae_lib.AutoencoderKLConfig()),
                       tokenizer=tokenizer, scheduler_config={"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    layout = tokens_lib.PlaceholderIds(("<c>",), 49408)
    config = resolve_unset(get_config())
    optimizer, lr = make_optimizer(config.train, args.batch)
    mesh = make_mesh()
    step = make_train_step(model, NoiseSchedule.from_config(model.scheduler_config), {"text_encoder": layout}, optimizer,
                           Objective({"diffusion": 1.0}), lr, mesh, StepConfig(resolution=args.resolution))
    embeddings = {"text_encoder": jnp.zeros((1, 768), jnp.float32)}
    state = init_state(embeddings, optimizer, 0)
    rng = np.random.default_rng(0)
    ids = np.full((args.batch, 77), tokenizer.eos_token_id, np.int32)
    ids[:, :5] = [tokenizer.bos_token_id, 320, 526, 515, 49408]
    batch = {"latent_mean": jnp.asarray(rng.standard_normal((args.batch, latent, latent, 4)), jnp.float32),
             "latent_std": jnp.full((args.batch, latent, latent, 4), 0.01, jnp.float32),
             "input_ids": {"text_encoder": jnp.asarray(ids)}}
    base = jax.random.PRNGKey(0)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        state, metrics = step(state, batch, base)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            state, metrics = step(state, batch, base)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch, base)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
    print(json.dumps({
        "config": f"SD1.5 UNet + CLIP-L, random weights, {dtype.name}", "dtype": dtype.name,
        "attention_backend": args.attention_backend, "resolution": args.resolution,
        "batch": args.batch, "devices": jax.device_count(), "warmup": max(args.warmup, 1), "steps": args.steps,
        "device": f"{jax.devices()[0].platform} ({platform.machine()}, {os.cpu_count()} cores)",
        "compile_plus_first_step_s": round(compile_s, 2), "steps_per_second": round(args.steps / elapsed, 3),
        "loss": float(metrics["loss"]),
    }))


if __name__ == "__main__":
    main()
