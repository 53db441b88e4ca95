"""Shared test helpers."""
from jax_inversion.configs.ti import get_config


def make_config(model, concept_dir, **train):
    """A small TI config on ``model``: ``<ball>`` with 2 vectors, global batch 8; ``train`` overrides."""
    config = get_config()
    config.model = model
    config.data.concept_dir = concept_dir
    config.data.placeholder_token = "<ball>"
    config.data.initializer_token = "ball"
    config.data.num_vectors = 2
    config.train.batch_size = 8
    config.train.num_steps = 6
    config.train.log_every = 3
    config.train.checkpoint_every = 3
    config.train.learning_rate = 5e-3
    for key, value in train.items():
        config.train[key] = value
    return config
