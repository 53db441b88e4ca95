"""Whole textual-inversion train step: ours (JAX) vs diffusers' PyTorch example, same weights.

For each configuration one random-weight model is written once (PyTorch ``save_pretrained``
of diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` and transformers ``CLIPTextModel``,
a small CLIP tokenizer, ``model_index.json``); both sides load those same files. Then each
implementation runs in its own subprocess (so peak memory is its own), in ``--impls`` order
(default ``ours,torch_cached,torch``: the like-for-like pair first, so a run cut short still has it):

* ``ours``: ``make_train_step`` (jit, donated state, learned rows fp32, frozen models in
  ``--dtype``, UNet attention by ``--attention_backend``), latents cached as in the real job
  (the batch carries the VAE posterior mean/std; the VAE is not run per step). FLOPs per step
  (``flops_per_step``) are backend-independent: XLA's cost analysis of the *lowered* step
  (before any backend pass) with XLA's attention in place of the fused kernels, counted by
  XLA's CPU cost model wherever the step runs (the CUDA and TPU plugins have no cost analysis
  of a lowered program), so the same count on CPU, GPU and TPU (see
  :func:`backend_independent_flops`; tested against XLA's compiled CPU count in
  tests/test_benchmark_flops.py). The compiled program's own count is ``flops_compiled`` (on
  GPU it misses cuDNN attention and miscounts library calls). MFU is given against the
  datasheet peak (``mfu``, e.g. 989 TFLOP/s bf16 for H100 SXM / H200) and, where measured, the
  bf16 matmul ceiling (``mfu_vs_measured_ceiling``, 790 on the H200). ``attention_kernels``
  counts the UNet's attention calls per kernel (fused kernels fall back to XLA outside their
  shapes). ``--profile_dir``: 3 more steps under ``jax.profiler.trace`` after the timed ones.
* ``torch``: the step of diffusers' ``examples/textual_inversion/textual_inversion.py``:
  token-embedding table trainable (grown by one placeholder row), AdamW over the whole
  table, then the frozen rows copied back; ``vae.encode(pixels).latent_dist.sample() *
  scaling_factor`` every step, DDPM noise, UNet with SDPA (``AttnProcessor2_0``), MSE,
  backward, optimizer step. ``--dtype bfloat16``: UNet and VAE in bf16, text encoder fp32,
  autocast bf16 (the script's mixed precision).
* ``torch_cached``: the same with the posterior (``latent_dist``) computed once and only
  ``latent_dist.sample()`` per step (no VAE per step; same random draws as ``torch``).
* ``torch_compile``: ``torch_cached`` with its forward pass (latents, noise, text encoder,
  UNet, loss) under ``torch.compile`` (``--torch_compile_backend``, default inductor; default
  mode); backward through the compiled graph, the optimizer update eager. ``compile_s`` is its
  first compiled step.

All keep the VAE weights resident. Every line records ``dtype`` (``--dtype auto``:
bfloat16 on GPU/TPU, float32 on CPU) and ``attention_backend``; the last line per
configuration has the ratios ``ours_vs_torch``, the like-for-like ``ours_vs_torch_cached`` and
``ours_vs_torch_compile`` (None for an implementation not run or failed). Timing: warm-up
steps, then ``--steps`` steps, each synchronised (``step_ms_median``; ``steps_per_s`` = steps /
their total time). Warm-up: ``--warmup`` steps (default 3; 1 for SD1.5 on CPU); the torch
variants' first warm-up step counts their FLOPs (``torch.utils.flop_counter``, math SDPA so
attention is counted: matmuls/convolutions/attention only, XLA's count also elementwise ops)
and at least 2 steps with the default SDPA kernels follow it (``warmup`` records them all).
Peak memory: on CPU the process's peak RSS from just before the first step to the end
(``/proc/self/clear_refs`` resets the high-water mark after loading and, for ours,
compiling; ``max_rss_mb`` is the whole process); on GPU ``torch.cuda.max_memory_allocated``
/ JAX ``peak_bytes_in_use``. MB = 2**20 bytes. ``load_avg_1m`` (after the timed steps) shows
whether other work shared the machine. ``--budget S``: the whole run (model writing and every
subprocess) ends within S seconds; an implementation without time left gets an ``error`` line,
and the ratios line always comes out.

    python -m benchmarks.train_step [--configs small,sd15_256_b1] [--dtype auto] [--attention_backend auto] [--steps N]
    python -m benchmarks.train_step --configs sd15_512_b8 --dtype bfloat16 \\
        --impls ours,torch_cached,torch,torch_compile                        # on a GPU (benchmarks/gpu.sh)
    python -m benchmarks.train_step --configs sd15_512_b8 --flops_only         # the FLOP count alone, any machine

Configurations: ``small`` (jax_inversion.models.tiny's architecture, 64 px, batch 8), ``sd15_R_bB``
(SD1.5 architecture, R px, batch B), ``small_R_bB``. Output: one JSON line per configuration
and implementation, then one per configuration with the steps/s ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from jax_inversion.core.aot import cost_flops
from jax_inversion.models.tiny import TINY_SCHEDULER, TINY_UNET, TINY_VAE, tiny_text_config

# SD1.5 (runwayml/stable-diffusion-v1-5) architecture.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {  # CLIP ViT-L/14 text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}
# jax_inversion.models.tiny's architecture; the text vocabulary is the tokenizer's (vocab_size None).
SMALL_UNET = {k: v for k, v in TINY_UNET.items() if k != "_class_name"}
SMALL_VAE = {k: v for k, v in TINY_VAE.items() if k != "_class_name"}
SMALL_TEXT = {**{k: v for k, v in tiny_text_config(0, 0, 0).items() if k in SD15_TEXT}, "vocab_size": None}
ARCHITECTURES = {"sd15": (SD15_UNET, SD15_VAE, SD15_TEXT), "small": (SMALL_UNET, SMALL_VAE, SMALL_TEXT)}
DEFAULT_SHAPE = {"sd15": (512, 1), "small": (64, 8)}
SCHEDULER = {k: v for k, v in TINY_SCHEDULER.items() if k != "_class_name"}  # SD1.5's DDPM schedule, as the tiny models'
PROMPT = "a photo of a"  # then the placeholder, EOS, EOS padding
INITIALIZER = "cat"
# bf16 peak TFLOP/s by device kind (first substring match; more specific first): the dense
# datasheet figure and, where measured, the bf16 matmul ceiling reached in practice.
PEAK_TFLOPS = (  # (kind, datasheet, measured ceiling or None)
    ("H100 PCIe", 756.0, None),
    ("H100", 989.0, None),
    ("GH200", 989.0, None),
    ("H200", 989.0, 790.0),  # measured bf16 matmul ceiling of the project's H200 (shared/device/README.md)
    ("A100", 312.0, None),
    ("L4", 121.0, None),
    ("TPU v4", 275.0, None),
    ("TPU v5 lite", 197.0, None),
    ("TPU v5e", 197.0, None),
    ("TPU v5p", 459.0, None),
    ("TPU v5", 459.0, None),
    ("TPU v6 lite", 918.0, None),
    ("TPU v6e", 918.0, None),
)
FLOPS_SOURCE = ("XLA's CPU cost analysis of the lowered step (before backend passes), attention counted as XLA's "
                "(backend-independent)")
MB = 2**20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the subprocesses' cwd
PROFILED_STEPS = 3  # ours under jax.profiler.trace with --profile_dir, after the timed steps
IMPLS = ("ours", "torch_cached", "torch", "torch_compile")  # see the module docstring
MIN_TORCH_FLASH_WARMUP = 2  # warm-up steps with torch's default SDPA kernels after its FLOP-counting step


# ----------------------------------------------------------------------------- helpers


def parse_config(name: str) -> dict:
    match = re.fullmatch(r"(small|sd15)(?:_(\d+)_b(\d+))?", name)
    if not match:
        raise SystemExit(f"unknown configuration {name!r}: use small, sd15_256_b1, sd15_512_b8, sd15_R_bB or small_R_bB")
    arch = match.group(1)
    resolution, batch = (int(match.group(2)), int(match.group(3))) if match.group(2) else DEFAULT_SHAPE[arch]
    return {"config": name, "arch": arch, "resolution": resolution, "batch": batch}


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def reset_peak_rss() -> bool:
    """Resets this process's RSS high-water mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return None


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # KiB on Linux


def peaks_for(kind: str, override: float | None, on_cpu: bool) -> tuple[float | None, float | None]:
    """(datasheet, measured ceiling) peak TFLOP/s of ``kind``; ``override`` replaces the datasheet
    figure; none on CPU unless overridden."""
    if override:
        return override, None
    if on_cpu:
        return None, None
    for key, datasheet, measured in PEAK_TFLOPS:
        if key.lower() in kind.lower():
            return datasheet, measured
    return None, None


def prompt_ids(tokenizer, placeholder_id: int, length: int, batch: int) -> np.ndarray:
    ids = tokenizer(PROMPT).input_ids[:-1] + [placeholder_id, tokenizer.eos_token_id]
    out = np.full((batch, length), tokenizer.eos_token_id, np.int64)
    out[:, : len(ids)] = ids
    return out


def timing(times: list[float]) -> dict:
    return {"steps_per_s": round(len(times) / sum(times), 4), "step_ms_median": round(1000 * statistics.median(times), 2)}


def flops_fields(flops: float | None, steps_per_s: float, peaks: tuple[float | None, float | None]) -> dict:
    """Achieved TFLOP/s and MFU against the datasheet peak (``mfu``) and the measured ceiling. The
    peaks are always recorded, so a count obtained later can be turned into MFU (see :func:`main`)."""
    datasheet, measured = peaks
    out = {"flops_per_step": None, "tflops_achieved": None, "mfu": None, "mfu_vs_measured_ceiling": None,
           "peak_tflops": datasheet, "measured_ceiling_tflops": measured}
    if flops:
        achieved = flops * steps_per_s / 1e12
        out.update(flops_per_step=float(flops), tflops_achieved=round(achieved, 4),
                   mfu=round(achieved / datasheet, 4) if datasheet else None,
                   mfu_vs_measured_ceiling=round(achieved / measured, 4) if measured else None)
    return out


def attention_kernels(model, resolution: int, text_len: int = 77) -> dict:
    """How many of the UNet's attention calls run each kernel at ``resolution`` (``{"self": {kernel: n},
    "cross": {...}}``), as :func:`jax_inversion.models.layers.attention_backend_for` picks them."""
    import collections

    import jax.numpy as jnp

    from jax_inversion.text.conditioning import vae_factor
    from jax_inversion.models.layers import attention_backend_for
    from jax_inversion.models.unet import cross_attention_layers

    unet = model.unet
    cfg = unet.config
    dtype = jnp.float32 if cfg.upcast_attention else unet.dtype
    n = len(cfg.block_out_channels)
    counts = {"self": collections.Counter(), "cross": collections.Counter()}
    for name, side in cross_attention_layers(cfg, resolution // vae_factor(model)).items():
        part, index = name.split(".")[:2]
        block = n - 1 if part == "mid_block" else int(index) if part == "down_blocks" else n - 1 - int(index)
        head_dim = cfg.block_out_channels[block] // cfg.num_attention_heads[block]
        for kind, keys in (("self", side * side), ("cross", text_len)):
            counts[kind][attention_backend_for(unet.attention_backend, dtype, side * side, keys, head_dim)] += 1
    return {kind: dict(c) for kind, c in counts.items()}


# ----------------------------------------------------------------------------- the model files


def write_model(arch: str, directory: str) -> None:
    """Random weights of ``arch`` in diffusers format (PyTorch ``save_pretrained``)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from jax_inversion.models.tiny import write_model_index
    from jax_inversion.models.tokenizer_files import write_clip_tokenizer

    unet_config, vae_config, text_config = ARCHITECTURES[arch]
    os.makedirs(directory, exist_ok=True)
    write_clip_tokenizer(os.path.join(directory, "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
    torch.manual_seed(0)
    text = dict(text_config, vocab_size=text_config["vocab_size"] or len(tokenizer))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id}
    CLIPTextModel(CLIPTextConfig(**text, **ids)).save_pretrained(os.path.join(directory, "text_encoder"))
    UNet2DConditionModel(**unet_config).save_pretrained(os.path.join(directory, "unet"))
    AutoencoderKL(**vae_config).save_pretrained(os.path.join(directory, "vae"))
    DDPMScheduler(**SCHEDULER).save_pretrained(os.path.join(directory, "scheduler"))
    write_model_index(directory)


# ----------------------------------------------------------------------------- ours


def build_our_step(model, batch_size: int, resolution: int, devices=None) -> dict:
    """Our compiled TI step for ``model`` (one placeholder, diffusion loss, latents cached as the
    real job caches them), its initial state, a random batch and the base key, on ``devices``
    (default: every local device)."""
    import jax
    import jax.numpy as jnp

    from jax_inversion.text import tokens as tokens_lib
    from jax_inversion.configs.ti import get_config, resolve_unset
    from jax_inversion.objectives.terms import Objective
    from jax_inversion.diffusion.schedule import NoiseSchedule
    from jax_inversion.text.conditioning import input_embedding_table, vae_factor
    from jax_inversion.training.optim import make_optimizer
    from jax_inversion.core.sharding import batch_sharded, make_mesh, replicated
    from jax_inversion.training.step import StepConfig, init_state, make_train_step

    tokenizer = model.tokenizer
    table = input_embedding_table(model, "text_encoder")
    layout = tokens_lib.PlaceholderIds(("<concept>",), table.shape[0])  # the placeholder is the row after the table
    latent = resolution // vae_factor(model)
    channels = model.vae.config.latent_channels
    optimizer, lr = make_optimizer(resolve_unset(get_config()).train, batch_size)
    mesh = make_mesh(devices)
    step = make_train_step(model, NoiseSchedule.from_config(model.scheduler_config), {"text_encoder": layout}, optimizer,
                           Objective({"diffusion": 1.0}), lr, mesh, StepConfig(resolution=resolution))
    init = table[tokens_lib.initializer_id(tokenizer, INITIALIZER)][None]
    embeddings = {"text_encoder": jnp.asarray(init, jnp.float32)}
    rng = np.random.default_rng(0)
    ids = prompt_ids(tokenizer, layout.first_id, model.text_encoder.config.max_position_embeddings, batch_size)
    batch = jax.device_put({
        "latent_mean": rng.standard_normal((batch_size, latent, latent, channels)).astype(np.float32),
        "latent_std": np.full((batch_size, latent, latent, channels), 0.05, np.float32),
        "input_ids": {"text_encoder": ids.astype(np.int32)},
    }, batch_sharded(mesh))
    return {"step": step, "state": jax.device_put(init_state(embeddings, optimizer, 0), replicated(mesh)), "batch": batch,
            "rng": jax.device_put(jax.random.PRNGKey(0), replicated(mesh)), "mesh": mesh}


def lowered_flops(built: dict) -> float | None:
    """FLOPs of one step from XLA's cost analysis of the *lowered* program, before any backend pass:
    every dot, convolution and elementwise op as written, not what a backend fused, rewrote into
    library calls or left uncounted (cuDNN attention custom calls count zero). The whole step,
    all devices together (a compiled program's count is per device). None where the backend has no
    lowered cost analysis: the CUDA and TPU plugins (PJRT C API) have none, only the CPU backend
    does; :func:`backend_independent_flops` therefore lowers for the CPU."""
    import jax

    with jax.set_mesh(built["mesh"]):
        step = built["step"]
        return cost_flops(step.jitted.lower(step.frozen, built["state"], built["batch"], built["rng"]).cost_analysis())


def backend_independent_flops(model, batch_size: int, resolution: int, devices=None) -> float | None:
    """:func:`lowered_flops` of the same step with XLA's attention (the same math as cuDNN's or
    Pallas' kernels, but countable), so the count is the same on every backend and MFU is comparable.

    ``devices`` default: where the default backend is not the CPU (GPU, TPU), one CPU device:
    the whole step lowered for it (the frozen weights copied to host memory for the while) and
    counted by XLA's CPU cost model, the only backend whose lowered programs have a cost
    analysis. None if this process has no CPU backend (``JAX_PLATFORMS`` without ``cpu``);
    the driver then counts in a CPU-only subprocess (:func:`main`)."""
    import dataclasses

    import jax

    if devices is None and jax.default_backend() != "cpu":
        try:
            devices = jax.devices("cpu")[:1]
        except RuntimeError:  # the CPU backend was not initialised (JAX_PLATFORMS=cuda)
            print("train_step: no CPU backend in this process to count FLOPs on", file=sys.stderr, flush=True)
            return None
    counted = dataclasses.replace(model, unet=model.unet.clone(attention_backend="xla"))
    return lowered_flops(build_our_step(counted, batch_size, resolution, devices))


def run_ours(args, cfg: dict) -> dict:
    import jax

    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.core.platform import resolve_dtype

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    steps, warmup = step_counts(args, cfg["arch"], on_cpu)
    dtype = resolve_dtype(args.dtype)
    start = time.perf_counter()
    model = load_pretrained(args.model_dir, dtype=dtype, attention_backend=args.attention_backend)
    load_s = time.perf_counter() - start
    batch_size, resolution = cfg["batch"], cfg["resolution"]
    start = time.perf_counter()
    flops = backend_independent_flops(model, batch_size, resolution)
    flops_count_s = time.perf_counter() - start
    if args.flops_only:
        return {"flops_per_step": flops, "flops_source": FLOPS_SOURCE, "dtype": dtype.name, "jax": jax.__version__,
                "device": device.device_kind if not on_cpu else "cpu"}
    built = build_our_step(model, batch_size, resolution)
    step, state, batch, base, mesh = (built[k] for k in ("step", "state", "batch", "rng", "mesh"))
    jitted, frozen = step.jitted, step.frozen

    with jax.set_mesh(mesh):
        start = time.perf_counter()
        compiled = jitted.lower(frozen, state, batch, base).compile()  # ahead of time, once
        try:
            compiled_flops = cost_flops(compiled.cost_analysis())
        except Exception as e:  # informative only: a plugin without it must not cost the row
            print(f"train_step: no compiled cost analysis ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            compiled_flops = None
        run = lambda s: compiled(frozen, s, batch, base)
        compile_s = time.perf_counter() - start
        rss_before = peak_rss_mb() if reset_peak_rss() else None
        for _ in range(warmup):
            state, metrics = run(state)
        jax.block_until_ready(state)
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            state, metrics = run(state)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - begin)
        profile = {}
        if args.profile_dir:  # after the timed steps, so the tracer's overhead is not in them
            profile = {"profile_dir": args.profile_dir, "profiled_steps": PROFILED_STEPS}
            try:
                with jax.profiler.trace(args.profile_dir):
                    for _ in range(PROFILED_STEPS):
                        state, metrics = run(state)
                    jax.block_until_ready(state)
            except Exception as e:  # a profiler that cannot start (e.g. no CUPTI) must not cost the row
                profile["profile_error"] = f"{type(e).__name__}: {e}"[:300]
    out = {"steps": steps, "warmup": warmup, **timing(times), "compile_s": round(compile_s, 2), "load_s": round(load_s, 2),
           "flops_count_s": round(flops_count_s, 2), **profile}
    if on_cpu:
        out.update(device=f"cpu ({cpu_count()} cores)", peak_memory_mb=round(peak_rss_mb(), 1), peak_memory_kind="process peak RSS during steps",
                   rss_before_steps_mb=rss_before and round(rss_before, 1), max_rss_mb=round(max_rss_mb(), 1))
    else:
        stats = device.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        out.update(device=device.device_kind, peak_memory_mb=peak and round(peak / MB, 1), peak_memory_kind="device peak_bytes_in_use (whole process)")
    kind = "cpu" if on_cpu else device.device_kind
    per_device = tuple(peak and peak * jax.device_count() for peak in peaks_for(kind, args.peak_tflops, on_cpu))
    out.update(flops_fields(flops, out["steps_per_s"], per_device), devices=jax.device_count())
    out.update(flops_source=FLOPS_SOURCE, flops_compiled=compiled_flops and float(compiled_flops),
               flops_compiled_source="XLA cost_analysis of the compiled step, per device (backend-dependent: library "
                                     "calls miscounted, cuDNN attention not counted)",
               dtype=dtype.name, attention_backend=args.attention_backend, attention_kernels=attention_kernels(model, resolution),
               final_loss=float(metrics["loss"]), nonfinite_steps=int(state.nonfinite_steps), jax=jax.__version__)
    return out


def step_counts(args, arch: str, on_cpu: bool) -> tuple[int, int]:
    """(timed steps, warm-up steps): ``--steps`` / ``--warmup`` or the defaults (fewer for SD1.5 on CPU)."""
    steps = args.steps if args.steps is not None else (5 if arch == "sd15" and on_cpu else 20)
    warmup = args.warmup if args.warmup is not None else (1 if arch == "sd15" and on_cpu else 3)
    return steps, max(warmup, 1)


# ----------------------------------------------------------------------------- diffusers' PyTorch step


def run_torch(args, cfg: dict, impl: str) -> dict:
    """``impl``: ``torch`` (VAE encode every step), ``torch_cached`` (posterior computed once) or
    ``torch_compile`` (``torch_cached`` with its forward pass under ``torch.compile``)."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextModel, CLIPTokenizer

    threads = cpu_count()
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = device.type == "cpu"
    steps, warmup = step_counts(args, cfg["arch"], on_cpu)
    from jax_inversion.core.platform import resolve_dtype

    dtype_name = resolve_dtype(args.dtype, "cpu" if on_cpu else "gpu").name
    weight_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    torch.manual_seed(0)

    start = time.perf_counter()
    d = args.model_dir
    tokenizer = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(d, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(d, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(d, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet")
    load_s = time.perf_counter() - start

    # As textual_inversion.py: add the placeholder, grow the table, start it from the initializer's row.
    placeholder_id = text_encoder.config.vocab_size
    init_id = tokenizer.encode(INITIALIZER, add_special_tokens=False)[0]
    text_encoder.resize_token_embeddings(placeholder_id + 1, mean_resizing=False)
    token_embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        token_embeds[placeholder_id] = token_embeds[init_id].clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 dropped the .text_model level
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    cached, compiled = impl in ("torch_cached", "torch_compile"), impl == "torch_compile"
    train_config = __import__("jax_inversion.configs.ti", fromlist=["get_config"]).get_config().train
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=train_config.learning_rate,
                                  betas=(train_config.adam_b1, train_config.adam_b2), weight_decay=train_config.weight_decay,
                                  eps=train_config.adam_eps)
    text_encoder.to(device)
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    text_encoder.train()
    orig_embeds_params = text_encoder.get_input_embeddings().weight.data.clone()
    index_no_updates = torch.ones((placeholder_id + 1,), dtype=torch.bool, device=device)
    index_no_updates[placeholder_id] = False

    batch_size, resolution = cfg["batch"], cfg["resolution"]
    input_ids = torch.from_numpy(prompt_ids(tokenizer, placeholder_id, text_encoder.config.max_position_embeddings, batch_size)).to(device)
    pixels = (torch.rand(batch_size, 3, resolution, resolution) * 2 - 1).to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=weight_dtype)) if weight_dtype != torch.float32 else contextlib.nullcontext
    if cached:
        with torch.no_grad(), autocast():
            cached_dist = vae.encode(pixels.to(weight_dtype)).latent_dist  # the posterior, computed once
    scaling = vae.config.scaling_factor
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward_loss():
        with autocast():
            if cached:
                latents = cached_dist.sample() * scaling  # same draws (and memory layout) as `torch`
            else:
                latents = vae.encode(pixels.to(dtype=weight_dtype)).latent_dist.sample().detach() * scaling
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), device=device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids)[0].to(dtype=weight_dtype)
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
            return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")

    def train_step(loss_fn):
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # only the placeholder row may change
            text_encoder.get_input_embeddings().weight[index_no_updates] = orig_embeds_params[index_no_updates]
        return loss.detach()

    if on_cpu:
        rss_before = peak_rss_mb() if reset_peak_rss() else None
    else:
        torch.cuda.reset_peak_memory_stats()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        train_step(forward_loss)  # first warm-up step, eager; math SDPA so the counter sees the attention matmuls
    flops = counter.get_total_flops()
    loss_fn = torch.compile(forward_loss, backend=args.torch_compile_backend) if compiled else forward_loss
    flash_warmup = max(warmup - 1, MIN_TORCH_FLASH_WARMUP)  # the default SDPA kernels get their own warm-up
    compile_s = None
    for i in range(flash_warmup):
        begin = time.perf_counter()
        train_step(loss_fn)
        if i == 0 and compiled:
            sync()
            compile_s = time.perf_counter() - begin  # the first compiled step: Dynamo, AOTAutograd, the backend
    sync()
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        loss = train_step(loss_fn)
        sync()
        times.append(time.perf_counter() - begin)
    out = {"steps": steps, "warmup": 1 + flash_warmup, **timing(times), "load_s": round(load_s, 2)}
    if compiled:
        out.update(compile_s=round(compile_s, 2), torch_compile=f"torch.compile(forward pass), backend {args.torch_compile_backend}, default mode")
    if on_cpu:
        out.update(device=f"cpu ({threads} cores)", peak_memory_mb=round(peak_rss_mb(), 1), peak_memory_kind="process peak RSS during steps",
                   rss_before_steps_mb=rss_before and round(rss_before, 1), max_rss_mb=round(max_rss_mb(), 1))
        kind = "cpu"
    else:
        kind = torch.cuda.get_device_name()
        out.update(device=kind, peak_memory_mb=round(torch.cuda.max_memory_allocated() / MB, 1), peak_memory_kind="torch.cuda.max_memory_allocated")
    out.update(flops_fields(flops, out["steps_per_s"], peaks_for(kind, args.peak_tflops, on_cpu)))
    processor = type(next(iter(unet.attn_processors.values()))).__name__
    out.update(flops_source="torch.utils.flop_counter on the first, eager warm-up step (matmul/conv/attention)", final_loss=float(loss), dtype=dtype_name,
               attention_backend=f"{processor} (torch SDPA, its default kernel choice)", torch=torch.__version__,
               diffusers=__import__("diffusers").__version__)
    return out


# ----------------------------------------------------------------------------- driver


def child(args) -> None:
    cfg = parse_config(args.config)
    if args.only == "ours":
        result = run_ours(args, cfg)
    else:
        result = run_torch(args, cfg, args.only)
    head = {"config": cfg["config"], "impl": args.only, "device": result.pop("device"), "dtype": result.pop("dtype"),
            "attention_backend": result.pop("attention_backend", args.attention_backend), "resolution": cfg["resolution"],
            "batch": cfg["batch"]}
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews the timings
    print("RESULT " + json.dumps({**head, **result}), flush=True)


def run_child(command: list[str], env: dict, timeout: float) -> tuple[dict | None, str | None]:
    """Runs one ``--only`` subprocess: (its RESULT line, None) or (None, why there is none)."""
    if timeout < 10:
        return None, "skipped: no time left in --budget"
    try:
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {round(timeout)} s"
    lines = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return (json.loads(lines[-1]), None) if lines else (None, f"exit status {proc.returncode}, no result (see stderr)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="small,sd15_256_b1", help="comma-separated: small, sd15_256_b1, sd15_512_b8, sd15_R_bB, small_R_bB")
    parser.add_argument("--impls", default="ours,torch_cached,torch", help=f"comma-separated, run in this order: {', '.join(IMPLS)}")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="frozen models' dtype (both sides); auto: bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--attention_backend", default="auto", choices=("auto", "xla", "chunked", "cudnn", "pallas"),
                        help="our UNet's attention kernel (see jax_inversion.core.platform)")
    parser.add_argument("--flops_only", action="store_true",
                        help="ours only: print the backend-independent FLOP count per step, do not compile or run")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 for SD1.5 on CPU, else 20)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 1 for SD1.5 on CPU, else 3); torch: at least 1 + 2")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: a table by device kind; none on CPU)")
    parser.add_argument("--model_dir", default=None, help="reuse (or keep) the written model here; one configuration only")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: each subprocess gets at most what is left of it")
    parser.add_argument("--torch_compile_backend", default="inductor",
                        help="torch_compile's backend (aot_eager: Dynamo and AOTAutograd without inductor's code generation, "
                             "a quick check on a CPU)")
    parser.add_argument("--profile_dir", default=None, help=f"ours: {PROFILED_STEPS} steps under jax.profiler.trace, written here")
    parser.add_argument("--only", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--write_model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_model:
        write_model(args.write_model, args.model_dir)
        return
    if args.only:
        child(args)
        return

    deadline = time.monotonic() + (args.budget or float("inf"))
    time_left = lambda: min(args.timeout, deadline - time.monotonic() - 5)  # 5 s to print the last lines
    configs = [parse_config(c) for c in args.configs.split(",") if c]
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown --impls {sorted(unknown)}: use {', '.join(IMPLS)}")
    if args.model_dir and len({c["arch"] for c in configs}) > 1:
        raise SystemExit("--model_dir holds one architecture: give configurations of one architecture")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    base = [sys.executable, "-m", "benchmarks.train_step", "--dtype", args.dtype, "--attention_backend", args.attention_backend]
    if args.flops_only:
        impls = ["ours"]
    requested = {"dtype": args.dtype, "attention_backend": args.attention_backend}
    for name in ("steps", "warmup", "peak_tflops", "torch_compile_backend"):
        if getattr(args, name) is not None:
            base += [f"--{name}", str(getattr(args, name))]
    scratch = tempfile.mkdtemp(prefix="train_step_bench_")
    written = {}
    try:
        for cfg in configs:
            model_dir = args.model_dir or written.get(cfg["arch"])
            if model_dir is None or not os.path.exists(os.path.join(model_dir, "model_index.json")):
                model_dir = model_dir or os.path.join(scratch, cfg["arch"])
                print(f"train_step: writing random {cfg['arch']} weights to {model_dir}", file=sys.stderr, flush=True)
                try:
                    subprocess.run(base + ["--write_model", cfg["arch"], "--model_dir", model_dir], check=True, cwd=ROOT, env=env,
                                   timeout=max(time_left(), 1))
                except subprocess.SubprocessError as e:
                    print(json.dumps({"config": cfg["config"], **requested, "error": f"writing the model: {e}"}), flush=True)
                    continue
            written[cfg["arch"]] = model_dir
            results = {}
            for impl in impls:
                print(f"train_step: {cfg['config']} {impl}", file=sys.stderr, flush=True)
                command = base + ["--only", impl, "--config", cfg["config"], "--model_dir", model_dir]
                if impl == "ours" and args.flops_only:
                    command.append("--flops_only")
                elif impl == "ours" and args.profile_dir:
                    command += ["--profile_dir", args.profile_dir]
                result, error = run_child(command, env, time_left())
                if result is None:
                    result = {"config": cfg["config"], "impl": impl, **requested, "error": error}
                elif impl == "ours" and not args.flops_only and result.get("flops_per_step") is None:
                    # No CPU backend in that process (JAX_PLATFORMS without cpu): count in a CPU-only one.
                    print(f"train_step: {cfg['config']} counting FLOPs in a CPU-only process", file=sys.stderr, flush=True)
                    counted, error = run_child(base + ["--only", "ours", "--config", cfg["config"], "--model_dir", model_dir,
                                                       "--flops_only"], dict(env, JAX_PLATFORMS="cpu"), time_left())
                    if counted and counted.get("flops_per_step"):
                        peaks = (result.get("peak_tflops"), result.get("measured_ceiling_tflops"))
                        result.update(flops_fields(counted["flops_per_step"], result["steps_per_s"], peaks),
                                      flops_source=FLOPS_SOURCE + ", counted in a CPU-only process")
                    else:
                        result["flops_error"] = error or "the CPU-only count gave none"
                results[impl] = result
                print(json.dumps(result), flush=True)
            rate = {impl: r.get("steps_per_s") for impl, r in results.items()}
            ratio = lambda other: round(rate["ours"] / rate[other], 3) if rate.get("ours") and rate.get(other) else None
            ours = results.get("ours", {})
            print(json.dumps({"config": cfg["config"], "dtype": ours.get("dtype", args.dtype),
                              "attention_backend": ours.get("attention_backend", args.attention_backend),
                              "ours_vs_torch_cached": ratio("torch_cached"), "ours_vs_torch": ratio("torch"),
                              "ours_vs_torch_compile": ratio("torch_compile"),
                              "note": "torch encodes with the VAE every step; torch_cached is the like-for-like step, "
                                      "torch_compile the same under torch.compile"}),
                  flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
