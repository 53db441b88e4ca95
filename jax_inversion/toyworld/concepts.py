"""Held-out concepts of the toy world and their folders: images, masks, subject-only images.

Each concept is one object carrying something pretraining never showed: a new shape
(a yellow star), a new texture (a checkered blue circle) or a new state (a melting green
square). ``write_concept`` renders its training images on varied backgrounds, the concept
masks for the location losses, the subject-only images for Lego (the same object without
the new attribute) and ``concept.json``, which evaluation reads back.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np
from PIL import Image

from jax_inversion.toyworld import ToyWorldError, world

CONCEPT_FILE = "concept.json"


@dataclasses.dataclass(frozen=True)
class HeldOutConcept:
    name: str
    kind: str  # "shape" | "texture" | "state"
    attributes: dict  # the concept object's shape, colour, texture, state
    subject: Optional[dict]  # the same object without the new attribute (Lego's subject); None for a new shape
    class_word: str  # a seen word for the concept's class: initializer, SeFi class word, anchor word
    positives: tuple[str, ...]  # Lego's context loss: seen words near the concept ...
    negatives: tuple[str, ...]  # ... and words away from it
    companions: tuple[str, ...]  # seen objects composed with the concept in evaluation

    @property
    def label(self) -> str:
        """The detector label that is the concept's presence."""
        return f"{self.kind}:{self.name}"


CONCEPTS = {
    "star": HeldOutConcept(
        "star", "shape", dict(shape="star", colour="yellow", texture=world.PLAIN, state=world.NORMAL), None,
        class_word="cross", positives=("cross",), negatives=("circle",),
        companions=("a red square", "a blue circle", "a white moon"),
    ),
    "checkered": HeldOutConcept(
        "checkered", "texture", dict(shape="circle", colour="blue", texture="checkered", state=world.NORMAL),
        dict(shape="circle", colour="blue", texture=world.PLAIN, state=world.NORMAL),
        class_word="circle", positives=("dotted",), negatives=("hollow",),
        companions=("a red square", "a yellow triangle", "a white moon"),
    ),
    "melting": HeldOutConcept(
        "melting", "state", dict(shape="square", colour="green", texture=world.PLAIN, state="melting"),
        dict(shape="square", colour="green", texture=world.PLAIN, state=world.NORMAL),
        class_word="square", positives=("tilted",), negatives=("hollow",),
        companions=("a red circle", "a yellow triangle", "a white moon"),
    ),
}


def concept_scenes(attributes: dict, count: int, seed: int) -> list[world.Scene]:
    """``count`` single-object scenes of the object ``attributes`` at varied boxes and backgrounds."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        background, gradient = world.random_background(rng)
        size = int(rng.integers(28, 40))
        x0, y0 = (int(v) for v in rng.integers(3, world.SIZE - size - 3, 2))
        out.append(world.Scene((world.WorldObject(box=(x0, y0, x0 + size, y0 + size), **attributes),), background, gradient))
    return out


def _write_images(directory: str, scene_list, seed: int, masks_dir: Optional[str] = None) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    if masks_dir:
        os.makedirs(masks_dir, exist_ok=True)
    names = []
    for i, scene in enumerate(scene_list):
        image, masks = world.render(scene, seed + i)
        name = f"{i:02d}.png"
        Image.fromarray(image).save(os.path.join(directory, name))
        if masks_dir:
            Image.fromarray((masks[0] * 255).astype(np.uint8)).save(os.path.join(masks_dir, name))
        names.append(name)
    return names


def write_concept(name: str, directory: str, count: int = 8, seed: int = 0) -> dict:
    """``directory/{images,masks,subject,subject_masks}`` and ``concept.json``; returns the json's content."""
    if name not in CONCEPTS:
        raise ToyWorldError(f"unknown held-out concept {name!r}: choose one of {', '.join(CONCEPTS)}")
    concept = CONCEPTS[name]
    os.makedirs(directory, exist_ok=True)
    info = dataclasses.asdict(concept)
    info["label"] = concept.label
    info["images"] = os.path.join(directory, "images")
    info["masks"] = os.path.join(directory, "masks")
    _write_images(info["images"], concept_scenes(concept.attributes, count, seed), seed, info["masks"])
    if concept.subject is not None:
        info["subject_images"] = os.path.join(directory, "subject")
        info["subject_masks"] = os.path.join(directory, "subject_masks")
        _write_images(info["subject_images"], concept_scenes(concept.subject, count, seed + 1000), seed + 1000, info["subject_masks"])
    with open(os.path.join(directory, CONCEPT_FILE), "w") as f:
        json.dump(info, f, indent=2)
    return info


def read_concept(image_dir: str) -> Optional[dict]:
    """The ``concept.json`` beside a concept's image folder (None for images from elsewhere)."""
    path = os.path.join(os.path.dirname(os.path.abspath(image_dir)), CONCEPT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
