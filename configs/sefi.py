"""sefi config (see jax_inversion/configs/sefi.py for every field)."""
from jax_inversion.configs.sefi import get_config  # noqa: F401
