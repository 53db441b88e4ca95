"""jax_inversion.core.xla_flags: a preset merges into XLA_FLAGS without overriding the user, and this jaxlib knows its flags."""
import os
import subprocess
import sys

from jax_inversion.core import xla_flags

PRESET = ("--xla_a=1", "--xla_b=true", "--xla_c=")


def test_merge_into_nothing_is_the_preset():
    assert xla_flags.merge("", PRESET) == "--xla_a=1 --xla_b=true --xla_c="


def test_the_users_flags_win_and_stay_as_written():
    assert xla_flags.merge("  --xla_b=false --xla_other=2 ", PRESET) == "--xla_b=false --xla_other=2 --xla_a=1 --xla_c="
    assert xla_flags.merge("--xla_c", PRESET) == "--xla_c --xla_a=1 --xla_b=true"  # a bare flag counts as set


def test_merge_is_idempotent():
    once = xla_flags.merge("--xla_b=false", PRESET)
    assert xla_flags.merge(once, PRESET) == once


def test_apply_sets_the_environment():
    environ = {"XLA_FLAGS": "--xla_a=7"}
    assert xla_flags.apply(PRESET, environ) == "--xla_a=7 --xla_b=true --xla_c="
    assert environ["XLA_FLAGS"] == "--xla_a=7 --xla_b=true --xla_c="
    empty = {}
    xla_flags.apply(PRESET, empty)
    assert empty["XLA_FLAGS"] == "--xla_a=1 --xla_b=true --xla_c="


def test_this_jaxlib_knows_every_preset_flag():
    """XLA aborts at start on an unknown XLA_FLAGS entry (a renamed flag after a jaxlib upgrade)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    xla_flags.apply(xla_flags.gpu_flags(), env)  # GPU flags are parsed (and ignored) on a CPU too
    proc = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
