"""Orbax checkpoints of a run: the train state plus the metadata export and resume read."""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jax_inversion.errors import UserError
from jax_inversion.files import is_remote


log = logging.getLogger("jax_inversion")


class CheckpointError(UserError, RuntimeError):
    """A workdir whose checkpoints cannot serve this request."""


def _reason(error: Exception) -> str:
    """An exception as a short phrase for a one-line message."""
    text = (str(error).splitlines() or [""])[0][:120]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def state_digest(state: Any) -> str:
    """sha256 of every array of ``state`` (this host's first copy of each): saved with a checkpoint and
    checked on resume, so changed bytes in an array file are caught, not trained on."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(state):
        if isinstance(leaf, jax.Array):
            leaf = leaf.addressable_data(0)
        value = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def checkpoint_dir(workdir: str) -> str:
    if is_remote(workdir):
        return str(epath.Path(workdir) / "checkpoints")
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
        self.workdir = workdir
        self.directory = checkpoint_dir(workdir)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict, force: bool = False) -> None:
        metadata = {**metadata, "state_sha256": state_digest(state)}
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
        """The newest readable state, after checking it belongs to the same tokens, width and model.

        A damaged step (metadata or arrays that cannot be read, or arrays that differ from the
        checksum saved with them) is skipped with a warning naming it, and moved, never deleted,
        to ``WORKDIR/damaged_checkpoints/STEP`` so that the run can save that step again. When
        no step can be read: one line (:class:`CheckpointError`) and nothing is moved.
        """
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                saved = self.read_metadata(step)
            except Exception as e:  # any failure to read is damage: a traceback helps nobody here
                damaged.append((step, _reason(e)))
                continue
            for key in ("layout", "embedding_dim", "model"):
                if saved.get(key) != metadata.get(key):
                    raise CheckpointError(
                        f"the workdir's checkpoints are of another run ({key}: {saved.get(key)!r} vs {metadata.get(key)!r}): "
                        "pass a new --workdir or the same model and tokens"
                    )
            try:
                state, _ = self.restore(step, target)
            except Exception as e:
                try:
                    self.restore(step)  # readable as saved: the config differs, not the files
                except Exception:
                    damaged.append((step, _reason(e)))
                    continue
                raise CheckpointError(
                    f"checkpoint {step} does not fit this config's train state ({_reason(e)}): "
                    "resume with the optimizer settings it was saved with, or pass a new --workdir"
                ) from None
            if saved.get("state_sha256") and state_digest(state) != saved["state_sha256"]:
                damaged.append((step, "its arrays differ from the checksum saved with them"))
                continue
            if damaged:
                self._set_aside(damaged, step)
            return state
        if damaged:
            listed = "; ".join(f"step {s}: {r}" for s, r in damaged)
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be read ({listed}): move that folder aside to train from "
                "step 0, or pass a new --workdir"
            )
        return None

    def _set_aside(self, damaged: list, resumed: int) -> None:
        """Moves damaged steps to ``WORKDIR/damaged_checkpoints`` (kept for inspection) with a warning each."""
        aside = epath.Path(self.directory).parent / "damaged_checkpoints"
        for step, reason in damaged:
            if jax.process_index() == 0:
                aside.mkdir(parents=True, exist_ok=True)
                target = aside / str(step)
                n = 1
                while target.exists():
                    target, n = aside / f"{step}.{n}", n + 1
                try:
                    (epath.Path(self.directory) / str(step)).rename(target)
                except Exception as e:  # e.g. an object store that cannot rename folders
                    raise CheckpointError(
                        f"checkpoint step {step} is damaged ({reason}) and could not be moved to {target} ({_reason(e)}): "
                        f"move {epath.Path(self.directory) / str(step)} elsewhere yourself and run again"
                    ) from None
            log.warning(
                "checkpoint step %d is damaged (%s): resuming from step %d; its files are kept in %s",
                step, reason, resumed, aside,
            )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jax_inversion_damaged_checkpoints")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()


def read_run(workdir: str, step: Optional[int] = None) -> tuple[int, Any, dict]:
    """``(step, state tree, metadata)`` of a run's checkpoint (latest or ``step``), no train code needed."""
    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).is_dir():
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
