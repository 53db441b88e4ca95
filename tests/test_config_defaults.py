"""Unset config fields (None) take the embedded default job's values on that job, ti.py's elsewhere;
a value given, even ti.py's own, is always kept."""
import os
import sys
from unittest import mock

import pytest
from absl import flags
from ml_collections import config_flags

from jax_inversion.commands import default_job
from jax_inversion.configs import compositional, lego, ti

TI_PATH = os.path.join(os.path.dirname(ti.__file__), "ti.py")
KEYS = ("train.num_steps", "data.num_vectors", "train.min_timestep")


def _cli_config(*overrides):
    """The config as `jax-inversion train` reads it: configs/ti.py with --config.* overrides (the config
    flag reads them from sys.argv while being defined, as in cli.run)."""
    argv = ["jax-inversion train", *overrides]
    values = flags.FlagValues()
    with mock.patch.object(sys, "argv", argv):
        config_flags.DEFINE_config_file("config", TI_PATH, "config", flag_values=values, lock_config=True)
        values(argv)
    return values.config


def _values(config):
    return tuple(config[group][key] for group, key in (k.split(".") for k in KEYS))


def test_unset_fields_are_none_until_resolved():
    config = _cli_config()
    assert _values(config) == (None, None, None)
    assert _values(ti.resolve_unset(config)) == (5000, 1, 0)
    assert _values(config) == (None, None, None)  # a copy: the caller's config is not changed
    assert _values(ti.resolve_unset(_cli_config("--config.train.num_steps=7"))) == (7, 1, 0)


@pytest.mark.parametrize("overrides,expected", [
    ((), (2000, 8, 200)),  # the embedded default's own
    (("--config.train.num_steps=5000",), (5000, 8, 200)),  # ti.py's default value, given: kept (was 2,000)
    (("--config.data.num_vectors=1", "--config.train.min_timestep=0"), (2000, 1, 0)),
])
def test_embedded_default_keeps_values_given(overrides, expected, tmp_path):
    config = default_job.fill_defaults(_cli_config(*overrides), str(tmp_path))
    assert _values(config) == expected
    assert config.data.concept_dir.startswith(str(tmp_path))  # it is the embedded default job


def test_a_users_model_gets_ti_defaults(tmp_path):
    overrides = ("--config.model=path/to/sd15", f"--config.data.concept_dir={tmp_path}")
    assert _values(default_job.fill_defaults(_cli_config(*overrides), str(tmp_path / "w"))) == (5000, 1, 0)
    assert not (tmp_path / "w").exists()


def test_method_configs_values_are_theirs():
    assert _values(ti.resolve_unset(lego.get_config()))[:2] == (1000, 1)
    assert ti.resolve_unset(compositional.get_config()).train.num_steps == 5000
