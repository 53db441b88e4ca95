"""``jax-inversion sample --workdir DIR --prompt "a photo of <cat>" --out grid.png [...]``."""
from __future__ import annotations

import sys

from jax_inversion.commands import sampling_flags as f


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"sample: unexpected arguments {argv[1:]}; pass options as --flags (quote the prompt)")
    if not f.PROMPT.value or not f.OUT.value:
        sys.exit("sample: --prompt and --out are required: e.g. --prompt 'a photo of <cat>' --out grid.png")
    from jax_inversion.sampling import generate as sampling
    from jax_inversion.commands.runtime import user_errors

    with user_errors("sample"):
        model, learned = f.load_source("sample")
        request = f.request()
        result = sampling.generate(model, learned, request)
        path = f.out_path(sampling.prompt_file_name(request.prompt, request.seed))
        info = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
                "steps": request.steps, "guidance": request.guidance, "scheduler": request.scheduler, "clip_skip": model.clip_skip,
                "layout_guidance": request.layout_guidance, "boxes": list(result.boxes)}
        sampling.save_png(path, sampling.image_grid(result.images), info)
    print(f"wrote {path}")
