"""Measures the toy world: does the model follow prompts, and did a run learn its held-out concept?

The detector (trained on the world, where ground truth is known) reads every generated
image. For a learned concept, each prompt composes it with one of the world's objects
("a <c> and a red square") and reports:

- concept: the fraction of samples where the detector finds the held-out attribute
  (the concept-of-interest likelihood),
- companion: the fraction where it finds the other prompted object (text alignment),
- image alignment: the mean cosine between the samples' detector features and those of
  the concept's training images (the toy analogue of CLIP-I / DINO scores).

A random token of the vocabulary's mean norm, sampled with the same prompts and seeds, is
the baseline every number is read against.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from jax_inversion.checkpoints import read_run
from jax_inversion.conditioning import input_embedding_table
from jax_inversion.data import list_concept_images
from jax_inversion.loading import load_pretrained
from jax_inversion.sampling import LearnedTokens, SampleRequest, generate, tokens_from_run
from jax_inversion.toyworld import ToyWorldError, world
from jax_inversion.toyworld.concepts import read_concept
from jax_inversion.toyworld.detector import Detector, load_detector


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    images_per_prompt: int = 8
    steps: int = 25
    guidance: float = 5.0
    scheduler: str = "ddim"
    seed: int = 0


@dataclasses.dataclass
class PromptScore:
    prompt: str
    concept: float  # fraction of samples with the held-out concept
    companion: Optional[float]  # fraction with the other prompted object (None: no other object)
    image_alignment: float
    images: np.ndarray


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
    return float(np.mean(a @ b.T))


def object_label(phrase: str) -> str:
    """"a red square" -> "object:red square" (the detector's colour-and-shape label)."""
    words = phrase.split()
    return f"object:{words[-2]} {words[-1]}"


def reference_features(detector: Detector, image_dir: str) -> np.ndarray:
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((world.SIZE, world.SIZE))) for p in list_concept_images(image_dir)])
    return detector(images)[1]


def score_concept(model, detector: Detector, learned: LearnedTokens, token_text: str, concept: dict,
                  settings: EvalSettings, cache: Optional[dict] = None) -> list[PromptScore]:
    """One :class:`PromptScore` for the concept alone and one per companion object."""
    reference = reference_features(detector, concept["images"])
    label = detector.index(concept["label"])
    prompts = [(f"a {token_text}", None)] + [(f"a {token_text} and {c}", c) for c in concept["companions"]]
    scores = []
    for prompt, companion in prompts:
        request = SampleRequest(prompt=prompt, num_images=settings.images_per_prompt, steps=settings.steps,
                                guidance=settings.guidance, scheduler=settings.scheduler, seed=settings.seed)
        images = generate(model, learned, request, cache=cache).images
        probs, features = detector(images)
        companion_rate = None
        if companion is not None:
            companion_rate = float(np.mean(probs[:, detector.index(object_label(companion))] > 0.5))
        scores.append(PromptScore(prompt, float(np.mean(probs[:, label] > 0.5)), companion_rate, _cosine(features, reference), images))
    return scores


def random_tokens(model, learned: LearnedTokens, seed: int = 0) -> LearnedTokens:
    """The same placeholders with random rows of the vocabulary's mean norm: the baseline."""
    table = input_embedding_table(model, "text_encoder")
    n = len(learned.tokens)
    rows = np.random.default_rng(seed).standard_normal((n, table.shape[1])).astype(np.float32)
    rows *= np.linalg.norm(table, axis=1).mean() / np.linalg.norm(rows, axis=1, keepdims=True)
    return LearnedTokens(dict(learned.placeholders), {"text_encoder": rows}, learned.num_train_timesteps)


def summary(scores: Sequence[PromptScore]) -> dict:
    companions = [s.companion for s in scores if s.companion is not None]
    return {
        "concept": float(np.mean([s.concept for s in scores])),
        "companion": float(np.mean(companions)) if companions else float("nan"),
        "image_alignment": float(np.mean([s.image_alignment for s in scores])),
    }


def run_concept(workdir: str) -> tuple[str, LearnedTokens, dict, str]:
    """(model path, learned tokens, concept info, prompt text of the tokens) of a toy-world run."""
    _, _, meta = read_run(workdir)
    if meta.get("concept_batch"):
        raise ToyWorldError(f"{workdir} is a batch-inversion run: evaluate one concept per run (train each with its own --workdir)")
    concept_dir = meta.get("config", {}).get("data", {}).get("concept_dir", "")
    concept = read_concept(concept_dir) if concept_dir else None
    if concept is None:
        raise ToyWorldError(f"{workdir} was not trained on a toy-world concept folder (no concept.json beside "
                        f"{concept_dir or 'its images'}): train on a folder written by `jax-inversion toyworld concepts`")
    model_path, learned = tokens_from_run(workdir)
    token_text = " ".join(learned.placeholders)  # Lego: "<subj> <cpt>", in row order
    return model_path, learned, concept, token_text


def no_learned_tokens(model) -> LearnedTokens:
    """A placeholder no prompt names: sampling with it is sampling the model as it was pretrained."""
    return LearnedTokens({"<unused>": ["<unused>"]}, {"text_encoder": np.zeros((1, model.text_encoder.config.hidden_size), np.float32)})


def prompt_following(model, detector: Detector, num_prompts: int = 24, images_per_prompt: int = 4,
                     settings: EvalSettings = EvalSettings(), seed: int = 1234) -> dict:
    """Fraction of samples of seen-vocabulary captions in which the detector finds each prompted object.

    Captions are fresh scenes of the seen world (one or two objects); an object counts as found
    when the detector's colour-and-shape label for it fires. Also split by one- and two-object
    captions, the rate of prompted textures/states, and, so that a detector firing on anything
    cannot pass, the rate of samples showing a colour-and-shape object the caption did not name.
    """
    scene_list = world.scenes(seed, num_prompts, world.SEEN)
    unused = no_learned_tokens(model)
    found_by_count, found_all, attributes, unprompted, cache = {1: [], 2: []}, [], [], [], {}
    object_columns = [i for i, name in enumerate(detector.labels) if name.startswith("object:")]
    for i, scene in enumerate(scene_list):
        request = SampleRequest(prompt=scene.caption, num_images=images_per_prompt, steps=settings.steps,
                                guidance=settings.guidance, scheduler=settings.scheduler, seed=settings.seed + i)
        probs, _ = detector(generate(model, unused, request, cache=cache).images)
        prompted = [f"object:{o.colour} {o.shape}" for o in scene.objects]
        hits = np.stack([probs[:, detector.index(name)] > 0.5 for name in prompted], 1)
        found_by_count[len(scene.objects)].extend(hits.reshape(-1).tolist())
        found_all.extend(hits.all(axis=1).tolist())
        others = [i for i in object_columns if detector.labels[i] not in prompted]
        unprompted.extend((probs[:, others] > 0.5).any(axis=1).tolist())
        for o in scene.objects:
            for name in (f"texture:{o.texture}", f"state:{o.state}"):
                if name in detector.labels:
                    attributes.extend((probs[:, detector.index(name)] > 0.5).tolist())
    rate = lambda found: float(np.mean(found)) if found else float("nan")
    return {
        "prompted_object_found": rate(found_by_count[1] + found_by_count[2]),
        "object_found_one_object_prompts": rate(found_by_count[1]),
        "object_found_two_object_prompts": rate(found_by_count[2]),
        "all_objects_found": float(np.mean(found_all)),
        "attribute_found": float(np.mean(attributes)) if attributes else float("nan"),
        "unprompted_object_found": float(np.mean(unprompted)),
        "samples": len(found_all),
    }


def markdown_table(rows: Sequence[tuple[str, Sequence[PromptScore]]]) -> str:
    """One line per (label, prompt) and a mean line per label."""
    lines = ["| tokens | prompt | concept found | companion found | image alignment |", "|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None or v != v else f"{v:.2f}"
    for label, scores in rows:
        for s in scores:
            lines.append(f"| {label} | {s.prompt} | {fmt(s.concept)} | {fmt(s.companion)} | {fmt(s.image_alignment)} |")
        m = summary(scores)
        lines.append(f"| **{label}** | **mean** | **{fmt(m['concept'])}** | **{fmt(m['companion'])}** | **{fmt(m['image_alignment'])}** |")
    return "\n".join(lines)


def load_model(path: str):
    return load_pretrained(path)


def detector_or_error(path: str) -> Detector:
    if not os.path.exists(os.path.join(path, "detector.safetensors")):
        raise ToyWorldError(f"no detector at {path}: pass --detector DIR (written by `jax-inversion toyworld pretrain`)")
    return load_detector(path)
