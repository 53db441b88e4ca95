"""The embedded default: the shipped toy-world model and one of its unnamed concepts.

``jax-inversion train --workdir DIR`` with no model and no images runs the whole job on
these, offline, in a few minutes on a CPU. ``write_concept_images`` draws a small image
set for tests that bring their own model.
"""
from __future__ import annotations

import os
import tempfile

import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from jax_inversion.configs.ti import resolve_unset
from jax_inversion.core.files import is_remote
from jax_inversion.data.images import DataError
from jax_inversion.models.loading import ModelLoadError
from jax_inversion.toyworld import SHIPPED_MODEL
from jax_inversion.toyworld.concepts import CONCEPTS, write_concept

DEFAULT_CONCEPT = "star"  # the toy world's unnamed shape: drawn in pretraining, only ever captioned "shape"
TOY_TEMPLATES = ("a {}",)  # the toy world's captions name objects plainly
DEFAULT_STEPS = 2000  # the embedded default's length when train.num_steps is unset (lr 0.04: 5e-3 x batch 8)
DEFAULT_VECTORS = 8  # vectors of <concept> when data.num_vectors is unset (see DEFAULT_MIN_TIMESTEP)
# Timesteps from [200, 1000) when train.min_timestep is unset: where the star's shape is decided.
# Star found in 192 samples of "a <concept>" after 2,000 steps (README, benchmarks/identity_reads.py):
# 4 vectors over all timesteps 0.70, 8 vectors 0.72; 4 vectors from t >= 200 0.80, 8 vectors 0.85.
DEFAULT_MIN_TIMESTEP = 200


def write_concept_images(directory: str, count: int = 6, size: int = 64, seed: int = 0) -> str:
    """A striped ball on varied backgrounds and positions: the tests' small concept (the embedded default job
    draws the toy world's star instead, ``toyworld.concepts.write_concept``)."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        background = tuple(int(c) for c in rng.integers(40, 220, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        radius = int(rng.integers(size // 5, size // 3))
        cx, cy = (int(v) for v in rng.integers(radius, size - radius, 2))
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw.ellipse(box, fill=(220, 40, 40))
        stripes = Image.new("L", (size, size), 0)
        stripe_draw = ImageDraw.Draw(stripes)
        for y in range(cy - radius, cy + radius, 6):
            stripe_draw.rectangle((0, y, size, y + 2), fill=255)
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        image.paste((250, 230, 60), mask=Image.fromarray(np.minimum(np.asarray(stripes), np.asarray(mask))))
        image.save(os.path.join(directory, f"ball_{i}.png"))
    return directory


def with_default_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with an empty ``model`` pointed at the shipped toy-world model (one line if it is missing)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.model:
        if not os.path.exists(os.path.join(SHIPPED_MODEL, "model_index.json")):
            raise ModelLoadError(
                f"the shipped toy model is missing from {SHIPPED_MODEL}: reinstall jax_inversion, or pass --config.model=PATH"
            )
        config.model = SHIPPED_MODEL
    return config


def fill_defaults(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Points an empty ``model`` / ``data.concept_dir`` at the embedded default, and resolves the
    unset fields (``configs/ti.py``'s :func:`~jax_inversion.configs.ti.resolve_unset`).

    The default model is the shipped toy-world model (``jax_inversion/toyworld/pretrained``)
    and the default concept its yellow star (a look pretraining showed but never named: its
    captions say "a yellow shape"), written into ``workdir``; prompts are the world's
    captions ("a <concept>"), the initializer the generic word "shape"; unless set, 2,000 steps
    of 8 vectors on timesteps from 200 up. Any value given, even ti.py's own (5,000 steps), is kept;
    off the embedded default the unset fields take ti.py's defaults (5,000 steps, 1 vector, 0).
    """
    use_default_model = not config.model
    config = with_default_model(config)
    if not config.data.concept_dir:
        if not use_default_model:
            raise DataError("no concept images given: pass --config.data.concept_dir=DIR with your images")
        local = os.path.join(tempfile.gettempdir(), "jax_inversion") if is_remote(workdir) else os.path.abspath(workdir)
        info = write_concept(DEFAULT_CONCEPT, os.path.join(local, "default_concept"))
        config.data.concept_dir = info["images"]
        if not config.data.initializer_token:
            config.data.initializer_token = CONCEPTS[DEFAULT_CONCEPT].class_word
        if not config.data.templates:
            config.data.templates = TOY_TEMPLATES
        return resolve_unset(config, {"train.num_steps": DEFAULT_STEPS, "data.num_vectors": DEFAULT_VECTORS,
                                      "train.min_timestep": DEFAULT_MIN_TIMESTEP})
    return resolve_unset(config)
