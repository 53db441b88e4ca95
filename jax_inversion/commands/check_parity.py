"""``jax-inversion check-parity``: max abs difference, ours vs PyTorch, per component."""
from __future__ import annotations

import sys
import tempfile

from absl import flags

_MODEL = flags.DEFINE_string(
    "model", None, "diffusers-format model directory, hub id or single-file .safetensors/.ckpt (its PyTorch side: "
    "diffusers' from_single_file); default: a tiny random model built here"
)
_MODEL_TOKENIZER = flags.DEFINE_string(
    "model_tokenizer", "", "tokenizer(s) for --model: a diffusers model or tokenizer folder (a single file has none)"
)
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-4, "largest max-abs difference (fp32) that passes")
_LATENT_SIZE = flags.DEFINE_integer("latent_size", None, "UNet latent side (default: min(sample_size, 32))")
_BATCH = flags.DEFINE_integer("batch", 2, "batch size of the random inputs")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the random inputs")


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"check-parity: unexpected arguments {argv[1:]}; pass options as --flags")
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        sys.exit("check-parity: needs the PyTorch reference stack: pip install torch==2.13.0 'jax_inversion[test]'")
    from jax_inversion.models.loading import ModelLoadError
    from jax_inversion.models.parity import check_parity

    path = _MODEL.value
    if path is None:
        from jax_inversion.models.tiny import make_tiny_model

        path = make_tiny_model(tempfile.mkdtemp(prefix="jax_inversion_tiny_"))
        print(f"no --model given: built a tiny random SD1-style model in {path}")
    try:
        results = check_parity(path, latent_size=_LATENT_SIZE.value, batch=_BATCH.value, seed=_SEED.value,
                               model_tokenizer=_MODEL_TOKENIZER.value)
    except ModelLoadError as e:
        sys.exit(f"check-parity: {e}")
    failed = False
    print(f"{'component':16s} {'output':26s} {'max|ours-torch|':>16s} {'max|torch|':>12s}")
    for r in results:
        ok = r.max_abs_diff <= _TOLERANCE.value
        failed |= not ok
        print(f"{r.component:16s} {r.output:26s} {r.max_abs_diff:16.3e} {r.max_abs_reference:12.3e}  {'ok' if ok else 'FAIL'}")
    if failed:
        sys.exit(f"check-parity: difference above tolerance {_TOLERANCE.value:g}")
    print(f"parity ok (tolerance {_TOLERANCE.value:g})")
