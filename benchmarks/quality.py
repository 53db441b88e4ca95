"""Method quality on the toy world's concepts: TI vs Lego vs Compositional vs SeFi-IDE.

    python -m benchmarks.quality                      # CPU budget: every method x concept, then TI's budget sweep
    python -m benchmarks.quality --budget paper       # each method's own (paper) step count: for a GPU
    python -m benchmarks.quality --concepts star --methods ti --no_sweep

Every method learns every concept (:data:`jax_inversion.toyworld.concepts.CONCEPTS`) from the
same images with the same seed and batch, on the shipped toy model; each run is then sampled
with the same prompts and seeds and read by the world's detector
(:mod:`jax_inversion.toyworld.evaluate`): identity ("a <c>", 32 samples), composition ("a <c> and
a red square", ...: 32 samples over the companions) and, for textures and states, Lego's
transfer to new subjects (32 samples). A random token of the vocabulary's mean norm is the
baseline. Plain TI is also run over a grid of steps x learning rates on one concept, to show
where its identity-editability curve bends. Writes ``quality.md`` (tables with 95% bootstrap
intervals), ``quality.json``, ``quality.png`` (samples) and ``quality_plane.png`` (each method on
the identity-editability plane).
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
    """The method's own config with the toy world's data, prompts and word lists filled in; ``steps=0``: the config's own."""
    from jax_inversion.configs import compositional, lego, sefi, ti
    from jax_inversion.commands.default_job import TOY_TEMPLATES
    from jax_inversion.toyworld import world

    if method == "ti":
        config = ti.get_config()
    elif method == "lego":
        config = lego.get_config()
        if concept.get("subject_images"):
            config.data.subject_dir = concept["subject_images"]
            config.data.subject_initializer_token = concept["class_word"]
            config.train.subject_steps = steps or config.train.subject_steps
        else:  # a concept with no separable subject: Lego is TI + its context loss here
            config.data.subject_token = ""
            config.train.subject_steps = 0
        config.loss_options.context.positives = [list(concept["positives"])]
        config.loss_options.context.negatives = [list(concept["negatives"])]
    elif method.startswith("compositional"):
        config = compositional.get_config("paper,location" if method.endswith("location") else "paper")
        config.loss_options.anchor.words = world.SEEN.words + world.UNNAMED_WORDS  # every caption word of the shipped model's world
        config.data.mask_dir = concept["masks"]
    elif method == "sefi":
        config = sefi.get_config()
        config.data.class_word = concept["class_word"]
    else:
        raise ValueError(f"unknown method {method!r}: use {', '.join(METHODS)}")
    config = ti.resolve_unset(config)  # the config's own steps where steps=0 (ti.py's 5,000 when it sets none)
    config.model = model
    config.seed = seed
    config.data.concept_dir = concept["images"]
    config.data.placeholder_token = "<c>"
    with_subject = method == "lego" and concept.get("subject_images")
    config.data.initializer_token = concept["attribute_word"] if with_subject else concept["class_word"]
    config.data.templates = TOY_TEMPLATES
    config.train.num_steps = steps or config.train.num_steps
    config.train.batch_size = 8
    config.train.learning_rate = learning_rate
    config.train.log_every = 50
    config.train.checkpoint_every = config.train.num_steps
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


SAMPLES = {"identity": 32, "composition": 16, "transfer": 16}  # per prompt: 32 per kind over 2 companions / subjects
COMPANIONS = 2  # companions (and new subjects) per concept in the benchmark


def trained(workdir: str, config, fingerprint: dict) -> None:
    """Trains ``config`` into ``workdir`` unless a finished run of the same model and budget is there."""
    from jax_inversion.training.train import train

    if finished_run(workdir, fingerprint):
        return
    started = time.time()
    train(config, workdir)
    record = {"trained": os.path.basename(workdir), "seconds": round(time.time() - started, 1)}
    with open(os.path.join(workdir, "trained.json"), "w") as f:
        json.dump(record, f)
    print(json.dumps(record), flush=True)


def evaluated(workdir: str, score) -> dict:
    """The run's summary (``evaluation.json``, kept beside the run), computed by ``score()`` once."""
    path = os.path.join(workdir, "evaluation.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = score()
    with open(path, "w") as f:
        json.dump(result, f)
    return result


def plane_figure(points: dict, path: str, x_key: str, y_key: str, x_label: str, y_label: str) -> None:
    """Each method as a point with its 95% interval bars: composition across, identity up."""
    from PIL import Image, ImageDraw

    size, margin = 420, 56
    canvas = Image.new("RGB", (size + margin + 170, size + margin + 20), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    to_xy = lambda x, y: (margin + x * size, 10 + (1 - y) * size)
    draw.rectangle((margin, 10, margin + size, 10 + size), outline=(0, 0, 0))
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = to_xy(tick, tick)
        draw.text((x - 8, 14 + size), f"{tick:.2f}", fill=(0, 0, 0))
        draw.text((4, y - 6), f"{tick:.2f}", fill=(0, 0, 0))
    draw.text((margin + size // 2 - 60, size + 30), x_label, fill=(0, 0, 0))
    draw.text((4, size + 44), y_label + " (up)", fill=(0, 0, 0))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (127, 127, 127), (23, 190, 207),
               (188, 189, 34), (140, 86, 75), (227, 119, 194), (0, 0, 0), (174, 199, 232), (255, 187, 120), (152, 223, 138),
               (255, 152, 150), (197, 176, 213)]  # tab10 + tab20's light half: one per point
    for k, (name, p) in enumerate(points.items()):
        colour = colours[k % len(colours)]
        (x, x0, x1), (y, y0, y1) = p[x_key], p[y_key]
        draw.line([to_xy(x0, y), to_xy(x1, y)], fill=colour, width=2)
        draw.line([to_xy(x, y0), to_xy(x, y1)], fill=colour, width=2)
        cx, cy = to_xy(x, y)
        draw.ellipse((cx - 5, cy - 5, cx + 5, cy + 5), fill=colour)
        draw.text((margin + size + 12, 14 + 16 * k), f"* {name}", fill=colour)
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", choices=("cpu", "paper"), default="cpu",
                        help="cpu: --steps concept steps per method; paper: each method config's own step count")
    parser.add_argument("--steps", type=int, default=300, help="cpu budget: concept-phase steps per method (Lego's subject phase adds as many)")
    parser.add_argument("--learning_rate", type=float, default=5e-3, help="base rate, times the batch (the configs' scale_lr)")
    parser.add_argument("--concepts", default="star,checkered,my_star,dotted_moon,melting")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sweep_concept", default="star", help="TI's budget sweep runs on this concept")
    parser.add_argument("--sweep_steps", default="100,300,1000")
    parser.add_argument("--sweep_learning_rates", default="1e-3,5e-3,2.5e-2", help="base rates (times the batch of 8)")
    parser.add_argument("--no_sweep", action="store_true")
    parser.add_argument("--sample_steps", type=int, default=25, help="DDIM steps per sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="", help="default: the shipped toy model")
    parser.add_argument("--detector", default="", help="default: the shipped detector")
    parser.add_argument("--workdir", default="/tmp/quality_bench")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import jax

    from jax_inversion.toyworld import SHIPPED_DETECTOR, SHIPPED_MODEL, evaluate as ev
    from jax_inversion.toyworld.concepts import write_concept

    started = time.time()
    if jax.config.jax_compilation_cache_dir is None:  # one XLA cache for every run: same shapes, compiled once
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(args.workdir), "xla_cache"))
    model_path = args.model or SHIPPED_MODEL
    detector = ev.detector_or_error(args.detector or SHIPPED_DETECTOR)
    settings = ev.EvalSettings(steps=args.sample_steps, seed=args.seed)
    concepts = {}
    for name in args.concepts.split(","):
        info = write_concept(name, os.path.join(args.workdir, "concepts", name), seed=args.seed)
        info["companions"], info["transfer_subjects"] = info["companions"][:COMPANIONS], info["transfer_subjects"][:COMPANIONS]
        concepts[name] = info
    methods = args.methods.split(",")
    cache = {}

    def score(run_dir: str, concept: dict, random_baseline: bool = False) -> dict:
        """The run's summary, the per-sample reads behind it, and the first images of each kind's first prompt."""
        model_path_, learned, _, token_text, own = ev.run_concept(run_dir)
        model = ev.load_model(model_path_)  # a fresh tokenizer: each run adds its own placeholders
        if random_baseline:
            learned = ev.random_tokens(model, learned, seed=args.seed)
        scores = ev.score_concept(model, detector, learned, token_text, concept, settings, cache, own, samples=SAMPLES)
        reads = {key: values.round(4).tolist() for key, values in ev.pooled_reads(scores).items()}
        first = {}
        for s in scores:
            first.setdefault(s.kind, s.images[:4].tolist())
        return {"summary": ev.summary(scores), "reads": reads, "images": first}

    results, samples, reads = {}, {}, {}
    budget = lambda method: 0 if args.budget == "paper" else args.steps
    for name, concept in concepts.items():
        for method in methods + ["random token"]:
            random = method == "random token"  # the first method's run, its rows replaced by a random token
            run_method = methods[0] if random else method
            workdir = os.path.join(args.workdir, "runs", f"{name}_{run_method}")
            config = method_config(run_method, concept, model_path, budget(run_method), args.seed, args.learning_rate)
            trained(workdir, config, run_fingerprint(model_path, config.train.num_steps, args.seed, args.learning_rate))
            record = evaluated(_ensure(workdir + "_random") if random else workdir, lambda: score(workdir, concept, random))
            results[(name, method)] = record["summary"]
            reads[(name, method)] = record["reads"]
            samples[(name, method)] = {k: np.asarray(v, np.uint8) for k, v in record["images"].items()}
            print(json.dumps({"concept": name, "method": method, "identity": record["summary"]["identity/concept"],
                              "companion": record["summary"].get("composition/companion")}), flush=True)

    sweep = {}
    if not args.no_sweep:
        if args.sweep_concept not in concepts:
            raise SystemExit(f"--sweep_concept {args.sweep_concept} is not among --concepts: add it, or pass --no_sweep")
        concept = concepts[args.sweep_concept]
        for steps in [int(v) for v in args.sweep_steps.split(",")]:
            for lr in [float(v) for v in args.sweep_learning_rates.split(",")]:
                workdir = os.path.join(args.workdir, "sweep", f"{args.sweep_concept}_ti_{steps}_{lr:g}")
                if args.budget == "cpu" and (steps, lr) == (args.steps, args.learning_rate) and "ti" in methods:
                    workdir = os.path.join(args.workdir, "runs", f"{args.sweep_concept}_ti")  # the table's own run
                config = method_config("ti", concept, model_path, steps, args.seed, lr)
                trained(workdir, config, run_fingerprint(model_path, steps, args.seed, lr))
                sweep[(steps, lr)] = evaluated(workdir, lambda: score(workdir, concept))["summary"]
                print(json.dumps({"sweep": [steps, lr], "identity": sweep[(steps, lr)]["identity/concept"],
                                  "companion": sweep[(steps, lr)]["composition/companion"]}), flush=True)

    device = jax.devices()[0]
    minutes = (time.time() - started) / 60
    write_report(args, concepts, methods + ["random token"], results, reads, samples, sweep, settings,
                 f"{device.platform} ({device.device_kind}), {len(jax.devices())} device(s)", minutes)


def _ensure(directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    return directory


def write_report(args, concepts: dict, rows: list, results: dict, reads: dict, samples: dict, sweep: dict, settings, device: str,
                 minutes: float) -> None:
    """quality.md, quality.json, quality.png and quality_plane.png under ``args.out``."""
    from jax_inversion.toyworld import evaluate as ev

    names = list(concepts)
    f = ev.fmt_interval
    budget = f"{args.steps} concept steps per method (Lego: as many subject steps first)" if args.budget == "cpu" else "each method config's own steps"
    lines = [
        f"Toy world, shipped model; {budget}; batch 8, lr {args.learning_rate} x 8, seed {args.seed}.",
        f"Samples per cell: identity 'a <c>' {SAMPLES['identity']}; composition {COMPANIONS} companions x {SAMPLES['composition']}; "
        f"transfer {COMPANIONS} new subjects x {SAMPLES['transfer']}. DDIM {settings.steps} steps, guidance {settings.guidance}.",
        f"Device: {device}; the whole benchmark took {minutes:.1f} min. Cells: mean [95% bootstrap interval].",
        "",
    ]
    for name in names:
        c = concepts[name]
        lines += [f"### {name} ({c['status']}): found = {' and '.join(c['labels'])}", "",
                  "| method | identity: found | image alignment | composition: found | companion | both | transfer: attribute | new subject | leakage |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method in rows:
            r = results[(name, method)]
            cells = [r.get(k) for k in ("identity/concept", "identity/alignment", "composition/concept", "composition/companion",
                                        "composition/both", "transfer/concept", "transfer/companion", "transfer/leakage")]
            lines.append(f"| {method} | " + " | ".join(f(v, 3 if i == 1 else 2) for i, v in enumerate(cells)) + " |")
        lines.append("")
    pooled = {}
    drawable = [n for n in names if concepts[n]["status"] != "novel control"]
    for method in rows:  # the plane: every sample of the concepts the model can draw (the novel control left out)
        pooled[method] = {k: ev.bootstrap_interval(np.concatenate([reads[(n, method)][k] for n in drawable]))
                          for k in ("identity/concept", "identity/alignment", "composition/companion", "composition/both")}
    lines += [f"### Pooled over the drawable concepts ({', '.join(drawable)}; the novel control left out): the identity-editability plane", "",
              "| method | identity: found | image alignment | composition: companion | both |", "|---|---|---|---|---|"]
    for method, p in pooled.items():
        lines.append(f"| {method} | {f(p['identity/concept'])} | {f(p['identity/alignment'], 3)} | {f(p['composition/companion'])} | {f(p['composition/both'])} |")
    lines.append("")
    if sweep:
        lines += [f"### Plain TI budget sweep on {args.sweep_concept}: identity found / companion found / both", "",
                  "| steps \\ base lr | " + " | ".join(f"{lr:g}" for lr in sorted({k[1] for k in sweep})) + " |",
                  "|---|" + "---|" * len({k[1] for k in sweep})]
        for steps in sorted({k[0] for k in sweep}):
            cells = [sweep[(steps, lr)] for lr in sorted({k[1] for k in sweep})]
            lines.append(f"| {steps} | " + " | ".join(f"{c['identity/concept'][0]:.2f} / {c['composition/companion'][0]:.2f} / {c['composition/both'][0]:.2f}" for c in cells) + " |")
    os.makedirs(args.out, exist_ok=True)
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "quality.md"), "w") as fh:
        fh.write(table)
    with open(os.path.join(args.out, "quality.json"), "w") as fh:
        json.dump({"results": {f"{n}/{m}": results[(n, m)] for n in names for m in rows},
                   "sweep": {f"{s}/{lr:g}": v for (s, lr), v in sweep.items()}, "device": device, "minutes": minutes}, fh, indent=1)
    from jax_inversion.data.images import list_concept_images
    from PIL import Image

    blocks = {}
    for name in names:
        train_images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in list_concept_images(concepts[name]["images"])[:4]])
        blocks[(name, "training images")] = np.concatenate([train_images[:2], train_images[2:4]])
        for method in rows:
            s = samples[(name, method)]
            blocks[(name, method)] = np.concatenate([s["identity"][:2], s["composition"][:2]])
    header = [f"{n}: 'a <c>' x2 | 'a <c> and {concepts[n]['companions'][0][2:]}' x2" for n in names]
    figure([(m, [blocks[(n, m)] for n in names]) for m in ["training images"] + rows], header, os.path.join(args.out, "quality.png"))
    # Companion found alone saturates in this world (1.00 for every method), so the plane's x is
    # "both": the companion drawn with the concept kept, in the same composed sample.
    points = {m: {"x": tuple(p["composition/both"]), "y": tuple(p["identity/alignment"])} for m, p in pooled.items()}
    for (steps, lr), c in sorted(sweep.items()):
        points[f"ti {steps} steps, lr {lr:g}"] = {"x": tuple(c["composition/both"]), "y": tuple(c["identity/alignment"])}
    plane_figure(points, os.path.join(args.out, "quality_plane.png"), "x", "y",
                 "composition: concept and companion in one sample", "image alignment (identity)")
    print(table)
    print(f"wrote {args.out}/quality.md, quality.json, quality.png and quality_plane.png")


if __name__ == "__main__":
    main()
