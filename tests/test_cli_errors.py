"""`jax-inversion` reports an override of a key the config lacks as one line, and nothing else as one."""
import subprocess
import sys

import pytest

from jax_inversion import cli
from jax_inversion import commands


@pytest.mark.parametrize("flag,key", [
    ("--config.nonexistent=1", "nonexistent"),  # ml_collections: AttributeError(KeyError) from the ConfigDict
    ("--config.train.batch_size.x=1", "train.batch_size.x"),  # ml_collections: KeyError inside a value
    ("--config.data.templates.x=1", "data.templates.x"),  # ml_collections: ValueError under a field that is None
])
def test_unknown_config_key_is_one_line(flag, key, tmp_path):
    run = subprocess.run([sys.executable, "-m", "jax_inversion.cli", "train", f"--workdir={tmp_path}/w", flag],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"train: unknown config key {key!r} in the --config.* flags: see jax_inversion/configs/ for the keys"
    ]


@pytest.mark.parametrize("body,error", [
    ("import os\nos.no_such_function\n", AttributeError),
    ("SETTINGS = {}\nSETTINGS['missing']\n", KeyError),
    ("STEPS = int('many')\n", ValueError),
])
def test_an_error_inside_a_command_import_is_not_a_config_key(body, error, tmp_path, monkeypatch, capsys):
    """A command module whose own import raises AttributeError/KeyError/ValueError: the error surfaces as it is."""
    (tmp_path / "broken_for_test.py").write_text(body)
    monkeypatch.setattr(commands, "__path__", [*commands.__path__, str(tmp_path)])
    monkeypatch.setitem(cli.COMMANDS, "broken", ("broken_for_test", "a command whose import fails"))
    monkeypatch.delitem(sys.modules, "jax_inversion.commands.broken_for_test", raising=False)
    with pytest.raises(error) as raised:
        cli.run(["jax-inversion", "broken", "--config.train.num_steps=3"])
    assert cli.unknown_config_key(raised.value) is None
    assert "unknown config key" not in capsys.readouterr().err
