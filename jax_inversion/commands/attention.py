"""``jax-inversion attention --workdir DIR --prompt "..." --out maps.png``: each token's cross-attention map."""
from __future__ import annotations

import sys

from absl import flags

from jax_inversion.commands import sampling_flags as f

_RESOLUTION = flags.DEFINE_integer("resolution", 16, "side of the cross-attention maps to show (16: SD's 16x16 layers)")


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"attention: unexpected arguments {argv[1:]}; pass options as --flags (quote the prompt)")
    if not f.PROMPT.value or not f.OUT.value:
        sys.exit("attention: --prompt and --out are required: e.g. --prompt 'a photo of <cat>' --out maps.png")
    from jax_inversion.sampling import generate as sampling
    from jax_inversion.commands.runtime import user_errors

    with user_errors("attention"):
        model, learned = f.load_source("attention")
        request = f.request(attention_resolution=_RESOLUTION.value)
        result = sampling.generate(model, learned, request)
        figure = sampling.attention_figure(model.tokenizer, result, image_index=0)
        path = f.out_path("attention_" + sampling.prompt_file_name(request.prompt, request.seed))
        sampling.save_png(path, figure, {"prompt": request.prompt, "seed": request.seed, "resolution": _RESOLUTION.value})
    print(f"wrote {path}")
