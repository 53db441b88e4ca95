"""Per-image throughput of batch inversion: N concepts x batch b in one job vs one concept x batch N*b.

    python -m benchmarks.concepts_throughput [--concepts 16] [--per_concept 1] [--steps 30] [--model DIR]

Prints one JSON line per job (images/s from the run's own steps/s, compile excluded) and their ratio.
Without --model it uses the embedded tiny model (made in a temp folder).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile


def _rate(workdir: str) -> float:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [r["steps_per_second"] for r in map(json.loads, f) if "steps_per_second" in r]
    return sorted(rates)[len(rates) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concepts", type=int, default=16)
    parser.add_argument("--per_concept", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", default="")
    args = parser.parse_args()

    import jax

    from jax_inversion.configs.ti import get_config
    from jax_inversion.commands.default_job import write_concept_images
    from jax_inversion.models.tiny import make_tiny_model
    from jax_inversion.training.train import train

    root = tempfile.mkdtemp(prefix="concepts_bench_")
    model = args.model or make_tiny_model(os.path.join(root, "model"))
    concepts = os.path.join(root, "concepts")
    for i in range(args.concepts):
        write_concept_images(os.path.join(concepts, f"c{i:02d}"), count=4, seed=i)

    def config(batch):
        c = get_config()
        c.model = model
        c.data.initializer_token = "ball"
        c.train.num_steps = args.steps
        c.train.batch_size = batch
        c.train.log_every = 5
        c.train.checkpoint_every = 10**9
        c.train.compilation_cache = False
        return c

    results = []
    single = config(args.concepts * args.per_concept)
    single.data.concept_dir = os.path.join(concepts, "c00")
    batched = config(args.per_concept)
    batched.concepts = concepts
    for name, cfg in (("one_concept", single), (f"{args.concepts}_concepts", batched)):
        workdir = os.path.join(root, name)
        train(cfg, workdir)
        images_per_s = _rate(workdir) * args.concepts * args.per_concept
        results.append(images_per_s)
        print(json.dumps({"job": name, "images_per_step": args.concepts * args.per_concept, "images_per_s": round(images_per_s, 2),
                          "device": jax.devices()[0].device_kind, "devices": jax.device_count()}))
    print(json.dumps({"per_image_throughput_ratio": round(results[1] / results[0], 3)}))


if __name__ == "__main__":
    main()
