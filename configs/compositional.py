"""compositional config (see jax_inversion/configs/compositional.py for every field)."""
from jax_inversion.configs.compositional import get_config  # noqa: F401
