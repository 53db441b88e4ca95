"""The TPU results table: SD1.5 at 512 px and SDXL at 1024 px, compiled for TPU slices without a TPU.

For each model (random architecture configs, no weights: ``tiny.write_config_only_model``) and
topology, runs ``jax-inversion compile``'s planner (:func:`jax_inversion.training.tpu_plan.plan_topology`:
the train job's real TI step, bf16, ``attention_backend=auto``, batch 8 per chip) and prints one JSON
line: compiled, bytes per chip and whether they fit the chip's HBM, the TPU compiler's FLOPs per
chip per step, the attention kernels, and (``--search``) the largest batch per chip that fits.

    JAX_PLATFORMS=cpu python -m benchmarks.tpu_compile [--models sd15,sdxl] [--topologies v4:2x2x1,...] \
        [--search none,dots,full] > benchmarks/results/tpu_compile.jsonl
    python -m benchmarks.tpu_compile --table benchmarks/results/tpu_compile.jsonl   # the README's table
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time

from benchmarks.train_step import SCHEDULER, SD15_TEXT, SD15_UNET, SD15_VAE

SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "act_fn": "silu",
}
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_TEXT_2 = {  # OpenCLIP ViT-bigG/14 text tower, with the projection SDXL pools through
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 1280,
}
MODELS = {
    "sd15": dict(unet=SD15_UNET, vae=SD15_VAE, text=SD15_TEXT, resolution=512),
    "sdxl": dict(unet=SDXL_UNET, vae=SDXL_VAE, text=SD15_TEXT, text_2=SDXL_TEXT_2, resolution=1024),
}
TOPOLOGIES = ("v4:2x2x1", "v5e:2x4", "v5p:2x2x1", "v6e:2x4", "v5e:4x4")


def table(path: str) -> str:
    """The README's markdown table of the JSON lines in ``path``: a row per line, by model and topology."""
    import json

    rows = {}
    for r in map(json.loads, open(path)):  # a topology's rows in the order run (remat none first)
        rows.setdefault((r["model"], r["topology"]), []).append(r)
    names = {"sd15": "SD1.5 512 px", "sdxl": "SDXL 1024 px"}
    lines = ["| model, topology | devices (hosts) | compiled | GiB per device (HBM) | fits | TFLOP per device per step "
             "| attention layers | largest batch per device (remat none / dots / full / blocks) | compile |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for topology in TOPOLOGIES:
            found = rows.get((model, topology), [])
            lines += [table_row(names[model], r) for r in found] or [f"| {names[model]}, {topology} | | not run yet | | | | | | |"]
    return "\n".join(lines)


def table_row(name: str, r: dict) -> str:
    """One table row of a JSON line; HBM per device recomputed with :func:`tpu_plan.hbm_bytes`, so a line
    written before it counted v4's HBM per chip agrees."""
    from jax_inversion.training.tpu_plan import MAX_BATCH_PER_CHIP, hbm_bytes

    name = f"{name}, {r['topology']}" + (f", remat {r['remat']}" if r["remat"] != "none" else "")
    largest = r.get("largest_batch_per_chip")
    shown = lambda b: "-" if b is None else (f">= {b} (the search's cap)" if b >= MAX_BATCH_PER_CHIP else str(b))
    searched = " / ".join(shown(largest.get(k)) for k in ("none", "dots", "full", "blocks")) if largest else "not searched"
    if not r["compiled"]:  # refused for HBM: the search may still have found a smaller batch that fits
        cell = f" {searched} " if largest else " "
        return f"| {name} | {r['chips']} ({r['hosts']}) | no: {r['error'][:160]} | | NO | | |{cell}| |"
    capacity = hbm_bytes(r["topology"], r["chips"])
    kernels = ", ".join(f"{k} {v}" for k, v in sorted(r["attention"].items()))
    return (f"| {name} | {r['chips']} ({r['hosts']}) | yes | {r['bytes_per_chip'] / 2**30:.2f} ({capacity / 2**30:.0f}) | "
            f"{'yes' if r['bytes_per_chip'] <= capacity else 'NO'} | {r['flops_per_step'] / 1e12:.2f} | {kernels} | {searched} | "
            f"{r['compile_seconds'] / 60:.0f} min |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--batch_per_chip", type=int, default=8)
    parser.add_argument("--remat", default="none", help="train.remat of the compiled step: none, dots, full or blocks")
    parser.add_argument("--search", default="", help="remat policies to search the largest batch per chip for")
    parser.add_argument("--table", default="", help="print the markdown table of this JSON-lines file and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return

    from jax_inversion.configs.ti import get_config
    from jax_inversion.models.tiny import write_config_only_model
    from jax_inversion.training.tpu_plan import plan_topology, topology_devices

    logging.basicConfig(format="%(asctime)s %(message)s")  # the search's compiles, one line each, on stderr
    logging.getLogger("jax_inversion.training.tpu_plan").setLevel(logging.INFO)

    root = tempfile.mkdtemp(prefix="tpu_compile_models_")
    for name in args.models.split(","):
        spec = MODELS[name]
        directory = write_config_only_model(os.path.join(root, name), spec["unet"], spec["vae"], spec["text"], SCHEDULER,
                                            spec.get("text_2"))
        for topology in args.topologies.split(","):
            config = get_config()
            config.model = directory
            config.data.initializer_token = "cat"
            config.data.resolution = spec["resolution"]
            config.train.batch_size = args.batch_per_chip * len(topology_devices(topology))
            config.train.remat = args.remat
            start = time.perf_counter()
            row = plan_topology(config, topology, search=tuple(s for s in args.search.split(",") if s))
            row.update(model=name, wall_seconds=round(time.perf_counter() - start, 1),
                       machine=f"compiled on {platform.machine()} CPU ({os.cpu_count()} cores), no TPU")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
