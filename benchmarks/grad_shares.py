"""Each loss term's share of the learned rows' gradient, per method, at the first and last step.

    python -m benchmarks.grad_shares [--steps 30] [--concept star] [--before] [--methods ti,sefi]
    python -m benchmarks.grad_shares --arch sd15 --resolution 512 --batch 1 --steps 3 --methods sefi --class_word circle [--before]

Trains every method's own config (:func:`benchmarks.quality.method_config`) on the shipped toy
model (or, with ``--arch sd15``, on random weights of the SD1.5 architecture written once to
``WORKDIR/sd15``, the concept's images resized to ``--resolution``) for ``--steps`` steps with
``train.log_every=1`` and reads ``grad_norm/<term>`` from metrics.jsonl. ``--before`` emulates
the recipes as they were before issue 16: lr 5e-3 unscaled, clipping 1.0, placeholder-only
prompts, the anchor loss divided by the 80 anchors (the new one per L x d prompt elements: its
weight times L x d / 80 reproduces it), the attention loss a mean over pixels and tokens, and
Lego's "<subj> <cpt>".
"""
from __future__ import annotations

import argparse
import json
import os

METHODS = ("ti", "lego", "compositional_anchor", "compositional_anchor_location", "sefi")


def before_config(config, model_path: str):
    """The pre-issue-16 recipe of ``config`` (a plain copy: the anchor weight no longer follows lambda)."""
    import ml_collections

    from jax_inversion.models.loading import load_pretrained

    config = ml_collections.ConfigDict(config.to_dict())
    config.train.scale_lr, config.train.max_grad_norm = False, 1.0
    config.data.append_class_word, config.data.concept_before_subject = False, False
    config.loss_options.attention.reduction = "mean"
    if config.loss.anchor:
        model = load_pretrained(model_path, components=("text_encoder",))
        width = model.text_encoder.config.hidden_size
        config.loss.anchor *= model.tokenizer.model_max_length * width / len(config.loss_options.anchor.words or range(80))
    return config


def shares(workdir: str) -> dict:
    """``{step: {term: norm}}`` at the first and last logged step."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    pick = lambda r: {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("grad_norm/")}
    return {records[0]["step"]: pick(records[0]), records[-1]["step"]: pick(records[-1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--concept", default="star")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--before", action="store_true", help="the recipes before issue 16")
    parser.add_argument("--workdir", default="/tmp/grad_shares")
    parser.add_argument("--arch", default="toy", choices=("toy", "sd15"), help="toy: the shipped toy model; sd15: random SD1.5-architecture weights")
    parser.add_argument("--resolution", type=int, default=0, help="training images' side (0: the model's own)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--class_word", default="", help="instead of the concept's own (sd15's small tokenizer: e.g. circle)")
    args = parser.parse_args()

    from benchmarks.quality import method_config
    from jax_inversion.toyworld import SHIPPED_MODEL
    from jax_inversion.toyworld.concepts import write_concept
    from jax_inversion.training.train import train

    concept = write_concept(args.concept, os.path.join(args.workdir, "concepts", args.concept))
    if args.class_word:
        concept["class_word"] = args.class_word
    model = SHIPPED_MODEL
    if args.arch == "sd15":
        from benchmarks.train_step import write_model

        model = os.path.join(args.workdir, "sd15")
        if not os.path.exists(os.path.join(model, "model_index.json")):
            write_model("sd15", model)
    label = "before" if args.before else "after"
    print("| method | step | term: norm (share) |")
    for method in args.methods.split(","):
        config = method_config(method, concept, model, args.steps, 0, 5e-3)
        config.train.log_every = 1
        config.train.batch_size = args.batch
        config.data.resolution = args.resolution
        if args.before:
            config = before_config(config, model)
        workdir = os.path.join(args.workdir, args.arch, label, method)
        if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            train(config, workdir)
        for step, norms in shares(workdir).items():
            total = sum(norms.values()) or 1.0
            cells = ", ".join(f"{t} {n:.3g} ({n / total:.0%})" for t, n in norms.items())
            print(f"| {method} ({label}) | {step} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
