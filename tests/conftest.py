import os
import shutil
import tempfile

import pytest

from tests.xla_flags import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole test session, in a temp dir.

    Set in the controlling process before xdist starts its workers, as environment
    variables, so the workers and every `jax-inversion` subprocess share it: a program
    compiled by one test (the tiny model's train step, its sampler) is read back by the
    others instead of recompiled. A fresh directory each session: nothing carries over.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    directory = tempfile.mkdtemp(prefix="jax_inversion_tests_xla_")
    config._xla_cache_dir = directory
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    os.environ["JAX_INVERSION_TEST_MODELS"] = os.path.join(directory, "models")  # see _shared_model


def pytest_collection_modifyitems(config, items):
    """Each xdist worker's first tests are its share of the ``heavy(seconds)`` ones, longest first; then light ones.

    ``--dist=worksteal`` (pytest.ini) hands worker k the k-th contiguous slice of this order, and a worker
    that runs dry steals from the end of the other's queue, so the light tests even out the finish. The
    heavy tests are dealt to the slices longest first, each to the slice with the fewest heavy seconds so
    far, and lead their slice: both workers start on heavy tests, and no long test is left for last (it
    would keep one worker busy while the other sits idle). Every worker computes the same order (xdist
    requires it). The seconds are those measured on the 2-core machine (``--durations``).
    """
    def seconds(item):
        marker = item.get_closest_marker("heavy")
        return marker.args[0] if marker else 0.0

    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    heavy = sorted((item for item in items if seconds(item)), key=lambda item: -seconds(item))
    light = [item for item in items if not seconds(item)]  # file order
    slices, loads = [[] for _ in range(workers)], [0.0] * workers
    for item in heavy:
        k = loads.index(min(loads))
        slices[k].append(item)
        loads[k] += seconds(item)
    ordered, remaining = [], len(items)
    for k in range(workers):  # worksteal's first hand-out: len(pending) // (workers left) items each
        size = remaining // (workers - k)
        take = max(0, size - len(slices[k]))
        ordered += slices[k] + light[:take]
        light = light[take:]
        remaining -= size
    items[:] = ordered + light


def pytest_unconfigure(config):
    directory = getattr(config, "_xla_cache_dir", None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


def _shared_model(tmp_path_factory, variant: str) -> str:
    """The tiny model ``variant`` (tests/torch_models.py), built once per test session and read by every xdist
    worker: the first to ask builds it under a file lock, the other waits and reuses it (each worker built its own,
    ~8 s apiece with torch). Tests read these folders and never write into them."""
    from filelock import FileLock

    from tests.torch_models import build_pipeline

    root = os.environ.get("JAX_INVERSION_TEST_MODELS") or str(tmp_path_factory.getbasetemp())
    os.makedirs(root, exist_ok=True)
    directory = os.path.join(root, variant)
    with FileLock(directory + ".lock"):
        if not os.path.exists(os.path.join(directory, ".complete")):
            shutil.rmtree(directory, ignore_errors=True)
            build_pipeline(directory, variant)
            open(os.path.join(directory, ".complete"), "w").close()
    return directory


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    return _shared_model(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    return _shared_model(tmp_path_factory, "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return _shared_model(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def one_level_sd1(tmp_path_factory):
    """SD1 style at one UNet level: the model of the tests that train or sample, not of the parity tests."""
    return _shared_model(tmp_path_factory, "sd1_one_level")
