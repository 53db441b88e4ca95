"""The offline toy world: scenes, concepts to invert, a pretrained model and detector, evaluation."""
import os

from jax_inversion.core.errors import UserError

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SHIPPED_MODEL = os.path.join(PACKAGE_DIR, "pretrained", "model")  # the embedded default's model
SHIPPED_DETECTOR = os.path.join(PACKAGE_DIR, "pretrained", "detector")


class ToyWorldError(UserError, ValueError):
    """A toy-world input that cannot be used (one line, with the fix)."""
