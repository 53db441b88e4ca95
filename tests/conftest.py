import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
