"""``jax-inversion export --workdir DIR [--step N] --format F --out FILE [--all] [--overwrite]``, or ``--info FILE``."""
from __future__ import annotations

import sys

from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's directory")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step to export (default: the latest)")
_FORMAT = flags.DEFINE_enum("format", "diffusers", ["diffusers", "a1111", "sdxl", "extended"], "file layout")
_OUT = flags.DEFINE_string("out", None, "output file (with --all: output folder, one file per concept)")
_ALL = flags.DEFINE_bool("all", False, "export every concept of the run, one file each, named after the token")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing output file")
_INFO = flags.DEFINE_string("info", None, "print what an embedding file holds (ours or another tool's) and exit")


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"export: unexpected arguments {argv[1:]}; pass options as --flags")
    if _INFO.value:
        from jax_inversion.artifacts.export import describe_file
        from jax_inversion.commands.runtime import user_errors

        with user_errors("export"):
            info = describe_file(_INFO.value)
        for key, value in info.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k}: {v}")
            else:
                print(f"{key}: {value}")
        return
    if not _WORKDIR.value or not _OUT.value:
        sys.exit("export: --workdir and --out are required: e.g. --workdir runs/cat --out cat.safetensors")
    from jax_inversion.artifacts.export import export_run
    from jax_inversion.commands.runtime import user_errors

    with user_errors("export"):
        paths = export_run(
            _WORKDIR.value, _OUT.value, _FORMAT.value, step=_STEP.value, all_concepts=_ALL.value, overwrite=_OVERWRITE.value
        )
    for path in paths:
        print(f"wrote {path}")
