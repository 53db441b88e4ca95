"""The README's figure of the shipped toy model: six samples of each of eight seen-vocabulary captions
and two with the generic word "shape" (a star in about 45 % of its pretraining images).

    python -m benchmarks.toyworld_samples [--model DIR] [--out benchmarks/results/toyworld_samples.png]

Row i is caption i sampled with seed i (DDIM 25 steps, guidance 5, as ``toyworld eval``).
"""
from __future__ import annotations

import argparse

import numpy as np

CAPTIONS = (
    "a red square",
    "a blue circle",
    "a yellow triangle",
    "a striped green cross",
    "a hollow white moon",
    "a tilted purple square",
    "a red circle and a blue triangle",
    "a dotted yellow square and a white cross",
    "a yellow shape",
    "a purple shape",
)


def main() -> None:
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.sampling.generate import SampleRequest, generate, image_grid, save_png
    from jax_inversion.toyworld import SHIPPED_MODEL
    from jax_inversion.toyworld.evaluate import no_learned_tokens

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SHIPPED_MODEL)
    parser.add_argument("--out", default="benchmarks/results/toyworld_samples.png")
    parser.add_argument("--per_caption", type=int, default=6)
    args = parser.parse_args()

    model = load_pretrained(args.model)
    no_tokens = no_learned_tokens(model)
    rows, cache = [], {}
    for seed, caption in enumerate(CAPTIONS):
        request = SampleRequest(prompt=caption, num_images=args.per_caption, steps=25, guidance=5.0, scheduler="ddim", seed=seed)
        rows.append(generate(model, no_tokens, request, cache=cache).images)
    grid = image_grid(np.concatenate(rows), columns=args.per_caption)
    print(save_png(args.out, grid, {"prompts": " | ".join(CAPTIONS), "model": args.model}))


if __name__ == "__main__":
    main()
