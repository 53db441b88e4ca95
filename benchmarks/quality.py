"""Method quality on toy-world concepts: TI vs Lego vs Compositional Inversion vs SeFi-IDE (and extensions).

    python -m benchmarks.quality                                  # the project's concepts, every method, the default job's budget
    python -m benchmarks.quality --concept_dir DIR --methods ti,compositional --out DIR   # any concept folder(s)
    python -m benchmarks.quality --concepts star_with_square --methods ti \
        --sweep compositional:anchor_lambda=0,0.25,0.5,0.75,0.95,1   # a method's curve on the identity-editability plane
    python -m benchmarks.quality --budget paper                   # each method config's own recipe (steps, vectors): for a GPU

Every method learns every concept from the same images with the same seed and batch, on the
shipped toy model, at the default job's budget (2,000 steps, timesteps 200-999, 8 vectors, lr 5e-3
x batch 8) unless ``--budget paper``. Each run is sampled the method's own way (Compositional
Inversion: "S* <class>" prompts and layout guidance in compositions, :func:`evaluate.method_sampling`)
with the same prompts and seeds, and read by the world's detector (:mod:`jax_inversion.toyworld.evaluate`):
identity ("a <c>", 32 samples), composition (32 samples over the companions), transfer for textures and
states, and, for cluttered concepts, the distractors in identity and composition samples. A random token
of the vocabulary's mean norm is the baseline.

Methods (``name`` or ``name:key=value;key=value``, keys of the method's config, e.g.
``compositional:anchor_lambda=0.5``): ``ti``; ``lego``; ``compositional`` (the paper: anchor loss at
training, layout guidance at sampling); ``sefi``; and extensions that are ours, not a paper's:
``compositional_location`` (+ a training-time attention-location loss), ``masked`` (denoising loss inside
the concept mask only, Break-A-Scene's), ``ti_captioned`` (captions that name the concept's distractor
objects: "a <c> and a red square"). ``--sweep name:key=v1,v2,...`` runs one point per value and draws
them as that method's curve.

Writes ``quality.md`` (tables, 95 % bootstrap intervals), ``quality.json`` (``{method: {concept:
{"identity/concept": [mean, low, high], "identity/distractor": [...], "composition/both": [...], ...}}}``),
``quality.png`` (samples) and ``quality_plane_<concept>.png`` (each method and sweep on the plane).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

METHODS = ("ti", "lego", "compositional", "sefi")
EXTENSIONS = ("compositional_location", "masked", "ti_captioned")
PROJECT_CONCEPTS = "star,dotted_moon,star_with_square,star_on_teal,melting"  # unnamed, seen look, the two cluttered, novel control
DEFAULT_BUDGET = {"train.num_steps": 2000, "train.min_timestep": 200, "data.num_vectors": 8}  # the default job's


def run_fingerprint(model: str, recipe, seed: int, learning_rate: float) -> dict:
    """What a finished run was trained from: its model's weights (by content) and its recipe (the whole config, or steps)."""
    import hashlib

    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(model)):
        for name in sorted(files):
            if name.endswith(".safetensors"):
                with open(os.path.join(root, name), "rb") as f:
                    digest.update(f.read())
    return {"model": os.path.abspath(model), "weights_sha256": digest.hexdigest(), "recipe": recipe, "seed": seed,
            "learning_rate": learning_rate}


def same_fingerprint(a: dict, b: dict) -> bool:
    """Runs of the same weights (by content) and recipe: where the model folder lies (another checkout) does not count."""
    def placeless(fingerprint: dict) -> dict:
        out = {k: v for k, v in fingerprint.items() if k != "model"}
        if isinstance(out.get("recipe"), str) and out["recipe"].startswith("{"):
            out["recipe"] = {k: v for k, v in json.loads(out["recipe"]).items() if k != "model"}  # the config's model path
        return out

    return placeless(a) == placeless(b)


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
                same = same_fingerprint(json.load(f), fingerprint)
        if not same:
            print(f"{workdir} was begun on another model or budget: training it again", flush=True)
            shutil.rmtree(workdir)
    if os.path.exists(os.path.join(workdir, "trained.json")):
        return True
    os.makedirs(workdir, exist_ok=True)
    with open(stamp, "w") as f:
        json.dump(fingerprint, f)
    return False


def parse_method(spec: str) -> tuple[str, dict]:
    """``"compositional:anchor_lambda=0.5;train.num_steps=1000"`` -> ``("compositional", {"anchor_lambda": 0.5, ...})``."""
    name, _, rest = spec.partition(":")
    if name not in METHODS + EXTENSIONS:
        raise SystemExit(f"unknown method {name!r}: use {', '.join(METHODS + EXTENSIONS)}")
    overrides = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return name, overrides


def expand_sweep(spec: str) -> list[str]:
    """``"compositional:anchor_lambda=0,0.5"`` -> ``["compositional:anchor_lambda=0", "compositional:anchor_lambda=0.5"]``."""
    name, _, rest = spec.partition(":")
    key, _, values = rest.partition("=")
    if not key or not values:
        raise SystemExit(f"--sweep {spec!r}: write it as method:key=v1,v2,...")
    return [f"{name}:{key}={v}" for v in values.split(",")]


def _set(config, dotted: str, value) -> None:
    *groups, key = dotted.split(".")
    target = config
    for group in groups:
        target = target[group]
    if key not in target:
        raise SystemExit(f"{dotted} is not a key of the method's config")
    target[key] = value


def method_config(spec: str, concept: dict, model: str, budget: str, seed: int, learning_rate: float, workdir: str):
    """The method's own config with the toy world's data, prompts and word lists filled in, at ``budget``
    (``default``: the default job's steps, timesteps and vectors; ``paper``: the config's own)."""
    from jax_inversion.commands.default_job import TOY_TEMPLATES
    from jax_inversion.configs import compositional, lego, sefi, ti
    from jax_inversion.toyworld import world

    name, overrides = parse_method(spec)
    if name == "lego":
        config = lego.get_config()
        if concept.get("subject_images"):
            config.data.subject_dir = concept["subject_images"]
            config.data.subject_initializer_token = concept["class_word"]
        else:  # a concept with no separable subject: Lego is TI + its context loss here
            config.data.subject_token = ""
            config.train.subject_steps = 0
        # English word order per concept: an adjective or state ("dotted", "melting") before the noun, a phrase
        # ("frozen in ice") after it; concept.json may say so, the toy world's looks are all adjectives
        config.data.concept_before_subject = bool(concept.get("concept_before_subject", True))
        config.loss_options.context.positives = [list(concept["positives"])]
        config.loss_options.context.negatives = [list(concept["negatives"])]
    elif name.startswith("compositional"):
        config = compositional.get_config("paper,location" if name.endswith("location") else "paper")
        config.loss_options.anchor.words = world.SEEN.words + world.UNNAMED_WORDS  # every caption word of the shipped model's world
        config.data.mask_dir = concept["masks"]
    elif name == "sefi":
        config = sefi.get_config()
        config.data.class_word = concept["class_word"]
    else:
        config = ti.get_config()
        if name == "masked":
            config.loss.diffusion, config.loss.masked_diffusion = 0.0, 1.0
            config.data.mask_dir = concept["masks"]
    config.model, config.seed = model, seed
    config.data.concept_dir = captioned_images(concept, workdir) if name == "ti_captioned" else concept["images"]
    if name == "ti_captioned":
        config.data.caption_extension = ".txt"
    config.data.placeholder_token = "<c>"
    with_subject = name == "lego" and concept.get("subject_images")
    config.data.initializer_token = concept["attribute_word"] if with_subject else concept["class_word"]
    config.data.templates = TOY_TEMPLATES
    if budget == "default":
        for key, value in DEFAULT_BUDGET.items():
            _set(config, key, value)
        if with_subject:
            config.train.subject_steps = DEFAULT_BUDGET["train.num_steps"]
    config = ti.resolve_unset(config)
    config.train.batch_size = 8
    config.train.learning_rate = learning_rate
    config.train.log_every = 50
    for key, value in overrides.items():
        _set(config, key, value)
    config.train.checkpoint_every = config.train.num_steps + config.train.subject_steps
    return config


def captioned_images(concept: dict, workdir: str) -> str:
    """A copy of the concept's images with a caption each that names its distractor objects ("a {} and a red square")."""
    objects = [d.split(":", 1)[1] for d in concept.get("distractors", ()) if d.startswith("object:")]
    directory = os.path.join(workdir, "captioned", concept["name"], "images")
    os.makedirs(directory, exist_ok=True)
    for image in sorted(os.listdir(concept["images"])):
        shutil.copy(os.path.join(concept["images"], image), os.path.join(directory, image))
        caption = "a {}" + "".join(f" and a {o}" for o in objects)
        with open(os.path.join(directory, os.path.splitext(image)[0] + ".txt"), "w") as f:
            f.write(caption)
    from jax_inversion.toyworld.concepts import CONCEPT_FILE

    with open(os.path.join(os.path.dirname(directory), CONCEPT_FILE), "w") as f:  # the copy evaluates as the concept
        json.dump({**concept, "images": directory}, f, indent=2)
    return directory


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


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (127, 127, 127), (23, 190, 207),
           (188, 189, 34), (140, 86, 75), (227, 119, 194), (0, 0, 0), (174, 199, 232), (255, 187, 120), (152, 223, 138),
           (255, 152, 150), (197, 176, 213)]  # tab10 + tab20's light half


def series_colours(names: list, curves: dict) -> dict:
    """``{point name: colour}``, one colour per series: each point on no curve its own, in order; each curve
    (``{label: [point names]}``) its method's colour (``"sefi:loss.attention=0.3"``'s method is ``sefi``)
    when that method has a point of its own, else the next colour."""
    on_curves = {m for members in curves.values() for m in members}
    colour_of = {}
    for name in [n for n in names if n not in on_curves]:
        colour_of[name] = PALETTE[len(colour_of) % len(PALETTE)]
    used = len(colour_of)
    for members in [m for m in curves.values() if m]:
        method = members[0].split(":")[0]
        if method in colour_of:
            colour = colour_of[method]
        else:
            colour, used = PALETTE[used % len(PALETTE)], used + 1
        colour_of.update({name: colour for name in members})
    return colour_of


def plane_figure(points: dict, path: str, x_key: str, y_key: str, x_label: str, y_label: str, curves: dict = None) -> None:
    """Each method as a point with its 95% interval bars (composition across, identity up); each of
    ``curves`` (``{label: [point names in sweep order]}``) joined by a line in its method's colour."""
    from PIL import Image, ImageDraw

    size, margin = 420, 56
    canvas = Image.new("RGB", (size + margin + 260, size + margin + 20), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    to_xy = lambda x, y: (margin + x * size, 10 + (1 - y) * size)
    draw.rectangle((margin, 10, margin + size, 10 + size), outline=(0, 0, 0))
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = to_xy(tick, tick)
        draw.text((x - 8, 14 + size), f"{tick:.2f}", fill=(0, 0, 0))
        draw.text((4, y - 6), f"{tick:.2f}", fill=(0, 0, 0))
    draw.text((margin + size // 2 - 60, size + 30), x_label, fill=(0, 0, 0))
    draw.text((4, size + 44), y_label + " (up)", fill=(0, 0, 0))
    curves = {label: [m for m in members if m in points] for label, members in (curves or {}).items()}
    colour_of = series_colours(list(points), curves)
    for members in curves.values():
        if len(members) > 1:
            draw.line([to_xy(points[m][x_key][0], points[m][y_key][0]) for m in members], fill=colour_of[members[0]], width=1)
    for k, (name, p) in enumerate(points.items()):
        colour = colour_of[name]
        (x, x0, x1), (y, y0, y1) = p[x_key], p[y_key]
        draw.line([to_xy(x0, y), to_xy(x1, y)], fill=colour, width=2)
        draw.line([to_xy(x, y0), to_xy(x, y1)], fill=colour, width=2)
        cx, cy = to_xy(x, y)
        draw.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=colour)
        draw.text((margin + size + 12, 14 + 14 * k), f"* {name}", fill=colour)
    canvas.save(path)


def read_concepts(args) -> dict:
    """``{name: concept.json}``: the folder(s) of ``--concept_dir`` (a concept folder, or a folder of them),
    else the project's ``--concepts`` written under the workdir. Image and mask paths resolve inside the folder."""
    from jax_inversion.toyworld.concepts import CONCEPT_FILE, write_concept

    if not args.concept_dir:
        return {name: write_concept(name, os.path.join(args.workdir, "concepts", name), seed=args.seed)
                for name in args.concepts.split(",")}
    root = os.path.abspath(args.concept_dir)
    folders = [root] if os.path.exists(os.path.join(root, CONCEPT_FILE)) else sorted(
        os.path.join(root, d) for d in os.listdir(root) if os.path.exists(os.path.join(root, d, CONCEPT_FILE)))
    if not folders:
        raise SystemExit(f"--concept_dir {root} has no {CONCEPT_FILE}, nor do its folders: write one with `jax-inversion toyworld concepts`")
    concepts = {}
    for folder in folders:
        with open(os.path.join(folder, CONCEPT_FILE)) as f:
            info = json.load(f)
        for key in ("images", "masks", "subject_images", "subject_masks"):
            local = os.path.join(folder, os.path.basename(info.get(key) or key))
            if key in info and os.path.isdir(local):
                info[key] = local
        concepts[info["name"]] = info
    return concepts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concept_dir", default="", help="a concept folder (concept.json, images/, masks/) or a folder of them")
    parser.add_argument("--concepts", default=PROJECT_CONCEPTS, help="without --concept_dir: the project's concepts to write")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma separated; also {', '.join(EXTENSIONS)}; name:key=value;...")
    parser.add_argument("--sweep", action="append", default=[], help="method:key=v1,v2,...: one run per value, drawn as a curve")
    parser.add_argument("--budget", choices=("default", "paper"), default="default")
    parser.add_argument("--learning_rate", type=float, default=5e-3, help="base rate, times the batch (the configs' scale_lr)")
    parser.add_argument("--samples", type=int, default=32, help="samples per kind: identity, composition (over the companions), transfer")
    parser.add_argument("--sample_steps", type=int, default=25, help="DDIM steps per sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="", help="default: the shipped toy model")
    parser.add_argument("--detector", default="", help="default: the shipped detector")
    parser.add_argument("--no_baseline", action="store_true", help="skip the random-token row")
    parser.add_argument("--cached_only", action="store_true", help="report the finished runs only: train nothing, leave the other cells out")
    parser.add_argument("--workdir", default="/tmp/quality_bench")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import jax

    from jax_inversion.toyworld import SHIPPED_DETECTOR, SHIPPED_MODEL, evaluate as ev

    started = time.time()
    if jax.config.jax_compilation_cache_dir is None:  # one XLA cache for every run: same shapes, compiled once
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(args.workdir), "xla_cache"))
    model_path = args.model or SHIPPED_MODEL
    detector = ev.detector_or_error(args.detector or SHIPPED_DETECTOR)
    settings = ev.EvalSettings(steps=args.sample_steps, seed=args.seed)
    concepts = read_concepts(args)
    methods = [m for m in args.methods.split(",") if m]
    curves = {}
    for spec in args.sweep:
        curves[spec] = expand_sweep(spec)
        methods += [m for m in curves[spec] if m not in methods]
    for spec in methods:
        parse_method(spec)  # a bad name fails before anything trains
    cache = {}

    def score(run_dir: str, concept: dict, random_baseline: bool = False) -> dict:
        """The run's summary, the per-sample reads behind it, and the first images of each kind's first prompt."""
        run = ev.run_concept(run_dir)
        model = ev.load_model(run.model_path)  # a fresh tokenizer: each run adds its own placeholders
        learned = ev.random_tokens(model, run.learned, seed=args.seed) if random_baseline else run.learned
        companions = max(1, len(concept["companions"]))
        per_prompt = {"identity": args.samples, "composition": -(-args.samples // companions),
                      "transfer": -(-args.samples // max(1, len(concept.get("transfer_subjects") or [1])))}
        scores = ev.score_concept(model, detector, learned, run.token_text, concept, settings, cache, run.concept_token,
                                  samples=per_prompt, sampling=run.sampling)
        reads = {key: values.round(4).tolist() for key, values in ev.pooled_reads(scores).items()}
        first = {}
        for s in scores:
            first.setdefault(s.kind, s.images[:4].tolist())
        return {"summary": ev.summary(scores), "reads": reads, "images": first}

    results, samples, train_seconds = {}, {}, {}
    rows = methods + ([] if args.no_baseline else ["random token"])
    for name, concept in concepts.items():
        for spec in rows:
            random = spec == "random token"  # the first method's run, its rows replaced by a random token
            run_spec = methods[0] if random else spec
            if parse_method(run_spec)[0] == "ti_captioned" and not any(d.startswith("object:") for d in concept.get("distractors", ())):
                continue  # nothing to caption
            config = method_config(run_spec, concept, model_path, args.budget, args.seed, args.learning_rate, args.workdir)
            fingerprint = run_fingerprint(model_path, config.to_json_best_effort(), args.seed, args.learning_rate)
            finished = same_run(os.path.join(args.workdir, "runs"), fingerprint)
            if args.cached_only and not finished:  # read, never train nor remove: a finished run of this fingerprint or nothing
                continue
            workdir = finished or os.path.join(args.workdir, "runs", f"{name}_{_slug(run_spec)}")
            if not args.cached_only:
                trained(workdir, config, fingerprint)
            with open(os.path.join(workdir, "trained.json")) as f:
                train_seconds[workdir] = json.load(f).get("seconds", 0.0)
            record = evaluated(_ensure(workdir + "_random") if random else workdir, lambda: score(workdir, concept, random))
            results[(spec, name)] = record["summary"]
            samples[(spec, name)] = {k: np.asarray(v, np.uint8) for k, v in record["images"].items()}
            print(json.dumps({"concept": name, "method": spec, **{k: record["summary"].get(k) for k in
                              ("identity/concept", "identity/distractor", "composition/both")}}), flush=True)
    device = jax.devices()[0]
    write_report(args, concepts, rows, results, samples, curves, settings,
                 f"{device.platform} ({device.device_kind}), {len(jax.devices())} device(s)", (time.time() - started) / 60,
                 (len(train_seconds), sum(train_seconds.values()) / 60))


def same_run(runs: str, fingerprint: dict):
    """A finished run under ``runs`` with this fingerprint (e.g. ``compositional`` and
    ``compositional:anchor_lambda=0.95`` are one run), or None."""
    if not os.path.isdir(runs):
        return None
    for name in sorted(os.listdir(runs)):
        stamp = os.path.join(runs, name, "fingerprint.json")
        if os.path.exists(os.path.join(runs, name, "trained.json")) and os.path.exists(stamp):
            with open(stamp) as f:
                if same_fingerprint(json.load(f), fingerprint):
                    return os.path.join(runs, name)
    return None


def _slug(spec: str) -> str:
    return spec.replace(":", "__").replace(";", "_").replace("=", "-").replace("/", "_")


def _ensure(directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    return directory


COLUMNS = (("identity/concept", "identity: found"), ("identity/distractor", "distractor"), ("identity/alignment", "alignment"),
           ("composition/concept", "composition: found"), ("composition/companion", "companion"), ("composition/both", "both"),
           ("composition/distractor", "distractor"), ("transfer/concept", "transfer: attribute"),
           ("transfer/companion", "new subject"), ("transfer/leakage", "leakage"))


def write_report(args, concepts: dict, rows: list, results: dict, samples: dict, curves: dict, settings, device: str,
                 minutes: float, training: tuple = (0, 0.0)) -> None:
    """quality.md, quality.json, quality.png and quality_plane_<concept>.png under ``args.out``."""
    from PIL import Image

    from jax_inversion.data.images import list_concept_images
    from jax_inversion.toyworld import evaluate as ev

    budget = "the default job's budget (2,000 steps, t >= 200, 8 vectors)" if args.budget == "default" else "each method config's own recipe"
    lines = [
        f"Toy world, shipped model; {budget}; batch 8, lr {args.learning_rate} x 8, seed {args.seed}. Each method sampled its own way.",
        f"Samples per kind: {args.samples} (identity 'a <c>'; composition over the companions; transfer over the new subjects). "
        f"DDIM {settings.steps} steps, guidance {settings.guidance}.",
        f"Device: {device}; {training[0]} runs, trained in {training[1]:.0f} min in all (each run's trained.json; other work "
        f"may have shared the machine); this report {minutes:.1f} min. Cells: mean [95% bootstrap interval].", "",
    ]
    for name, concept in concepts.items():
        present = [c for c in COLUMNS if any(results.get((m, name), {}).get(c[0]) for m in rows)]
        lines += [f"### {name} ({concept['status']}): found = {' and '.join(concept['labels'])}"
                  + (f"; distractors: {', '.join(concept['distractors'])}" if concept.get("distractors") else ""), "",
                  "| method | " + " | ".join(c[1] for c in present) + " |", "|---|" + "---|" * len(present)]
        for method in rows:
            if (method, name) in results:
                r = results[(method, name)]
                lines.append(f"| {method} | " + " | ".join(ev.fmt_interval(r.get(k), 3 if "alignment" in k else 2) for k, _ in present) + " |")
        lines.append("")
    os.makedirs(args.out, exist_ok=True)
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "quality.md"), "w") as fh:
        fh.write(table)
    by_method = {}
    for (method, name), summary in results.items():
        by_method.setdefault(method, {})[name] = {k: list(v) for k, v in summary.items()}
    with open(os.path.join(args.out, "quality.json"), "w") as fh:
        json.dump(by_method, fh, indent=1)
    blocks, header = {}, []
    for name, concept in concepts.items():
        train_images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in list_concept_images(concept["images"])[:4]])
        blocks[(name, "training images")] = train_images
        for method in rows:
            s = samples.get((method, name))
            blocks[(name, method)] = np.concatenate([s["identity"][:2], s["composition"][:2]]) if s else np.zeros_like(train_images)
        header.append(f"{name}: 'a <c>' x2 | 'a <c> and {concept['companions'][0][2:]}' x2")
    figure([(m, [blocks[(n, m)] for n in concepts]) for m in ["training images"] + rows], header, os.path.join(args.out, "quality.png"))
    for name in concepts:
        points = {m: {"x": tuple(results[(m, name)]["composition/both"]), "y": tuple(results[(m, name)]["identity/concept"])}
                  for m in rows if (m, name) in results and "composition/both" in results[(m, name)]}
        lines_of = {spec: [m for m in members if m in points] for spec, members in curves.items()}
        plane_figure(points, os.path.join(args.out, f"quality_plane_{name}.png"), "x", "y",
                     "composition: concept and companion in one sample", "identity: concept found in 'a <c>'", curves=lines_of)
    print(table)
    print(f"wrote {args.out}/quality.md, quality.json, quality.png and quality_plane_<concept>.png")


if __name__ == "__main__":
    main()
