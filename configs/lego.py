"""lego config (see jax_inversion/configs/lego.py for every field)."""
from jax_inversion.configs.lego import get_config  # noqa: F401
