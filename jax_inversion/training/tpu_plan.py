"""Compile a job's real train step for a TPU topology on a machine without a TPU, and say whether it fits.

``plan_topology(config, "v5e:2x4")`` builds the job as ``train`` would (:func:`train.setup_run`) from
a shapes-only model (configs and tokenizers; no weight file need exist), lowers every phase's step
with ``jax.ShapeDtypeStruct`` arguments sharded over the topology's chips, compiles it with libtpu
(``pip install 'jax[tpu]'``; ``JAX_PLATFORMS=cpu`` keeps it from looking for a chip), and reports
per chip: bytes against the chip's HBM, the compiler's FLOPs, the kernel each attention layer got,
and the largest batch per chip that fits with each ``train.remat`` policy.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_inversion.core.aot import GIB, CompileReport, compile_ahead
from jax_inversion.core.errors import ConfigError
from jax_inversion.core.platform import compiling_for
from jax_inversion.models.layers import record_attention_kernels
from jax_inversion.text.conditioning import REMAT_POLICIES, encoders_of, vae_factor
from jax_inversion.training.train import RunSetup, setup_run

# HBM per chip (GiB) by TPU generation, the first part of a topology name ("v5e:2x4"); see hbm_bytes for per device.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
MAX_BATCH_PER_CHIP = 64  # the search for the largest batch stops here


class TopologyError(ConfigError):
    """A topology name libtpu does not know, or libtpu missing; the message names the fix."""


def topology_devices(name: str) -> list:
    """The compile-only devices of TPU topology ``name`` (e.g. ``v5e:2x4``, ``v4:2x2x1``, ``v5e:4x4``)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # parallel test workers each load libtpu
    generation = name.split(":")[0]
    if generation not in HBM_GIB:
        raise TopologyError(f"unknown TPU generation {generation!r} in --topology {name}: use one of "
                            f"{', '.join(HBM_GIB)} (e.g. v5e:2x4)")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = ("install libtpu: pip install 'jax[tpu]'" if "tpu" in first.lower() and "plugin" in first.lower()
                else "check the topology name (v4:2x2x1, v5e:2x4, v5p:2x2x1, v6e:2x4, v5e:4x4)")
        raise TopologyError(f"cannot describe TPU topology {name!r} ({type(e).__name__}: {first}): {hint}") from None


def hbm_bytes(name: str, devices: int) -> int:
    """HBM per device of topology ``name`` with ``devices`` devices: the chip's HBM shared by the devices on
    it (``v4:2x2x1`` is 4 chips and 8 devices, one per TensorCore: 16 GiB each; v5e, v5p, v6e: one per chip)."""
    generation, _, shape = name.partition(":")
    chips = math.prod(int(side) for side in shape.split("x"))
    return HBM_GIB[generation] * GIB * chips // devices


def abstract_batch(run: RunSetup, batch_size: int, resolution: int) -> dict:
    """The train step's batch as ``ShapeDtypeStruct`` s sharded over ``data`` (what ``dataset.global_batch`` gives)."""
    sharding = NamedSharding(run.mesh, P("data"))
    side = resolution // vae_factor(run.model)
    channels = run.model.unet.config.in_channels
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    batch = {
        "latent_mean": spec((batch_size, side, side, channels), jnp.float32),
        "latent_std": spec((batch_size, side, side, channels), jnp.float32),
        "input_ids": {name: spec((batch_size, tok.model_max_length), jnp.int32)
                      for name, (_, tok) in encoders_of(run.model).items()},
    }
    if run.with_masks:
        batch["masks"] = spec((batch_size, side, side), jnp.float32)
    return batch


@dataclasses.dataclass
class PhaseCompile:
    """One phase's step compiled for the topology: the report and ``{kernel: attention layers}``."""

    phase: str
    report: Optional[CompileReport]
    attention: dict
    error: str = ""
    tpu_kernel_calls: int = 0  # Mosaic custom calls in the compiled program (the TPU kernel's fwd and bwd)


def compile_phases(run: RunSetup, batch_size: int) -> list[PhaseCompile]:
    """Every phase of ``run`` with steps, compiled at the global ``batch_size``."""
    results = []
    per_step = batch_size * (len(run.concepts) if run.concepts else 1)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(run.mesh, P()))
    for phase in [p for p in run.plan.phases if p.num_steps > 0] or run.plan.phases[:1]:
        with record_attention_kernels() as kernels:
            try:
                step = run.make_step(phase, run.resolution)  # outside the mesh: its constants stay on this host
                batch = abstract_batch(run, per_step, run.resolution)
                with jax.set_mesh(run.mesh):  # the TPU kernel's shard_map reads the mesh while tracing
                    compiled, report = compile_ahead(step.jitted, step.frozen, run.state, batch, rng)
                error, kernel_calls = "", compiled.as_text().count("tpu_custom_call")
            except Exception as e:  # the compiler's own message, in one line
                report, error, kernel_calls = None, f"{type(e).__name__}: {' '.join(str(e).split())[:400]}", 0
        results.append(PhaseCompile(phase.name, report, dict(collections.Counter(kernels.values())), error, kernel_calls))
    return results


def _with(config: ml_collections.ConfigDict, **train) -> ml_collections.ConfigDict:
    changed = ml_collections.ConfigDict(config.to_dict())
    for key, value in train.items():
        changed.train[key] = value
    return changed


def _peak(config, devices, batch_size: int) -> Optional[int]:
    """The largest phase's peak bytes per chip at global ``batch_size``, or None if it does not compile."""
    run = setup_run(_with(config, batch_size=batch_size), devices, shapes_only=True)
    phases = compile_phases(run, batch_size)
    if any(p.report is None for p in phases):
        return None
    return max(p.report.peak_bytes for p in phases)


class BatchSearch(NamedTuple):
    """A largest-batch search's answer and what it compiled: ``{batch per chip: peak bytes, None if not compiled}``."""

    largest: int
    peaks: dict


def largest_batch_per_chip(config, devices, capacity: int, remat: str, known: Optional[dict] = None) -> BatchSearch:
    """The largest batch per chip whose step fits ``capacity`` bytes with ``train.remat=remat`` (0: not even 1).

    Once two compiles have given their peaks, the next batch tried is where the line through the two
    nearest the last fit meets ``capacity`` (then the batch above it): three compiles where peaks grow
    linearly. Before two peaks are known it doubles; where the line predicts a fit at a batch already known
    not to fit, it bisects. On TPU the line does overshoot: the compiler rematerializes as a step nears the
    chip's HBM, so peaks flatten (SD1.5 on v5e: 7.7, 12.9, 14.7, 15.0 GiB at 8, 16, 20, 33 per chip).
    Only compiled batches decide: the answer is a batch whose step compiled within ``capacity`` and whose
    next batch did not, or ``MAX_BATCH_PER_CHIP``. ``known`` maps batch-per-chip -> peak bytes (None: did
    not compile) already compiled with this policy, such as the report's own batch; every batch below a
    fit is taken to fit, since memory grows with the batch. The answer comes with every peak known, ``known``'s
    included.
    """
    n = len(devices)
    config = _with(config, remat=remat, gradient_accumulation=1)
    peaks = dict(known or {})

    def fits(per_chip: int) -> bool:
        if per_chip not in peaks:
            peaks[per_chip] = _peak(config, devices, per_chip * n)
            logging.getLogger(__name__).info("remat %s, %d per chip: peak %s of %.2f GiB", remat, per_chip,
                                             "not compiled" if peaks[per_chip] is None else f"{peaks[per_chip] / GIB:.2f} GiB",
                                             capacity / GIB)
        return peaks[per_chip] is not None and peaks[per_chip] <= capacity

    def predicted_last_fit(low: int) -> Optional[int]:
        """Where the line through the two measured batches nearest ``low`` crosses ``capacity``."""
        measured = sorted((b for b, p in peaks.items() if p is not None), key=lambda b: (abs(b - low), b))[:2]
        if len(measured) < 2:
            return None
        (b1, p1), (b2, p2) = sorted((b, peaks[b]) for b in measured)
        slope = (p2 - p1) / (b2 - b1)
        if slope <= 0:
            return None
        return b1 + math.floor((capacity - p1) / slope)

    known_fits = [b for b in peaks if fits(b)]
    known_misses = [b for b in peaks if b not in known_fits]
    low = min(max(known_fits, default=1), MAX_BATCH_PER_CHIP)
    if not fits(low):
        return BatchSearch(0, peaks)
    high = min((b for b in known_misses if b > low), default=None)  # the smallest batch known not to fit
    while low < MAX_BATCH_PER_CHIP and (high is None or high - low > 1):
        guess = predicted_last_fit(low)
        if guess is not None and high is not None and guess >= high:
            guess = None  # the line says a batch that did not fit fits: the peak bends (the compiler remats), bisect
        if guess is None:
            guess = low * 2 if high is None else (low + high) // 2
        guess = max(low + 1, min(guess, MAX_BATCH_PER_CHIP if high is None else high - 1))  # at or past the line's fit: the next
        if fits(guess):
            low = guess
        else:
            high = guess
    return BatchSearch(low, peaks)


def refused_for_memory(error: str) -> bool:
    """Whether a compile error is the TPU compiler refusing the step for HBM (a smaller batch may still fit)."""
    return "RESOURCE_EXHAUSTED" in error or "Ran out of memory" in error


def plan_topology(config: ml_collections.ConfigDict, topology: str, search: Sequence[str] = tuple(REMAT_POLICIES)) -> dict:
    """Compiles ``config``'s job for ``topology`` and returns the report (the ``--json`` object).

    Keys: ``topology``, ``chips``, ``hosts``, ``compiled``, ``fits``, ``bytes_per_chip`` (the largest
    phase's peak), ``hbm_bytes_per_chip``, ``flops_per_step`` (per chip, the TPU compiler's),
    ``attention`` (``{kernel: layers}``), ``error``, ``phases`` (each phase's numbers),
    ``batch_per_chip``, and for ``search`` (when the step compiled, or the compiler refused it for HBM)
    ``largest_batch_per_chip`` (``{remat: batch}``) and ``search_peaks`` (``{remat: {batch: peak bytes or None}}``).
    """
    devices = topology_devices(topology)
    capacity = hbm_bytes(topology, len(devices))
    with compiling_for("tpu"):
        run = setup_run(config, devices, shapes_only=True)
        phases = compile_phases(run, config.train.batch_size)
        compiled = all(p.report is not None for p in phases)
        peak = max((p.report.peak_bytes for p in phases if p.report), default=None)
        out = {
            "topology": topology,
            "device_kind": devices[0].device_kind,
            "chips": len(devices),
            "hosts": len({d.process_index for d in devices}),
            "model": config.model or "(toy world)",
            "resolution": run.resolution,
            "dtype": jnp.dtype(run.model.unet.dtype).name,
            "remat": config.train.remat,
            "batch": config.train.batch_size,
            "batch_per_chip": config.train.batch_size // len(devices),
            "compiled": compiled,
            "fits": compiled and all(p.report.fits(capacity) for p in phases),
            "bytes_per_chip": peak,
            "hbm_bytes_per_chip": capacity,
            "flops_per_step": max((p.report.flops or 0.0 for p in phases if p.report), default=None) if compiled else None,
            "compile_seconds": round(sum(p.report.seconds for p in phases if p.report), 1),
            "attention": phases[0].attention if phases else {},
            "error": next((p.error for p in phases if p.error), ""),
            "phases": [
                {"phase": p.phase, "error": p.error, "attention": p.attention, "tpu_kernel_calls": p.tpu_kernel_calls,
                 **({"bytes_per_chip": p.report.peak_bytes, "argument_bytes": p.report.argument_bytes,
                     "temp_bytes": p.report.temp_bytes, "flops": p.report.flops, "compile_seconds": round(p.report.seconds, 1)}
                    if p.report else {})}
                for p in phases
            ],
        }
        # A step the compiler refused for HBM is where the largest batch that fits matters most: search it too.
        out_of_memory = not compiled and all(p.report is not None or refused_for_memory(p.error) for p in phases)
        if search and (compiled or out_of_memory):
            known = ({config.train.remat: {out["batch_per_chip"]: peak if compiled else None}}
                     if config.train.get("gradient_accumulation", 1) == 1 else {})
            searches = {remat: largest_batch_per_chip(config, devices, capacity, remat, known.get(remat)) for remat in search}
            out["largest_batch_per_chip"] = {remat: found.largest for remat, found in searches.items()}
            out["search_peaks"] = {remat: {str(b): p for b, p in sorted(found.peaks.items())} for remat, found in searches.items()}
    return out


def format_report(report: dict) -> str:
    """The human-readable lines ``jax-inversion compile`` prints."""
    head = (f"{report['topology']} ({report['device_kind']}, {report['chips']} chips, {report['hosts']} host"
            f"{'s' if report['hosts'] > 1 else ''}): {report['model']} at {report['resolution']} px, "
            f"{report['dtype']}, batch {report['batch']} ({report['batch_per_chip']} per chip), remat {report['remat']}")
    if not report["compiled"]:
        return "\n".join([head, f"not compiled: {report['error']}", *_largest_batch_lines(report)])
    lines = [head, "compiled"]
    for p in report["phases"]:
        lines.append(
            f"  phase {p['phase']}: per chip {p['bytes_per_chip'] / GIB:.2f} GiB of {report['hbm_bytes_per_chip'] / GIB:.0f} GiB "
            f"(arguments {p['argument_bytes'] / GIB:.2f}, temporaries {p['temp_bytes'] / GIB:.2f}); "
            f"{(p['flops'] or 0) / 1e12:.2f} TFLOP per chip per step; compiled in {p['compile_seconds']} s"
        )
    lines.append(f"fits: {'yes' if report['fits'] else 'NO'}")
    lines.append("attention layers by kernel: " + ", ".join(f"{k} {n}" for k, n in sorted(report["attention"].items())))
    return "\n".join(lines + _largest_batch_lines(report))


def _largest_batch_lines(report: dict) -> list[str]:
    """The search's line, if it ran: ``0`` says not even 1 per chip fits, ``>= 64`` that the search stopped at its cap."""
    if "largest_batch_per_chip" not in report:
        return []
    shown = lambda b: "0 (not even 1)" if b == 0 else (f">= {b}" if b >= MAX_BATCH_PER_CHIP else str(b))
    return ["largest batch per chip that fits: " + ", ".join(
        f"remat {r}: {shown(b)}" for r, b in report["largest_batch_per_chip"].items())]
