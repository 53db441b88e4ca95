"""The toy world's concepts to invert, and their folders: images, masks, subject-only images.

Like a user's cat, most concepts are looks the model can draw but has no word for:

- ``star``: a yellow star. The model's last pretraining round showed stars in a few percent
  of the scenes, always captioned with the generic word "shape" (:func:`world.unnamed_scenes`).
- ``checkered``: a blue checkered circle; checkered textures were shown, never said.
- ``my_star``: an instance, a purple checkered star. Its parts were shown unnamed, this
  object itself almost never; "a purple shape" describes it only loosely.
- ``dotted_moon``: a purple dotted moon, a look the model draws from seen words, which
  inversion need only find (no retraining involved).
- ``melting``: a melting green square, the **novel control**. No pretraining image ever
  melted, and inversion can only name what a model can already draw, so every method is
  expected to fail here: Textual Inversion's known limit, kept to show it.

``write_concept`` renders a concept's training images on varied backgrounds, the concept
masks for the location losses, the subject-only images for Lego (the same object without the
attribute) and ``concept.json``, which evaluation reads back.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from jax_inversion.toyworld import ToyWorldError, world

CONCEPT_FILE = "concept.json"


@dataclasses.dataclass(frozen=True)
class Concept:
    name: str
    status: str  # "unnamed" | "instance" | "seen look" | "novel control": what the model knows of it
    attributes: dict  # the concept object's shape, colour, texture, state
    subject: Optional[dict]  # the object without its attribute (Lego's subject); None: no separable attribute
    class_word: str  # a caption word for the concept's class: initializer, SeFi class word, anchor word
    attribute_word: str  # a caption word of the attribute's kind, not the attribute: Lego's concept-token initializer
    positives: tuple[str, ...]  # Lego's context loss: words describing the concept ...
    negatives: tuple[str, ...]  # ... and words away from it
    companions: tuple[str, ...]  # seen objects composed with the concept ("a <c> and a red square")
    labels: tuple[str, ...]  # detector labels that together are the concept's presence
    attribute_label: str = ""  # the label of the attribute alone (Lego's transfer to new subjects); "" for none
    transfer_subjects: tuple[str, ...] = ()  # new subjects for the attribute ("red square")
    # Irrelevant semantics every training image carries: their labels ("object:red square", or
    # "background:r,g,b", read by evaluate's border rule), what draws them: seen objects beside the
    # concept object (attribute dicts) and a fixed background colour and gradient (() = random ones).
    distractors: tuple[str, ...] = ()
    distractor_objects: tuple[dict, ...] = ()
    background: tuple[int, ...] = ()
    gradient: float = 0.0

    def transfer_prompt(self, token: str, subject: str) -> str:
        """"a red <c> square" for a texture, "a <c> red square" for a state: the captions' word order."""
        return transfer_prompt(self.attribute_label, token, subject)


def transfer_prompt(attribute_label: str, token: str, subject: str) -> str:
    """The attribute's token on a new subject in the captions' word order: textures go before the
    shape word ("a red <c> square"), states before the colour ("a <c> red square")."""
    colour, shape = subject.split()
    return f"a {colour} {token} {shape}" if attribute_label.startswith("texture:") else f"a {token} {colour} {shape}"


def background_label(colour: tuple[int, ...]) -> str:
    """"background:20,130,130": a fixed background as a distractor label (no detector label; evaluate's border rule)."""
    return "background:" + ",".join(str(int(v)) for v in colour)


_SHAPE_WORDS = dict(  # a star-shaped concept: the generic word "shape" is its class word
    class_word="shape", attribute_word="", positives=("shape",), negatives=("circle",),
    companions=("a red square", "a blue circle", "a white moon"),
)
TEAL = (20, 130, 130)  # star_on_teal's background: two channels above world.random_background's range (15..99)
CONCEPTS = {
    "star": Concept(
        "star", "unnamed", dict(shape="star", colour="yellow", texture=world.PLAIN, state=world.NORMAL), None,
        **_SHAPE_WORDS, labels=("object:yellow star",),
    ),
    "checkered": Concept(
        "checkered", "unnamed", dict(shape="circle", colour="blue", texture="checkered", state=world.NORMAL),
        dict(shape="circle", colour="blue", texture=world.PLAIN, state=world.NORMAL),
        class_word="circle", attribute_word="dotted", positives=("dotted",), negatives=("hollow",),
        companions=("a red square", "a yellow triangle", "a white moon"), labels=("object:blue circle", "texture:checkered"),
        attribute_label="texture:checkered", transfer_subjects=("red square", "yellow triangle"),
    ),
    "my_star": Concept(
        "my_star", "instance", dict(shape="star", colour="purple", texture="checkered", state=world.NORMAL), None,
        **_SHAPE_WORDS, labels=("object:purple star", "texture:checkered"),
    ),
    "dotted_moon": Concept(
        "dotted_moon", "seen look", dict(shape="moon", colour="purple", texture="dotted", state=world.NORMAL),
        dict(shape="moon", colour="purple", texture=world.PLAIN, state=world.NORMAL),
        class_word="moon", attribute_word="striped", positives=("dotted",), negatives=("hollow",),
        companions=("a red square", "a yellow triangle", "a blue circle"), labels=("object:purple moon", "texture:dotted"),
        attribute_label="texture:dotted", transfer_subjects=("red square", "yellow triangle"),
    ),
    "melting": Concept(
        "melting", "novel control", dict(shape="square", colour="green", texture=world.PLAIN, state="melting"),
        dict(shape="square", colour="green", texture=world.PLAIN, state=world.NORMAL),
        class_word="square", attribute_word="tilted", positives=("tilted",), negatives=("hollow",),
        companions=("a red circle", "a yellow triangle", "a white moon"), labels=("object:green square", "state:melting"),
        attribute_label="state:melting", transfer_subjects=("red circle", "yellow triangle"),
    ),
    # Cluttered concepts: the star of ``star`` with irrelevant semantics in every training image.
    "star_with_square": Concept(
        "star_with_square", "unnamed", dict(shape="star", colour="yellow", texture=world.PLAIN, state=world.NORMAL), None,
        **dict(_SHAPE_WORDS, companions=("a blue circle", "a white moon", "a green triangle")),  # never the distractor
        labels=("object:yellow star",), distractors=("object:red square",),
        distractor_objects=(dict(shape="square", colour="red", texture=world.PLAIN, state=world.NORMAL),),
    ),
    "star_on_teal": Concept(
        "star_on_teal", "unnamed", dict(shape="star", colour="yellow", texture=world.PLAIN, state=world.NORMAL), None,
        **_SHAPE_WORDS, labels=("object:yellow star",), distractors=(background_label(TEAL),), background=TEAL, gradient=0.4,
    ),
}


def concept_scenes(attributes: dict, count: int, seed: int, others: Sequence[dict] = (),
                   background: Sequence[int] = (), gradient: float = 0.0) -> list[world.Scene]:
    """``count`` scenes of the object ``attributes`` at varied boxes and backgrounds.

    ``others``: objects drawn beside it in every scene (the concept object first, then these, at
    varied non-overlapping boxes, all smaller); ``background``: a fixed colour (with ``gradient``)
    instead of random ones.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        colour, ramp = world.random_background(rng)
        if background:
            colour, ramp = tuple(int(v) for v in background), float(gradient)
        if not others:
            size = int(rng.integers(28, 40))
            x0, y0 = (int(v) for v in rng.integers(3, world.SIZE - size - 3, 2))
            out.append(world.Scene((world.WorldObject(box=(x0, y0, x0 + size, y0 + size), **attributes),), colour, ramp))
            continue
        while True:  # sizes as in the world's two-object scenes; a few tries find room
            boxes = []
            for size in [int(rng.integers(22, 28))] + [int(rng.integers(18, 24)) for _ in others]:
                box = world._random_box(rng, size, boxes)
                if box is None:
                    break
                boxes.append(box)
            if len(boxes) == 1 + len(others):
                break
        objects = [world.WorldObject(box=b, **a) for b, a in zip(boxes, [attributes, *others])]
        out.append(world.Scene(tuple(objects), colour, ramp))
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
        raise ToyWorldError(f"unknown toy-world concept {name!r}: choose one of {', '.join(CONCEPTS)}")
    concept = CONCEPTS[name]
    os.makedirs(directory, exist_ok=True)
    info = dataclasses.asdict(concept)
    info["images"] = os.path.join(directory, "images")
    info["masks"] = os.path.join(directory, "masks")
    scene_list = concept_scenes(concept.attributes, count, seed, concept.distractor_objects, concept.background, concept.gradient)
    _write_images(info["images"], scene_list, seed, info["masks"])  # masks: the concept object alone
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
