"""The CLI on a machine that has libtpu (the ``test`` and ``tpu`` extras) but no TPU: jax runs on the CPU
without starting libtpu, whose failed start printed four lines of errors in every command."""
import importlib.util
import os
import subprocess
import sys

import pytest

from jax_inversion import cli


@pytest.fixture
def libtpu_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: object() if name == "libtpu" else real(name, *a))


def _pci(root, *vendors):
    for i, vendor in enumerate(vendors):
        os.makedirs(root / f"0000:00:0{i}.0")
        (root / f"0000:00:0{i}.0" / "vendor").write_text(vendor + "\n")
    return str(root)


def test_cpu_only_where_libtpu_finds_no_chip_and_no_gpu(tmp_path, libtpu_installed, monkeypatch):
    no_tpu = _pci(tmp_path / "cpu_box", "0x1af4", "0x8086")  # virtio, Intel
    environ = {}
    assert cli.cpu_where_libtpu_has_no_chip(environ, no_tpu, gpu_device_files=()) and environ == {"JAX_PLATFORMS": "cpu"}

    # A TPU chip, a GPU, or the user's own JAX_PLATFORMS (even empty): nothing is set.
    tpu_vm = _pci(tmp_path / "tpu_vm", "0x8086", "0x1ae0")
    environ = {}
    assert not cli.cpu_where_libtpu_has_no_chip(environ, tpu_vm, gpu_device_files=()) and environ == {}
    (tmp_path / "nvidia0").write_text("")
    assert not cli.cpu_where_libtpu_has_no_chip(environ, no_tpu, gpu_device_files=(str(tmp_path / "nvidia0"),))
    assert environ == {}
    environ = {"JAX_PLATFORMS": ""}
    assert not cli.cpu_where_libtpu_has_no_chip(environ, no_tpu, gpu_device_files=()) and environ == {"JAX_PLATFORMS": ""}

    # Without libtpu jax never starts it: nothing to do.
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None)
    environ = {}
    assert not cli.cpu_where_libtpu_has_no_chip(environ, no_tpu, gpu_device_files=()) and environ == {}


def test_without_the_probe_jax_starts_on_the_cpu_and_prints_no_libtpu_errors():
    """In a fresh process as a user runs one (no JAX_PLATFORMS). Needs this machine to be the case itself:
    libtpu installed (it is, in the test extra), no TPU chip, no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    if importlib.util.find_spec("libtpu") is None or not cli.cpu_where_libtpu_has_no_chip(dict(env)):
        pytest.skip("this machine has no libtpu, or has a TPU chip or a GPU")
    start = "import jax; print(jax.default_backend())"
    plain = subprocess.run([sys.executable, "-c", start], capture_output=True, text=True, env=env, timeout=120)
    quiet = subprocess.run([sys.executable, "-c", "from jax_inversion import cli; cli.cpu_where_libtpu_has_no_chip(); " + start],
                           capture_output=True, text=True, env=env, timeout=120)
    assert plain.stdout.strip() == quiet.stdout.strip() == "cpu"
    assert "TPU_WORKER_HOSTNAMES" in plain.stderr  # what users saw: libtpu started and failed
    assert "TPU" not in quiet.stderr, quiet.stderr
