"""`jax-inversion <command> --help`: the command's purpose, its own flags, exit 0."""
import subprocess
import sys

import pytest

from jax_inversion.cli import COMMANDS

# A flag each command defines itself: --help must list it.
OWN_FLAG = {
    "train": "--workdir", "export": "--format", "sample": "--prompt", "attention": "--prompt",
    "train-layout": "--steps", "check-parity": "--tolerance", "toyworld": "--workdir", "compile": "--topology",
}


def test_every_command_has_a_help_flag_check():
    assert set(OWN_FLAG) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_prints_purpose_and_own_flags(command):
    run = subprocess.run([sys.executable, "-m", "jax_inversion.cli", command, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.startswith(f"jax-inversion {command}: {COMMANDS[command][1]}")
    assert f"  {OWN_FLAG[command]}:" in out
    assert "--logtostderr" not in out  # absl's own flags stay behind --helpfull
    if command in ("train", "toyworld", "compile"):
        assert "--config.<key>=value" in out and "jax_inversion/configs/" in out
