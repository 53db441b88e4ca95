"""``jax-inversion train --config configs/ti.py --workdir DIR [--config.key=value ...]``."""
from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "ti.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "method config file (configs/<method>.py); default: textual inversion", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, TensorBoard; resumes if it has checkpoints")


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"train: unexpected arguments {argv[1:]}; pass options as --flags")
    if not _WORKDIR.value:
        sys.exit("train: --workdir is required: pass --workdir=DIR (a new or an existing run directory)")
    from jax_inversion.runtime import initialize_distributed, user_errors

    initialize_distributed()
    config = _CONFIG.value
    from jax_inversion.train import train

    with user_errors("train"):
        state = train(config, _WORKDIR.value)
    print(f"trained to step {int(state.step)}; checkpoints in {os.path.join(_WORKDIR.value, 'checkpoints')}")
