"""Orbax checkpoints of a run: the train state plus the metadata export and resume read."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jax_inversion.core.errors import UserError
from jax_inversion.core.files import is_remote


log = logging.getLogger("jax_inversion")


class CheckpointError(UserError, RuntimeError):
    """A workdir whose checkpoints cannot serve this request."""


def _reason(error: Exception) -> str:
    """An exception as a short phrase for a one-line message."""
    text = (str(error).splitlines() or [""])[0][:120]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# Reading a step again after an error that is not damage (storage, permissions, memory): tries in
# all, and the wait before the second (doubled before each next one). Tests set them small.
READ_ATTEMPTS = 3
READ_BACKOFF_S = 2.0

# TensorStore's status codes (the first word of its ValueError messages; XLA's runtime errors read
# alike). Damage: bytes that do not decode (DATA_LOSS: a corrupt OCDBT/zstd file; OUT_OF_RANGE: a
# truncated one; FAILED_PRECONDITION: invalid JSON, a truncated zstd stream). NOT_FOUND is damage
# only once the step's folders list (see _unlisted). The storage's or the machine's codes are errors
# of reading, never of the files; any other code (INVALID_ARGUMENT, ...) is not damage either.
_DAMAGE_CODES = frozenset({"DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION"})
_UNAVAILABLE_CODES = frozenset({
    "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED", "ABORTED",
    "CANCELLED", "INTERNAL", "UNKNOWN",
})
_STATUS = re.compile(r"([A-Z][A-Z_]+[A-Z]): ")
# Orbax's KeyError when a step has no folder for an item ("state", "meta").
_MISSING_ITEM = re.compile(r"was not found in the checkpoint|Unknown key: ")
# Orbax's ValueError when an array file's shape differs from the shape recorded beside it.
_STORED_SHAPE = "is not compatible with the stored shape"


class _Damaged(Exception):
    """A step whose files cannot be decoded; the message is the reason."""


def _decode_errors() -> tuple:
    """The exceptions of bytes that do not decode: JSON, UTF-8 and msgpack (Orbax's aggregate files)."""
    errors = (json.JSONDecodeError, UnicodeDecodeError)
    try:
        from msgpack.exceptions import ExtraData, UnpackException  # FormatError, StackError, OutOfData derive from it
    except ImportError:
        return errors
    return errors + (UnpackException, ExtraData)


def _chain(error: BaseException) -> list:
    """``error``, then what it was raised from or while handling, outermost first."""
    chain = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def read_error_kind(error: BaseException, as_saved: bool = False) -> str:
    """What a failed read of a step says about its files: ``"damage"`` (bytes that do not decode:
    JSON, UTF-8, msgpack; TensorStore's DATA_LOSS, OUT_OF_RANGE, FAILED_PRECONDITION; with
    ``as_saved``, an array file whose shape differs from its recorded one), ``"missing"`` (a file
    or item folder reported absent: damage only if the step's folders list), ``"unavailable"``
    (the storage or the machine, not the files: OSError, PermissionError, ConnectionError,
    TimeoutError, MemoryError, TensorStore's PERMISSION_DENIED, UNAVAILABLE, RESOURCE_EXHAUSTED,
    DEADLINE_EXCEEDED, ...) or ``"other"`` (e.g. a target that does not fit the saved tree). Only
    ``"damage"`` and a confirmed ``"missing"`` ever set a step aside.

    The first exception of the chain (outermost first) that names a kind decides: Orbax wraps
    TensorStore's error in a bare ``Exception``.
    """
    return _classify(error, as_saved)[0]


def _classify(error: BaseException, as_saved: bool = False) -> tuple[str, BaseException]:
    """:func:`read_error_kind` and the exception of the chain that decided it (for the message)."""
    decode = _decode_errors()
    for e in _chain(error):
        if isinstance(e, decode):
            return "damage", e
        if isinstance(e, FileNotFoundError):
            return "missing", e
        if isinstance(e, (OSError, MemoryError)):
            return "unavailable", e
        if isinstance(e, KeyError) and _MISSING_ITEM.search(str(e)):
            return "missing", e
        status = _STATUS.match(str(e))
        if status:
            code = status.group(1)
            if code in _DAMAGE_CODES:
                return "damage", e
            if code == "NOT_FOUND":
                return "missing", e
            return ("unavailable" if code in _UNAVAILABLE_CODES else "other"), e
        if as_saved and isinstance(e, ValueError) and _STORED_SHAPE in str(e):
            return "damage", e
    return "other", error


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

        A damaged step (metadata or arrays that do not decode, files of it that are absent, or arrays
        that differ from the checksum saved with them) is skipped with a warning naming it, and moved,
        never deleted, to ``WORKDIR/damaged_checkpoints/STEP`` so that the run can save that step
        again. When no step can be read: one line (:class:`CheckpointError`) and nothing is moved.

        Only damage sets a step aside (:func:`read_error_kind`). Any other error of reading (the
        storage unreachable or refusing, a permission, memory) is retried ``READ_ATTEMPTS`` times,
        ``READ_BACKOFF_S`` apart and doubling, then raised as one line: nothing is moved, and the
        next run reads the same steps again.
        """
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                saved = self._read(step, lambda: self.read_metadata(step))
            except _Damaged as e:
                damaged.append((step, str(e)))
                continue
            for key in ("layout", "embedding_dim", "model"):
                if saved.get(key) != metadata.get(key):
                    raise CheckpointError(
                        f"the workdir's checkpoints are of another run ({key}: {saved.get(key)!r} vs {metadata.get(key)!r}): "
                        "pass a new --workdir or the same model and tokens"
                    )
            try:
                state = self._read(step, lambda: self.restore(step, target)[0], passthrough=True)
            except CheckpointError:
                raise
            except Exception as e:  # damage, or a target that does not fit: the files read as saved tell which
                try:
                    self._read(step, lambda: self.restore(step), as_saved=True)
                except _Damaged:
                    damaged.append((step, _reason(_classify(e)[1])))
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

    def _read(self, step: int, read, *, as_saved: bool = False, passthrough: bool = False):
        """``read()``, tried again after an error that is not damage; raises :class:`_Damaged` (the
        reason) when the step's files are damaged, :class:`CheckpointError` when the tries run out.

        ``passthrough``: an error that is not ``"unavailable"`` is raised as it is, at once (the
        caller tells damage from a target that does not fit).
        """
        delay = READ_BACKOFF_S
        for attempt in range(1, max(1, READ_ATTEMPTS) + 1):
            try:
                return read()
            except Exception as e:
                kind, cause = _classify(e, as_saved)
                if kind == "missing":  # absent, or in a folder that cannot be listed (which reads as absent)
                    unlisted = self._unlisted(step)
                    kind, cause = ("damage", cause) if unlisted is None else ("unavailable", unlisted)
                if passthrough and kind != "unavailable":
                    raise
                if kind == "damage":
                    raise _Damaged(_reason(cause)) from e
                if attempt >= READ_ATTEMPTS:
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory} could not be read ({_reason(cause)}; "
                        f"{attempt} tries): nothing was moved; run again when the storage is reachable"
                    ) from e
                log.warning("reading checkpoint step %d failed (%s): trying again in %g s", step, _reason(cause), delay)
                time.sleep(delay)
                delay *= 2

    def _unlisted(self, step: int) -> Optional[Exception]:
        """None when every folder of ``step`` lists, else the error listing one raised (a folder that
        cannot be read looks absent to Orbax: its files are then not known to be missing)."""
        try:
            folders = [epath.Path(self.directory) / str(step)]
            while folders:
                for child in folders.pop().iterdir():
                    if child.is_dir():
                        folders.append(child)
        except Exception as e:
            return e
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
