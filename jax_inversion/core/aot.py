"""Ahead-of-time compilation of a jitted step and what the compiler says about it.

``compile_ahead(jitted, *args)`` lowers and compiles (``.lower(...).compile()``, as maxdiffusion does
before step one) and returns the executable with a :class:`CompileReport`: compile seconds, the
per-chip memory from ``memory_analysis()`` and the FLOPs from ``cost_analysis()``. The arguments
may be arrays or ``jax.ShapeDtypeStruct`` s with shardings (a TPU topology with no TPU here).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import jax

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Per-chip bytes of one compiled program (``memory_analysis()``) and its FLOPs (``cost_analysis()``)."""

    seconds: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse a donated argument's buffer
    temp_bytes: int
    code_bytes: int
    flops: Optional[float]

    @property
    def peak_bytes(self) -> int:
        """What the program holds at once on one chip: arguments, outputs not aliased to them, temporaries, code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    def fits(self, capacity: Optional[int]) -> bool:
        """Whether :attr:`peak_bytes` fits ``capacity`` bytes (unknown capacity: assumed to)."""
        return capacity is None or self.peak_bytes <= capacity

    def summary(self) -> str:
        """One line: compile time, per-chip bytes and FLOPs."""
        flops = "n/a" if self.flops is None else f"{self.flops / 1e12:.2f} TFLOP"
        return (f"compiled in {self.seconds:.1f} s; per chip {self.peak_bytes / GIB:.2f} GiB "
                f"(arguments {self.argument_bytes / GIB:.2f}, temporaries {self.temp_bytes / GIB:.2f}); {flops} per step")


def cost_flops(cost) -> Optional[float]:
    """The ``flops`` of a (lowered or compiled) ``cost_analysis()``: a dict, or a list of one per program; None if absent."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and cost.get("flops") is not None else None


def flops_of(compiled) -> Optional[float]:
    """The compiled program's FLOPs per device (``cost_analysis()``), or None where the backend gives none."""
    try:
        return cost_flops(compiled.cost_analysis())
    except Exception:  # some plugins do not implement it
        return None


def report_of(compiled, seconds: float) -> CompileReport:
    memory = compiled.memory_analysis()
    return CompileReport(
        seconds=seconds,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        flops=flops_of(compiled),
    )


def compile_ahead(jitted, *args) -> tuple[Any, CompileReport]:
    """``(executable, report)`` of ``jitted`` for ``args`` (arrays or ``ShapeDtypeStruct`` s)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, report_of(compiled, time.perf_counter() - start)


def device_memory_bytes(device) -> Optional[int]:
    """The memory one accelerator gives a program (``memory_stats()['bytes_limit']``); None on a CPU."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:
        return None
    return stats.get("bytes_limit")
