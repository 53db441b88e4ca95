"""``jax-inversion toyworld {pretrain,concepts,eval}``: the offline toy world.

    jax-inversion toyworld pretrain --workdir DIR        # VAE, then text encoder + UNet, then the detector
    jax-inversion toyworld concepts --out DIR            # concept folders (images, masks, subject)
    jax-inversion toyworld eval                          # does the model follow seen-vocabulary prompts?
    jax-inversion toyworld eval --workdir RUN            # the run's concept composed with other objects
"""
from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(__file__)), "toyworld", "config.py"),
    "pretraining config (pretrain only)", lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "pretrain: output directory; eval: a run trained on a toy-world concept")
_OUT = flags.DEFINE_string("out", None, "concepts: where the concept folders go; eval: where the table and sample grid go")
_NAMES = flags.DEFINE_list("names", ["star", "checkered", "my_star", "dotted_moon", "melting"], "concepts: which concepts to write")
_COUNT = flags.DEFINE_integer("count", 8, "concepts: images per concept")
_MODEL = flags.DEFINE_string("model", None, "eval: the model (default: the run's, or the shipped toy model)")
_DETECTOR = flags.DEFINE_string("detector", None, "eval: the detector directory (default: the shipped one)")
_IMAGES = flags.DEFINE_integer("images_per_prompt", 32, "eval: samples per prompt (the bootstrap intervals need a few dozen)")
_STEPS = flags.DEFINE_integer("steps", 25, "eval: sampler steps")
_GUIDANCE = flags.DEFINE_float("guidance", 5.0, "eval: classifier-free guidance scale")
_PROMPTS = flags.DEFINE_integer("num_prompts", 24, "eval without --workdir: seen-vocabulary captions to sample")

SUBCOMMANDS = ("pretrain", "concepts", "eval")


def main(argv) -> None:
    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        sys.exit(f"toyworld: give one subcommand, {', '.join(SUBCOMMANDS)} (got {argv[1:]}); e.g. jax-inversion toyworld eval")
    from jax_inversion.commands.runtime import user_errors

    with user_errors(f"toyworld {argv[1]}"):
        {"pretrain": _pretrain, "concepts": _concepts, "eval": _eval}[argv[1]]()


def _pretrain() -> None:
    if not _WORKDIR.value:
        sys.exit("toyworld pretrain: --workdir is required: pass --workdir=DIR for the model, detector and log")
    from jax_inversion.toyworld.pretrain import pretrain

    out = pretrain(_CONFIG.value, _WORKDIR.value)
    for name, path in out.items():
        print(f"{name}: {path}")
    print("(ship them by copying into jax_inversion/toyworld/pretrained/)")


def _concepts() -> None:
    if not _OUT.value:
        sys.exit("toyworld concepts: --out is required: pass --out=DIR for the concept folders")
    from jax_inversion.toyworld.concepts import write_concept

    for name in _NAMES.value:
        info = write_concept(name, os.path.join(_OUT.value, name), count=_COUNT.value)
        print(f"{name}: images {info['images']}, masks {info['masks']}" + (f", subject {info['subject_images']}" if "subject_images" in info else ""))


def _eval() -> None:
    from jax_inversion import toyworld
    from jax_inversion.toyworld import evaluate as ev

    settings = ev.EvalSettings(images_per_prompt=_IMAGES.value, steps=_STEPS.value, guidance=_GUIDANCE.value)
    detector = ev.detector_or_error(_DETECTOR.value or toyworld.SHIPPED_DETECTOR)
    if not _WORKDIR.value:
        model = ev.load_model(_MODEL.value or toyworld.SHIPPED_MODEL)
        result = ev.prompt_following(model, detector, num_prompts=_PROMPTS.value, images_per_prompt=_IMAGES.value, settings=settings)
        print(f"model {model.path}: {result['samples']} samples of {_PROMPTS.value} seen-vocabulary captions")
        print(f"  prompted object found (per object): {result['prompted_object_found']:.3f}")
        print(f"    in one-object captions:            {result['object_found_one_object_prompts']:.3f}")
        print(f"    in two-object captions:            {result['object_found_two_object_prompts']:.3f}")
        print(f"  every prompted object found:        {result['all_objects_found']:.3f}")
        print(f"  prompted texture/state found:       {result['attribute_found']:.3f}")
        print(f"  an object the caption did not name: {result['unprompted_object_found']:.3f}")
        return
    model_path, learned, concept, token_text, transfer, sampling = ev.run_concept(_WORKDIR.value)
    model = ev.load_model(_MODEL.value or model_path)
    cache = {}
    learned_scores = ev.score_concept(model, detector, learned, token_text, concept, settings, cache, transfer, sampling=sampling)
    baseline = ev.score_concept(model, detector, ev.random_tokens(model, learned), token_text, concept, settings, cache, transfer,
                                sampling=sampling)
    table = ev.markdown_table([("learned", learned_scores), ("random token", baseline)])
    print(f"concept {concept['name']} ({concept['status']}; found = {' and '.join(concept['labels'])}), "
          f"{settings.images_per_prompt} samples per prompt; cells: mean [95% bootstrap interval]\n")
    print(table)
    out = _OUT.value or os.path.join(_WORKDIR.value, "toyworld_eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    from jax_inversion.sampling.generate import image_grid, save_png
    import numpy as np

    grid = image_grid(np.concatenate([s.images for s in learned_scores]), columns=settings.images_per_prompt)
    path = save_png(os.path.join(out, "samples.png"), grid, {"prompts": " | ".join(s.prompt for s in learned_scores)})
    print(f"\ntable: {os.path.join(out, 'table.md')}; samples: {path}")
