"""Identity reads of toy-world runs: how often "a <concept>" draws the concept, over several seeds.

    python -m benchmarks.identity_reads RUN [RUN ...] [--samples 64,128] [--seeds 0,1]

For each run (a workdir trained on a toy-world concept), samples "a <c>" ``samples[i]`` times
with seed ``seeds[i]`` (DDIM 25 steps, guidance 5, as ``jax-inversion toyworld eval``) and prints
the concept found per seed and pooled, with 95 % bootstrap intervals. The README's table of
default-job recipes (vectors x training timesteps) was read this way: 64 samples of seed 0 and
128 of seed 1, 192 in all, for each run.
"""
from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    from jax_inversion.toyworld import SHIPPED_DETECTOR
    from jax_inversion.toyworld import evaluate as ev

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="workdirs of runs on a toy-world concept")
    parser.add_argument("--samples", default="64,128", help="samples per seed, comma separated")
    parser.add_argument("--seeds", default="0,1", help="sampling seeds, comma separated (as many as --samples)")
    parser.add_argument("--detector", default=SHIPPED_DETECTOR)
    args = parser.parse_args()
    samples = [int(x) for x in args.samples.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    if len(samples) != len(seeds):
        parser.error(f"--samples has {len(samples)} values and --seeds {len(seeds)}: give one sample count per seed")
    detector = ev.detector_or_error(args.detector)
    for workdir in args.runs:
        run = ev.run_concept(workdir)
        model = ev.load_model(run.model_path)
        reads = []
        for n, seed in zip(samples, seeds):
            settings = ev.EvalSettings(images_per_prompt=n, seed=seed)
            (score,) = ev.score_concept(model, detector, run.learned, run.token_text, run.concept, settings, kinds=("identity",))
            reads.append(score.concept)
            print(f"{workdir}  seed {seed}: {int(score.concept.sum())} of {n}  {ev.fmt_interval(ev.bootstrap_interval(score.concept))}")
        pooled = np.concatenate(reads)
        print(f"{workdir}  pooled: {int(pooled.sum())} of {pooled.size}  {ev.fmt_interval(ev.bootstrap_interval(pooled))}", flush=True)


if __name__ == "__main__":
    main()
