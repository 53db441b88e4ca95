"""Measures the toy world: does the model follow prompts, and did a run learn its concept?

The detector (trained on the world, where ground truth is known) reads every generated
image. A learned concept is sampled in three kinds of prompt, each read per sample:

- identity, "a <c>": concept found (every detector label of the concept fires: the
  concept-of-interest likelihood) and image alignment (cosine of the sample's detector
  features to the concept's training images: the toy CLIP-I / DINO score);
- composition, "a <c> and a red square": concept found, companion found (the other prompted
  object: text alignment) and both in the same sample;
- transfer, Lego's own test, for a texture or state: "a red <c> square" with the concept's
  token alone on a new subject; attribute found, the new subject found, and leakage: the
  training subject's colour or shape showing up.

A cluttered concept's training images also carry irrelevant semantics (``distractors`` in
concept.json); identity and composition samples are read for them too: distractor found when
any shows (an object label: the detector's probability > 0.5, a prompted companion excepted; a
``background:r,g,b``: :func:`shows_background`'s border rule), i.e. the token learned the clutter.

Every rate comes with a 95% percentile-bootstrap interval over its samples. A random token
of the vocabulary's mean norm, sampled with the same prompts and seeds, is the baseline.
"""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from jax_inversion.artifacts.checkpoints import read_run
from jax_inversion.data.images import list_concept_images
from jax_inversion.models.loading import load_pretrained
from jax_inversion.sampling.generate import LearnedTokens, SampleRequest, generate, tokens_from_run
from jax_inversion.text.conditioning import input_embedding_table
from jax_inversion.toyworld import ToyWorldError, world
from jax_inversion.toyworld.concepts import read_concept, transfer_prompt
from jax_inversion.toyworld.detector import Detector, load_detector

KINDS = ("identity", "composition", "transfer")
MEASURES = ("concept", "companion", "both", "leakage", "alignment", "distractor")  # what PromptSamples reads per sample
BORDER = 4  # pixels: the outer frame a background is read from (objects rarely reach it)
BACKGROUND_TOLERANCE = 30.0  # RGB distance of the frame's median colour to the training background


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    images_per_prompt: int = 8
    steps: int = 25
    guidance: float = 5.0
    scheduler: str = "ddim"
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class MethodSampling:
    """How a run's method samples its concept, read from the run's config: Compositional Inversion
    prompts "S* <class word>" where it trained on them (``data.append_class_word``) and guides the
    layout of its compositions (``sampling.layout_guidance``: the paper's spatial inversion, the released
    code's boxes, both objects placed). A prompt with one object (identity, transfer) is not guided:
    there is nothing to place it against."""

    class_word: str = ""
    layout_guidance: bool = False


def method_sampling(run_config: dict) -> MethodSampling:
    """The :class:`MethodSampling` of a run trained with ``run_config`` (its config.json / metadata)."""
    data, sampling = run_config.get("data", {}), run_config.get("sampling", {})
    word = (data.get("class_word") or data.get("initializer_token") or "") if data.get("append_class_word") else ""
    return MethodSampling(word, bool(sampling.get("layout_guidance", False)))


@dataclasses.dataclass
class PromptSamples:
    """What the detector read in each sample of one prompt (bool or float arrays ``[N]``)."""

    prompt: str
    kind: str  # one of KINDS
    concept: np.ndarray  # identity/composition: every concept label; transfer: the attribute label
    alignment: np.ndarray  # cosine of the sample's features to the training images' (mean over them)
    images: np.ndarray
    companion: Optional[np.ndarray] = None  # composition: the companion object; transfer: the new subject
    leakage: Optional[np.ndarray] = None  # transfer: the training subject's colour or shape
    distractor: Optional[np.ndarray] = None  # identity/composition of a cluttered concept: any distractor shown

    @property
    def both(self) -> Optional[np.ndarray]:
        return None if self.companion is None else self.concept & self.companion


def bootstrap_interval(values: Sequence[float], resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its percentile-bootstrap interval."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def alignment(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per sample: the mean cosine of its features to the reference images' features."""
    return (_unit(features) @ _unit(reference).T).mean(axis=1)


def object_label(phrase: str) -> str:
    """"a red square" or "red square" -> "object:red square" (the detector's colour-and-shape label)."""
    words = phrase.split()
    return f"object:{words[-2]} {words[-1]}"


def border_colour(images: np.ndarray, border: int = BORDER) -> np.ndarray:
    """``[N, 3]``: per image, the per-channel median of its outer ``border``-pixel frame."""
    images = np.asarray(images, np.float64)
    frame = np.ones(images.shape[1:3], bool)
    frame[border:-border, border:-border] = False
    return np.median(images[:, frame], axis=1)


def shows_background(images: np.ndarray, colour: Sequence[float], tolerance: float = BACKGROUND_TOLERANCE) -> np.ndarray:
    """``[N]`` bool: the sample shows the background ``colour`` (the detector has no background labels).

    The rule: the median colour of the image's outer 4-pixel frame is within ``tolerance`` (Euclidean,
    0..255 RGB) of ``colour``. A median, so that an object poking into the frame does not move it; a
    top-to-bottom gradient brightens one half of the frame as much as it darkens the other, so the
    frame's median stays near the background's mid colour.
    """
    return np.linalg.norm(border_colour(images) - np.asarray(colour, np.float64), axis=-1) <= tolerance


def distractor_found(detector: Detector, probs: np.ndarray, images: np.ndarray, distractors: Sequence[str],
                     prompted: Sequence[str] = ()) -> np.ndarray:
    """``[N]`` bool: any of ``distractors`` shows (objects: probability > 0.5; ``background:r,g,b``: the border rule);
    a distractor the prompt itself names (in ``prompted``) is not counted."""
    found = np.zeros(len(images), bool)
    for label in distractors:
        if label in prompted:
            continue
        if label.startswith("background:"):
            found |= shows_background(images, [float(v) for v in label.split(":", 1)[1].split(",")])
        else:
            found |= probs[:, detector.index(label)] > 0.5
    return found


def reference_features(detector: Detector, image_dir: str) -> np.ndarray:
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((world.SIZE, world.SIZE))) for p in list_concept_images(image_dir)])
    return detector(images)[1]


def concept_prompts(concept: dict, token_text: str, transfer_token: str) -> list[tuple[str, str, Optional[str]]]:
    """(prompt, kind, companion or new subject) for the concept alone, with each companion, and on each new subject."""
    prompts = [(f"a {token_text}", "identity", None)]
    prompts += [(f"a {token_text} and {c}", "composition", c) for c in concept["companions"]]
    if concept.get("attribute_label") and transfer_token:
        attribute = concept["attribute_label"]  # from the json itself: any concept folder evaluates
        prompts += [(transfer_prompt(attribute, transfer_token, s), "transfer", s) for s in concept.get("transfer_subjects", ())]
    return prompts


def score_concept(model, detector: Detector, learned: LearnedTokens, token_text: str, concept: dict,
                  settings: EvalSettings, cache: Optional[dict] = None, transfer_token: str = "",
                  samples: Optional[dict] = None, kinds: Sequence[str] = KINDS,
                  sampling: MethodSampling = MethodSampling()) -> list[PromptSamples]:
    """One :class:`PromptSamples` per prompt of :func:`concept_prompts` whose kind is in ``kinds``.

    ``samples`` maps a kind to its images per prompt (default ``settings.images_per_prompt``);
    transfer prompts need ``transfer_token``, the concept's token alone (Lego: without ``<subj>``).
    ``sampling``: the run's method's own way of sampling (:func:`method_sampling`).
    """
    reference = reference_features(detector, concept["images"])
    labels = [detector.index(name) for name in concept["labels"]]
    subject = concept.get("subject") or {}
    distractors = list(concept.get("distractors") or [])
    leak_labels = [detector.index(f"colour:{subject['colour']}"), detector.index(f"shape:{subject['shape']}")] if subject else []
    out = []
    named = f"{token_text} {sampling.class_word}" if sampling.class_word else token_text
    for prompt, kind, other in concept_prompts(concept, named, transfer_token):
        if kind not in kinds:
            continue
        request = SampleRequest(prompt=prompt, num_images=(samples or {}).get(kind, settings.images_per_prompt), steps=settings.steps,
                                guidance=settings.guidance, scheduler=settings.scheduler, seed=settings.seed,
                                layout_guidance=sampling.layout_guidance and kind == "composition")
        images = generate(model, learned, request, cache=cache).images
        probs, features = detector(images)
        found = probs > 0.5
        score = PromptSamples(prompt, kind, found[:, labels].all(axis=1), alignment(features, reference), images)
        if kind == "composition":
            score.companion = found[:, detector.index(object_label(other))]
        if kind in ("identity", "composition") and distractors:
            score.distractor = distractor_found(detector, probs, images, distractors, [object_label(other)] if other else [])
        elif kind == "transfer":
            score.concept = found[:, detector.index(concept["attribute_label"])]
            score.companion = found[:, detector.index(object_label(other))]
            score.leakage = found[:, leak_labels].any(axis=1)
        out.append(score)
    return out


def pooled_reads(scores: Sequence[PromptSamples]) -> dict:
    """Per kind, each measure's per-sample reads over the kind's prompts: ``{"identity/concept": float64 [N], ...}``."""
    out = {}
    for kind in KINDS:
        group = [s for s in scores if s.kind == kind]
        for measure in MEASURES:
            parts = [getattr(s, measure) for s in group]
            if parts and all(p is not None for p in parts):
                out[f"{kind}/{measure}"] = np.concatenate(parts).astype(np.float64)
    return out


def summary(scores: Sequence[PromptSamples]) -> dict:
    """Each of :func:`pooled_reads` as its (mean, low, high) bootstrap interval."""
    return {key: bootstrap_interval(values) for key, values in pooled_reads(scores).items()}


def fmt_interval(value: Optional[tuple], digits: int = 2) -> str:
    if value is None or value[0] != value[0]:
        return "-"
    return f"{value[0]:.{digits}f} [{value[1]:.{digits}f}, {value[2]:.{digits}f}]"


def markdown_table(rows: Sequence[tuple[str, Sequence[PromptSamples]]]) -> str:
    """One line per (label, prompt), then per label a pooled line per kind; cells are mean [95% interval]."""
    measures = [m for m in MEASURES if m != "distractor"]
    header = "| tokens | prompt | samples | concept found | companion found | both | leakage | image alignment |"
    if any(s.distractor is not None for _, scores in rows for s in scores):  # a cluttered concept: one more column
        measures.append("distractor")
        header += " distractor found |"
    lines = [header, "|" + "---|" * (3 + len(measures))]
    line = lambda label, prompt, n, cells: f"| {label} | {prompt} | {n} | " + " | ".join(
        fmt_interval(c, 3 if m == "alignment" else 2) for m, c in zip(measures, cells)) + " |"
    for label, scores in rows:
        for s in scores:
            reads = [getattr(s, m) for m in measures]
            lines.append(line(label, s.prompt, len(s.concept), [None if v is None else bootstrap_interval(v) for v in reads]))
        pooled = summary(scores)
        for kind in KINDS:
            if f"{kind}/concept" in pooled:
                n = sum(len(s.concept) for s in scores if s.kind == kind)
                lines.append(line(f"**{label}**", f"**all {kind}**", n, [pooled.get(f"{kind}/{m}") for m in measures]))
    return "\n".join(lines)


def random_tokens(model, learned: LearnedTokens, seed: int = 0) -> LearnedTokens:
    """The same placeholders with random rows of the vocabulary's mean norm: the baseline."""
    table = input_embedding_table(model, "text_encoder")
    n = len(learned.tokens)
    rows = np.random.default_rng(seed).standard_normal((n, table.shape[1])).astype(np.float32)
    rows *= np.linalg.norm(table, axis=1).mean() / np.linalg.norm(rows, axis=1, keepdims=True)
    return LearnedTokens(dict(learned.placeholders), {"text_encoder": rows}, learned.num_train_timesteps)


class Run(NamedTuple):
    model_path: str
    learned: LearnedTokens
    concept: dict  # concept.json
    token_text: str  # every placeholder of the run in row order (Lego: "<subj> <c>")
    concept_token: str  # the concept's own placeholder (what moves to new subjects)
    sampling: MethodSampling  # how the run's method samples it


def run_concept(workdir: str) -> Run:
    """What evaluation needs of a toy-world run: its model, tokens and concept."""
    _, _, meta = read_run(workdir)
    if meta.get("concept_batch"):
        raise ToyWorldError(f"{workdir} is a batch-inversion run: evaluate one concept per run (train each with its own --workdir)")
    data = meta.get("config", {}).get("data", {})
    concept_dir = data.get("concept_dir", "")
    concept = read_concept(concept_dir) if concept_dir else None
    if concept is None:
        raise ToyWorldError(f"{workdir} was not trained on a toy-world concept folder (no concept.json beside "
                        f"{concept_dir or 'its images'}): train on a folder written by `jax-inversion toyworld concepts`")
    model_path, learned = tokens_from_run(workdir)
    placeholder = data.get("placeholder_token", "")
    own = placeholder if placeholder in learned.placeholders else list(learned.placeholders)[-1]
    return Run(model_path, learned, concept, " ".join(learned.placeholders), own, method_sampling(meta.get("config", {})))


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


def load_model(path: str):
    return load_pretrained(path)


def detector_or_error(path: str) -> Detector:
    if not os.path.exists(os.path.join(path, "detector.safetensors")):
        raise ToyWorldError(f"no detector at {path}: pass --detector DIR (written by `jax-inversion toyworld pretrain`)")
    return load_detector(path)
