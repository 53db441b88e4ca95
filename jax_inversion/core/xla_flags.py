"""XLA flag presets for the train step, and how to add one to ``XLA_FLAGS`` without overriding the user.

A GPU preset only: no XLA:CPU flag (oneDNN, XNNPACK/YNNPACK fusion modes, fast math, the CPU opt
presets and schedulers, single-threaded Eigen) made the small-config CPU step faster, measured
in one process against the default on jaxlib 0.10.2.

XLA reads ``XLA_FLAGS`` once, when the first backend starts, and aborts on a flag it does not know:
apply a preset before the first JAX computation (before ``jax.devices()``), e.g. first thing in a
command's ``main``::

    from jax_inversion.core import xla_flags
    xla_flags.apply(xla_flags.gpu_flags())

A flag the user already set in ``XLA_FLAGS`` keeps the user's value. Flags of another backend are
parsed and ignored, so a preset is harmless where it does not apply. Every flag here exists in
jaxlib 0.10.2 (tests/test_xla_flags.py starts XLA with them, which fails on an unknown one).
"""
from __future__ import annotations

import os
import re
from typing import Iterable, MutableMapping

# Not yet measured on this project's GPU step (no GPU was lent to the session that wrote this): candidates
# from JAX's GPU performance tips and NVIDIA JAX-Toolbox's image defaults, to A/B with benchmarks/gpu.sh.
# Left at XLA's default: command buffers (CUDA graphs, on by default; `--xla_gpu_enable_command_buffer=`
# turns them off, worth trying only if graph capture misbehaves).
GPU_FLAGS = (
    # Schedules collectives (the data-parallel gradient all-reduce) to overlap compute; default false.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    # cuBLAS for every GEMM instead of Triton GEMM fusions autotuned against it: fewer kernels to
    # autotune at compile time; JAX-Toolbox's default.
    "--xla_gpu_enable_triton_gemm=false",
)


def gpu_flags() -> tuple[str, ...]:
    """The GPU preset (see ``GPU_FLAGS``)."""
    return GPU_FLAGS


def flag_names(flags: str) -> set[str]:
    """The names of the flags set in an ``XLA_FLAGS`` string (``--name=value`` or ``--name``)."""
    return set(re.findall(r"(?:^|\s)--?([A-Za-z0-9_]+)", flags))


def merge(current: str, preset: Iterable[str]) -> str:
    """``current`` (an ``XLA_FLAGS`` value, kept as it is) followed by each flag of ``preset`` it does
    not already set: the user's value wins."""
    taken = flag_names(current)
    added = [flag for flag in preset if not flag_names(flag) & taken]
    return " ".join(part for part in (current.strip(), *added) if part)


def apply(preset: Iterable[str], environ: MutableMapping[str, str] = os.environ) -> str:
    """Merges ``preset`` into ``environ["XLA_FLAGS"]`` (see :func:`merge`) and returns the new value."""
    environ["XLA_FLAGS"] = merge(environ.get("XLA_FLAGS", ""), preset)
    return environ["XLA_FLAGS"]
