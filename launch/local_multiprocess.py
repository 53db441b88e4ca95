#!/usr/bin/env python
"""Runs one jax-inversion command as N cooperating local processes on CPU (a multi-host rehearsal).

    python launch/local_multiprocess.py --num_processes 2 --devices_per_process 4 -- \\
        train --workdir /tmp/run --config.train.batch_size=8 --config.train.num_steps=20

Each process runs ``python -m jax_inversion.cli <args>`` with ``JAX_COORDINATOR_ADDRESS=
localhost:<free port>``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``JAX_PLATFORMS=cpu`` and
``<devices_per_process>`` CPU devices, so ``jax.distributed`` joins them into one job of
``num_processes * devices_per_process`` devices (gloo collectives) exactly as hosts of a pod
would be joined. Output lines are prefixed ``[p<id>]``. If one process fails the others are
stopped (SIGTERM, then SIGKILL after ``--grace_seconds``) and the launcher exits with the first
failure's status; SIGINT/SIGTERM to the launcher are forwarded to every process.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(base: dict, process_id: int, num_processes: int, devices: int, coordinator: str) -> dict:
    """``base`` plus what makes this process rank ``process_id`` of a CPU job of ``num_processes`` processes."""
    env = {k: v for k, v in base.items() if not k.startswith(("SLURM_", "JAX_LOCAL_DEVICE_IDS", "TPU_WORKER"))}
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", base.get("XLA_FLAGS", "")).split()
    env.update(
        JAX_COORDINATOR_ADDRESS=coordinator,
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(process_id),
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
        PYTHONUNBUFFERED="1",
    )
    # The repository first on the path, so a checkout runs without being installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, base.get("PYTHONPATH", "")) if p)
    return env


def _load_prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the forked child only calls it
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Linux: a process is SIGKILLed if the launcher dies (even by SIGKILL), so no orphan holds the port."""
    _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        line = line.split("\r")[-1]  # progress bars redraw with \r: keep the latest state
        with lock:
            out.write(f"{prefix} {line}\n")
            out.flush()
    stream.close()


def launch(
    args: Sequence[str],
    num_processes: int,
    devices_per_process: int,
    port: Optional[int] = None,
    grace_seconds: float = 10.0,
    python: str = sys.executable,
    out=None,
) -> int:
    """Runs ``python -m jax_inversion.cli *args`` as ``num_processes`` processes; returns the exit status."""
    out = out or sys.stdout
    coordinator = f"localhost:{port or free_port()}"
    lock = threading.Lock()
    procs, pumps = [], []
    for i in range(num_processes):
        env = process_env(os.environ, i, num_processes, devices_per_process, coordinator)
        proc = subprocess.Popen(
            [python, "-m", "jax_inversion.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only; it forwards
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}]", out, lock), daemon=True)
        pump.start()
        pumps.append(pump)

    def stop_all(sig: int) -> None:
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def forward(signum, frame):
        stop_all(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        while [p.poll() for p in procs].count(None):  # poll every process: it sets returncode
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed:
                status = failed[0].returncode
                with lock:
                    out.write(f"[launch] process {procs.index(failed[0])} exited with {status}: stopping the others\n")
                    out.flush()
                stop_all(signal.SIGTERM)
                deadline = time.monotonic() + grace_seconds
                while [p.poll() for p in procs].count(None) and time.monotonic() < deadline:
                    time.sleep(0.1)
                stop_all(signal.SIGKILL)
                break
            time.sleep(0.1)
        for p in procs:
            p.wait()
        if status == 0:
            status = next((p.returncode for p in procs if p.returncode != 0), 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop_all(signal.SIGKILL)
        for pump in pumps:
            pump.join(timeout=5)
    if status < 0:  # killed by a signal: the shell convention
        status = 128 - status
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        sys.exit("usage: local_multiprocess.py [--num_processes N] [--devices_per_process D] -- <command> [--flags]")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--grace_seconds", type=float, default=10.0, help="SIGTERM-to-SIGKILL wait when one fails")
    options = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        sys.exit("local_multiprocess.py: give the command after --, e.g. -- train --workdir DIR")
    if options.num_processes < 1 or options.devices_per_process < 1:
        sys.exit("local_multiprocess.py: --num_processes and --devices_per_process must be >= 1")
    return launch(command, options.num_processes, options.devices_per_process, options.port, options.grace_seconds)


if __name__ == "__main__":
    sys.exit(main())
