"""Textual Inversion config (see jax_inversion/configs/ti.py for every field)."""
from jax_inversion.configs.ti import get_config  # noqa: F401
