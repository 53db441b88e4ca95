"""``jax-inversion compile --topology v5e:2x4 [--json] --config configs/ti.py [--config.key=value ...]``.

Compiles the train job's real step for a TPU topology on this machine, no TPU needed (libtpu:
``pip install 'jax[tpu]'``), from the model's configs alone (weight files need not exist), and
prints per chip: bytes against the chip's HBM and whether they fit, the TPU compiler's FLOPs per
step, the kernel each attention layer got, and the largest batch per chip that fits with remat
none, dots, full and blocks. Exits 1 when the step does not compile or does not fit.

    jax-inversion compile --topology v5e:2x4 --config.model=path/to/sd15 --config.train.batch_size=64
    jax-inversion compile --topology v5e:4x4 --json --config.model=path/to/sdxl   # 4 hosts
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "ti.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "method config file (configs/<method>.py), as for train", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology to compile for: v4:2x2x1, v5e:2x4, v5p:2x2x1, v6e:2x4, v5e:4x4, ...")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of lines")
_SEARCH = flags.DEFINE_list("search_remat", ["none", "dots", "full", "blocks"],
                            "remat policies to find the largest batch per chip for (empty: no search)")


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"compile: unexpected arguments {argv[1:]}; pass options as --flags")
    if not _TOPOLOGY.value:
        sys.exit("compile: --topology is required: pass e.g. --topology=v5e:2x4")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only chips: never probe for a real one
    from jax_inversion.commands import default_job
    from jax_inversion.commands.runtime import user_errors
    from jax_inversion.training.tpu_plan import format_report, plan_topology

    config = _CONFIG.value
    with user_errors("compile"):
        if not config.model:
            config = default_job.with_default_model(config)
        report = plan_topology(config, _TOPOLOGY.value, search=tuple(r for r in _SEARCH.value if r))
    print(json.dumps(report) if _JSON.value else format_report(report))
    if not report["compiled"] or not report["fits"]:
        sys.exit(1)
