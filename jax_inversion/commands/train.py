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
    from jax_inversion.commands import default_job
    from jax_inversion.commands.runtime import enable_compilation_cache, initialize_distributed, user_errors
    from jax_inversion.training.train import check_writable, train

    initialize_distributed()
    config = _CONFIG.value
    with user_errors("train"):
        check_writable(_WORKDIR.value)
        if not config.get("concepts"):
            config = default_job.fill_defaults(config, _WORKDIR.value)
        if config.train.compilation_cache:
            enable_compilation_cache(_WORKDIR.value)
        state = train(config, _WORKDIR.value)
    print(f"trained to step {int(state.step)}; checkpoints in {os.path.join(_WORKDIR.value, 'checkpoints')}")
