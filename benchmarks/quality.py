"""Method quality on the toy world's held-out concepts: TI vs Lego vs Compositional vs SeFi-IDE.

    python -m benchmarks.quality [--steps 300] [--concepts star,checkered,melting] [--out benchmarks/results]

Every method learns every held-out concept from the same images with the same seed, step
budget and batch, on the shipped toy model; each run is then sampled with the same
prompts and seeds ("a <c>", "a <c> and a red square", ...) and read by the world's
detector (:mod:`jax_inversion.toyworld.evaluate`). A random token of the vocabulary's mean
norm is the baseline. Writes ``quality.md`` (the table) and ``quality.png`` (samples).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

METHODS = ("ti", "lego", "compositional_anchor", "compositional_anchor_location", "sefi")


def run_fingerprint(model: str, steps: int, seed: int, learning_rate: float) -> dict:
    """What a finished run was trained from: its model's weights (by content) and the budget."""
    import hashlib

    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(model)):
        for name in sorted(files):
            if name.endswith(".safetensors"):
                with open(os.path.join(root, name), "rb") as f:
                    digest.update(f.read())
    return {"model": os.path.abspath(model), "weights_sha256": digest.hexdigest(), "steps": steps, "seed": seed,
            "learning_rate": learning_rate}


def finished_run(workdir: str, fingerprint: dict) -> bool:
    """True when ``workdir`` holds a run finished on the same model and budget.

    A run begun on another model or budget (``fingerprint.json`` differs) is removed, so that
    neither its results nor its checkpoint are reused; one interrupted part-way on the same
    ones resumes from its checkpoint.
    """
    import shutil

    stamp = os.path.join(workdir, "fingerprint.json")
    if os.path.exists(workdir):
        same = False
        if os.path.exists(stamp):
            with open(stamp) as f:
                same = json.load(f) == fingerprint
        if not same:
            print(f"{workdir} was begun on another model or budget: training it again", flush=True)
            shutil.rmtree(workdir)
    if os.path.exists(os.path.join(workdir, "trained.json")):
        return True
    os.makedirs(workdir, exist_ok=True)
    with open(stamp, "w") as f:
        json.dump(fingerprint, f)
    return False


def method_config(method: str, concept: dict, model: str, steps: int, seed: int, learning_rate: float):
    """The method's own config with the toy world's data, prompts and word lists filled in."""
    from jax_inversion.configs import compositional, lego, sefi, ti
    from jax_inversion.default_job import TOY_TEMPLATES
    from jax_inversion.toyworld import world

    if method == "ti":
        config = ti.get_config()
    elif method == "lego":
        config = lego.get_config()
        if concept.get("subject_images"):
            config.data.subject_dir = concept["subject_images"]
            config.data.subject_initializer_token = concept["class_word"]
            config.train.subject_steps = steps
        else:  # a new shape has no separate subject: Lego is TI + its context loss here
            config.data.subject_token = ""
            config.train.subject_steps = 0
        config.loss_options.context.positives = [list(concept["positives"])]
        config.loss_options.context.negatives = [list(concept["negatives"])]
    elif method.startswith("compositional"):
        config = compositional.get_config("paper,location" if method.endswith("location") else "paper")
        config.loss_options.anchor.words = tuple(world.SEEN.words)
        config.data.mask_dir = concept["masks"]
    elif method == "sefi":
        config = sefi.get_config()
        config.data.class_word = concept["class_word"]
    else:
        raise ValueError(f"unknown method {method!r}: use {', '.join(METHODS)}")
    config.model = model
    config.seed = seed
    config.data.concept_dir = concept["images"]
    config.data.placeholder_token = "<c>"
    config.data.initializer_token = concept["positives"][0] if method == "lego" and concept.get("subject_images") else concept["class_word"]
    config.data.templates = TOY_TEMPLATES
    config.train.num_steps = steps
    config.train.batch_size = 8
    config.train.learning_rate = learning_rate
    config.train.log_every = 50
    config.train.checkpoint_every = steps
    return config


def figure(rows: list[tuple[str, list[np.ndarray]]], header: list[str], path: str) -> None:
    """Rows of samples with the method name on the left and each block's concept above."""
    from PIL import Image, ImageDraw

    label_width, top, size = 150, 16, 64
    blocks = rows[0][1]
    width = label_width + sum(b.shape[0] * size + 8 for b in blocks)
    canvas = Image.new("RGB", (width, top + len(rows) * size), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = label_width
    for title, block in zip(header, blocks):
        draw.text((x + 2, 2), title, fill=(0, 0, 0))
        x += block.shape[0] * size + 8
    for r, (name, blocks) in enumerate(rows):
        y = top + r * size
        draw.text((4, y + size // 2 - 6), name, fill=(0, 0, 0))
        x = label_width
        for block in blocks:
            for image in block:
                canvas.paste(Image.fromarray(image), (x, y))
                x += size
            x += 8
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300, help="concept-phase steps per method (Lego's subject phase adds as many)")
    parser.add_argument("--learning_rate", type=float, default=5e-3, help="base rate, times the batch (the configs' scale_lr)")
    parser.add_argument("--concepts", default="star,checkered,melting")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--images_per_prompt", type=int, default=8)
    parser.add_argument("--sample_steps", type=int, default=25, help="DDIM steps per sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="", help="default: the shipped toy model")
    parser.add_argument("--detector", default="", help="default: the shipped detector")
    parser.add_argument("--workdir", default="/tmp/quality_bench")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--train_only", action="store_true", help="train every run and stop; a later call evaluates them")
    args = parser.parse_args()

    import jax

    from jax_inversion.toyworld import SHIPPED_DETECTOR, SHIPPED_MODEL, evaluate as ev
    from jax_inversion.toyworld.concepts import write_concept
    from jax_inversion.train import train

    if jax.config.jax_compilation_cache_dir is None:  # one XLA cache for every run: same shapes, compiled once
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(args.workdir), "xla_cache"))
    model_path = args.model or SHIPPED_MODEL
    detector = None if args.train_only else ev.detector_or_error(args.detector or SHIPPED_DETECTOR)
    settings = ev.EvalSettings(images_per_prompt=args.images_per_prompt, steps=args.sample_steps, seed=args.seed)
    fingerprint = run_fingerprint(model_path, args.steps, args.seed, args.learning_rate)
    concepts = [write_concept(name, os.path.join(args.workdir, "concepts", name), seed=args.seed) for name in args.concepts.split(",")]
    methods = args.methods.split(",")
    results, samples, cache = {}, {}, {}
    for concept in concepts:
        for method in methods:
            workdir = os.path.join(args.workdir, "runs", f"{concept['name']}_{method}")
            if not finished_run(workdir, fingerprint):
                started = time.time()
                train(method_config(method, concept, model_path, args.steps, args.seed, args.learning_rate), workdir)
                record = {"trained": os.path.basename(workdir), "seconds": round(time.time() - started, 1)}
                with open(os.path.join(workdir, "trained.json"), "w") as f:
                    json.dump(record, f)
                print(json.dumps(record), flush=True)
            if args.train_only:
                continue
            _, learned, _, token_text = ev.run_concept(workdir)
            model = ev.load_model(model_path)  # a fresh tokenizer: each run adds its own placeholders
            scores = ev.score_concept(model, detector, learned, token_text, concept, settings, cache)
            results[(concept["name"], method)] = ev.summary(scores)
            samples[(concept["name"], method)] = [scores[0].images[:3], scores[1].images[:3]]
            print(json.dumps({"concept": concept["name"], "method": method, **results[(concept["name"], method)]}), flush=True)
        if args.train_only:
            continue
        _, learned, _, _ = ev.run_concept(os.path.join(args.workdir, "runs", f"{concept['name']}_{methods[0]}"))
        model = ev.load_model(model_path)
        baseline = ev.random_tokens(model, learned, seed=args.seed)
        text = " ".join(baseline.placeholders)
        scores = ev.score_concept(model, detector, baseline, text, concept, settings, cache)
        results[(concept["name"], "random token")] = ev.summary(scores)
        samples[(concept["name"], "random token")] = [scores[0].images[:3], scores[1].images[:3]]

    if args.train_only:
        return
    names = [c["name"] for c in concepts]
    rows = methods + ["random token"]
    for concept in concepts:  # the figure's first row: the concept's own training images
        from jax_inversion.data import list_concept_images
        from PIL import Image

        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in list_concept_images(concept["images"])[:6]])
        samples[(concept["name"], "training images")] = [images[:3], images[3:6]]
    device = jax.devices()[0]
    lines = [
        f"Toy world, {len(names)} held-out concepts, {args.steps} concept steps per method (batch 8, lr {args.learning_rate} x 8, seed {args.seed}),",
        f"{settings.images_per_prompt} samples per prompt x {1 + len(concepts[0]['companions'])} prompts, DDIM {settings.steps} steps, guidance {settings.guidance};",
        f"device: {device.platform} ({device.device_kind}), {len(jax.devices())} device(s).",
        "Columns per concept: concept found / companion found / image alignment (detector features, cosine).",
        "",
        "| method | " + " | ".join(names) + " | mean |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for method in rows:
        cells = [results[(n, method)] for n in names]
        fmt = lambda m: f"{m['concept']:.2f} / {m['companion']:.2f} / {m['image_alignment']:.3f}"
        mean = {k: float(np.mean([c[k] for c in cells])) for k in cells[0]}
        lines.append(f"| {method} | " + " | ".join(fmt(c) for c in cells) + f" | {fmt(mean)} |")
    os.makedirs(args.out, exist_ok=True)
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(table)
    header = [f"{n}: 'a <c>' | 'a <c> and {concepts[i]['companions'][0][2:]}'" for i, n in enumerate(names)]
    figure([(m, [np.concatenate(samples[(n, m)]) for n in names]) for m in ["training images"] + rows], header,
           os.path.join(args.out, "quality.png"))
    print(table)
    print(f"wrote {os.path.join(args.out, 'quality.md')} and {os.path.join(args.out, 'quality.png')}")


if __name__ == "__main__":
    main()
