"""Process-level setup shared by the commands: multi-host init and one-line user errors."""
from __future__ import annotations

import contextlib
import os
import sys

import jax


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` when launched as one of several processes.

    Explicit: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.
    Auto-detected by JAX: Cloud TPU pods, SLURM (``SLURM_NTASKS`` > 1).
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()


@contextlib.contextmanager
def user_errors(command: str):
    """Our error types (bad input) become one line on stderr and exit status 1."""
    from jax_inversion.checkpoints import CheckpointError
    from jax_inversion.data import DataError
    from jax_inversion.export import ExportError
    from jax_inversion.layout import LayoutError
    from jax_inversion.loading import ModelLoadError
    from jax_inversion.objectives import ObjectiveError
    from jax_inversion.sampling import SamplingError
    from jax_inversion.tokens import TokenError
    from jax_inversion.train import TrainError

    try:
        yield
    except (CheckpointError, DataError, ExportError, LayoutError, ModelLoadError, ObjectiveError, SamplingError, TokenError, TrainError) as e:
        sys.exit(f"{command}: {e}")
