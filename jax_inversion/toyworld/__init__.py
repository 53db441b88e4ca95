"""The offline toy world: scenes, held-out concepts, a pretrained model and detector, evaluation."""


class ToyWorldError(ValueError):
    """A toy-world input that cannot be used (one line, with the fix)."""
