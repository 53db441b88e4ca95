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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``heavy(seconds)`` first, longest first, the rest in file order.

    With ``--dist=worksteal`` (pytest.ini) a worker that runs dry steals from the end of the other's
    queue, so the light tests even out the finish; a long test run last would keep one worker busy
    while the other sits idle (longest-first is the classic remedy). The seconds are those measured
    on the 2-core machine (``--durations``); only their order matters.
    """
    def seconds(item):
        marker = item.get_closest_marker("heavy")
        return marker.args[0] if marker else 0.0

    items.sort(key=lambda item: -seconds(item))  # stable: the light tests keep their file order


def pytest_unconfigure(config):
    directory = getattr(config, "_xla_cache_dir", None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    from tests.torch_models import build_pipeline

    return build_pipeline(str(tmp_path_factory.mktemp("tiny_sd1")), "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    from tests.torch_models import build_pipeline

    return build_pipeline(str(tmp_path_factory.mktemp("tiny_sd2")), "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from tests.torch_models import build_pipeline

    return build_pipeline(str(tmp_path_factory.mktemp("tiny_sdxl")), "sdxl")


@pytest.fixture(scope="session")
def one_level_sd1(tmp_path_factory):
    """SD1 style at one UNet level: the model of the tests that train or sample, not of the parity tests."""
    from tests.torch_models import build_pipeline

    return build_pipeline(str(tmp_path_factory.mktemp("one_level_sd1")), "sd1_one_level")
