"""Orbax checkpoints of a run: the train state plus the metadata export and resume read."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A workdir whose checkpoints cannot serve this request."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class CheckpointManager:
    """Saves every ``every`` steps (async), keeps the last ``keep``, restores the latest."""

    def __init__(self, workdir: str, every: int, keep: int, *, read_only: bool = False):
        # Readers open the folder without Orbax's read_only flag (it only adds a warning);
        # they never save, so with create=False and no max_to_keep nothing is written or deleted.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max(1, keep),
            save_interval_steps=max(1, every),
            enable_async_checkpointing=not read_only,
            create=not read_only,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict, force: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata))
        self._manager.save(step, args=args, force=force)

    def read_metadata(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, target: Any = None) -> tuple[Any, dict]:
        """State shaped like ``target`` (or as saved, on this host's first device, when None) and metadata.

        Without a target the arrays come back whatever devices trained them (a pod run reads on a laptop).
        """
        if target is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            saved = self._manager.item_metadata(step)["state"]
            abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        else:
            abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    def restore_latest(self, target: Any, metadata: dict) -> Optional[Any]:
        """The latest state, after checking it belongs to the same tokens, width and model."""
        step = self.latest_step()
        if step is None:
            return None
        saved = self.read_metadata(step)
        for key in ("layout", "embedding_dim", "model"):
            if saved.get(key) != metadata.get(key):
                raise CheckpointError(
                    f"the workdir's checkpoints are of another run ({key}: {saved.get(key)!r} vs {metadata.get(key)!r}): "
                    "pass a new --workdir or the same model and tokens"
                )
        try:
            state, _ = self.restore(step, target)
        except ValueError as e:
            raise CheckpointError(
                f"checkpoint {step} does not fit this config's train state ({str(e).splitlines()[0][:120]}): "
                "resume with the optimizer settings it was saved with, or pass a new --workdir"
            ) from None
        return state

    def wait(self) -> None:
        self._manager.wait_until_finished()


def read_run(workdir: str, step: Optional[int] = None) -> tuple[int, Any, dict]:
    """``(step, state tree, metadata)`` of a run's checkpoint (latest or ``step``), no train code needed."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise CheckpointError(f"workdir {workdir} has no checkpoints: train first, or pass the --workdir of a run")
    manager = CheckpointManager(workdir, 1, 1, read_only=True)
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"workdir {workdir} has no checkpoints: train first, or pass the --workdir of a run")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise CheckpointError(f"step {step} has no checkpoint in {workdir}: available steps are {sorted(steps)}")
    state, meta = manager.restore(step)
    return step, state, meta
