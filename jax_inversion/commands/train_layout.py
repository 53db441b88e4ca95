"""``jax-inversion train-layout --model DIR --data layout.jsonl --out layout.safetensors [--steps N] [--overwrite]``."""
from __future__ import annotations

import os
import sys

from absl import flags

_MODEL = flags.DEFINE_string("model", None, "diffusers-format model directory or hub id (its tokenizer and text encoder)")
_DATA = flags.DEFINE_string("data", None, 'JSONL file, one {"words": [a, b], "boxes": [box_a, box_b]} a line')
_OUT = flags.DEFINE_string("out", None, "output layout model (.safetensors)")
_STEPS = flags.DEFINE_integer("steps", 2000, "optimizer steps")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate")
_SEED = flags.DEFINE_integer("seed", 0, "initialization and batch sampling seed")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "width of the MLP's hidden layers")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing output file")


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"train-layout: unexpected arguments {argv[1:]}; pass options as --flags")
    if not _MODEL.value or not _DATA.value or not _OUT.value:
        sys.exit("train-layout: --model, --data and --out are required: e.g. --model sd15 --data layout.jsonl --out layout.safetensors")
    if _STEPS.value < 1 or _HIDDEN.value < 1 or not _LEARNING_RATE.value > 0:
        sys.exit("train-layout: --steps and --hidden must be >= 1 and --learning_rate > 0")
    if os.path.exists(_OUT.value) and not _OVERWRITE.value:
        sys.exit(f"train-layout: {_OUT.value} already exists: pass --overwrite to replace it, or choose another --out")
    from jax_inversion.sampling import layout
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.commands.runtime import user_errors

    with user_errors("train-layout"):
        records = layout.read_layout_jsonl(_DATA.value)
        model = load_pretrained(_MODEL.value, components=("text_encoder",))
        table = model.text_encoder_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
        params, history = layout.train_layout_model(
            records, model.tokenizer, table, _STEPS.value, _LEARNING_RATE.value, _SEED.value, _HIDDEN.value
        )
        meta = {"model": _MODEL.value, "data": _DATA.value, "pairs": len(records), "steps": _STEPS.value,
                "final_loss": float(history[-1]),
                "words": sorted({w for r in records for w in r["words"]})}  # the nouns a learned token maps to
        layout.save_layout_model(_OUT.value, params, meta, overwrite=_OVERWRITE.value)
    print(f"wrote {_OUT.value}: {len(records)} pairs, {_STEPS.value} steps, loss {history[0]:.4f} -> {history[-1]:.4f}")
