"""Process-level setup shared by the commands: multi-host init, XLA's cache and one-line user errors."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

import jax

from jax_inversion.core.errors import UserError


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` when launched as one of several processes (a no-op otherwise).

    Where the process learns its place, first match wins:

    - explicit: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``,
      ``JAX_PROCESS_ID`` (``launch/local_multiprocess.py``, ``launch/slurm_gpu.sbatch``, any launcher);
    - SLURM, inside ``srun`` with ``SLURM_NTASKS`` > 1: process id ``SLURM_PROCID``, count
      ``SLURM_NTASKS``, coordinator the step's first node (``scontrol show hostnames
      $SLURM_STEP_NODELIST``, its first line; without scontrol only a plain list, else one line
      asking for ``JAX_COORDINATOR_ADDRESS``), port ``JAX_COORDINATOR_PORT`` or one derived from
      the job id, as JAX does;
    - Cloud TPU VMs (``TPU_WORKER_HOSTNAMES`` with several hosts, a Cloud TPU VM, or
      ``JAX_DISTRIBUTED=auto``): JAX's own detection (TPU metadata server, GKE, SLURM, Open MPI).

    Devices per process: all it sees, unless ``JAX_LOCAL_DEVICE_IDS`` (e.g. ``0,1``) picks some, or
    SLURM runs several tasks on this node that all see the same GPUs (then task
    ``SLURM_LOCALID`` takes that GPU). JAX's own SLURM detection would instead give every task
    only GPU ``SLURM_LOCALID`` (one task per node would use 1 GPU of 8), so it is never used for
    the first two cases. On CPU, cross-process collectives use gloo.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not os.environ.get(k)]
        if missing:
            sys.exit(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: set all three (or none)")
        _initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"]))
    elif _slurm_step() and int(os.environ["SLURM_NTASKS"]) > 1:
        try:
            coordinator = _slurm_coordinator()
        except LaunchError as e:
            sys.exit(str(e))
        _initialize(coordinator, int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_PROCID"]))
    elif _tpu_pod() or os.environ.get("JAX_DISTRIBUTED") == "auto":
        _use_gloo_on_cpu()
        jax.distributed.initialize()


def _initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    _use_gloo_on_cpu()
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=_local_device_ids(),  # None: all visible devices (or JAX_LOCAL_DEVICE_IDS, read by JAX)
        cluster_detection_method="deactivate",  # else JAX's SLURM detection narrows each task to one GPU
    )


def _use_gloo_on_cpu() -> None:
    """CPU devices of several processes need a collectives backend: gloo (JAX's default since 0.5;
    older JAX had none). Only the CPU backend reads it; GPU and TPU runs are unaffected."""
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _slurm_step() -> bool:
    """Inside ``srun`` (a job step), not merely inside an allocation (the batch script itself)."""
    return all(k in os.environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID"))


class LaunchError(UserError, RuntimeError):
    """A multi-process launch whose coordinator cannot be found."""


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list, as ``scontrol show hostnames`` expands it (its first line):
    ``gpu[003-005,9],cpu1`` -> ``gpu003``, ``a[1-2]-ib`` -> ``a1-ib``.

    A plain list (no brackets: ``node1,node2``) needs no expansion. A compressed one without
    ``scontrol`` on PATH is :class:`LaunchError`, never a guess: hostlist syntax has suffixes and
    several bracket groups (``a[1-2]-ib[0-1]``), and a wrong host hangs every process.
    """
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        if "[" not in nodelist:
            return nodelist.split(",")[0].strip()
        raise LaunchError(
            f"SLURM node list {nodelist!r} needs scontrol to expand and scontrol is not on PATH: set "
            "JAX_COORDINATOR_ADDRESS=<first host>:<port> with JAX_NUM_PROCESSES and JAX_PROCESS_ID "
            "(as launch/slurm_gpu.sbatch does), or put scontrol on PATH"
        )
    try:
        done = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(
            f"scontrol show hostnames {nodelist!r} failed ({type(e).__name__}: {e}): set JAX_COORDINATOR_ADDRESS=<first host>:<port>"
        ) from None
    hosts = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not hosts:
        said = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}, no hosts"])[-1]
        raise LaunchError(
            f"scontrol show hostnames {nodelist!r} failed ({said}): set JAX_COORDINATOR_ADDRESS=<first host>:<port>"
        )
    return hosts[0]


def _slurm_coordinator() -> str:
    port = os.environ.get("JAX_COORDINATOR_PORT") or str(int(os.environ["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1))
    return f"{first_slurm_host(os.environ['SLURM_STEP_NODELIST'])}:{port}"


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM's compressed list, e.g. ``2(x3),1``."""
    counts = []
    for part in tasks_per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[min(node_id, len(counts) - 1)]


def _local_device_ids():
    if os.environ.get("JAX_LOCAL_DEVICE_IDS") or not _slurm_step():
        return None
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not per_node or "SLURM_LOCALID" not in os.environ:
        return None
    if slurm_tasks_on_node(per_node, int(os.environ.get("SLURM_NODEID", "0"))) <= 1:
        return None  # one task per node: all its GPUs
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) == 1:
        return None  # SLURM bound one GPU to this task (--gpus-per-task=1): it is the only one visible
    return [int(os.environ["SLURM_LOCALID"])]


def _tpu_pod() -> bool:
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        return True
    try:  # set when jax is imported on a Cloud TPU VM with libtpu (single-host VMs too: harmless there)
        from jax._src import cloud_tpu_init

        return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
    except (ImportError, AttributeError):
        return False


@contextlib.contextmanager
def user_errors(command: str):
    """Any :class:`~jax_inversion.core.errors.UserError` (bad input) becomes one line on stderr and exit status 1."""
    try:
        yield
    except UserError as e:
        sys.exit(f"{command}: {e}")


def enable_compilation_cache(workdir: str) -> None:
    """XLA's persistent compilation cache in ``WORKDIR/xla_cache`` (unless one is set already):
    compiled steps survive restarts (preemption, resume). A gs:// workdir keeps it on local disk
    (``~/.cache/jax_inversion/xla_cache``): it is machine-specific and read at every compile."""
    if jax.config.jax_compilation_cache_dir is None:
        local = os.path.join(os.path.expanduser("~"), ".cache", "jax_inversion") if "://" in workdir else os.path.abspath(workdir)
        jax.config.update("jax_compilation_cache_dir", os.path.join(local, "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
