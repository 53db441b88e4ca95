"""Resume's reads of checkpoints: only damage sets a step aside; an error of the storage is retried, then one line.

No training: two steps of a small state saved by :class:`CheckpointManager` itself, and an Orbax
manager whose reads fail the way a bucket, a permission or memory fails them.
"""
import errno
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from jax_inversion.artifacts import checkpoints
from jax_inversion.artifacts.checkpoints import CheckpointError, CheckpointManager, read_error_kind
from jax_inversion.commands.runtime import user_errors

META = {"layout": {"tokens": ["<c>"]}, "embedding_dim": 4, "model": "m"}


def _state(step):
    return {"rows": jnp.full((2, 4), float(step)), "step": jnp.int32(step)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with steps 3 and 6 (rows filled with the step number)."""
    workdir = str(tmp_path_factory.mktemp("saved"))
    manager = CheckpointManager(workdir, 1, 5)
    for step in (3, 6):
        manager.save(step, _state(step), META, force=True)
    manager.wait()
    return workdir


@pytest.fixture
def workdir(saved, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "READ_BACKOFF_S", 0.0)
    copy = str(tmp_path / "run")
    shutil.copytree(saved, copy)
    return copy


def _files(workdir):
    return sorted(os.path.relpath(os.path.join(d, f), workdir) for d, _, fs in os.walk(workdir) for f in fs)


def _failing(manager, monkeypatch, error, times, item=None):
    """The Orbax manager's restore raises ``error`` (``times`` calls; None: every call), then reads.
    ``item``: only restores that ask for that item ("meta" or "state")."""
    real, calls = manager._manager.restore, []

    def restore(step, args=None):
        wanted = item is None or item in args.keys()
        if wanted and (times is None or len(calls) < times):
            calls.append(step)
            raise error
        return real(step, args=args)

    monkeypatch.setattr(manager._manager, "restore", restore)
    return calls


def _wrapped(message):
    """Orbax's wrapping of a TensorStore error: a bare Exception raised from its ValueError."""
    try:
        raise ValueError(message)
    except ValueError as inner:
        try:
            raise Exception("Encountered error while reading array index: (slice(0, 2, 1),).") from inner
        except Exception as outer:
            return outer


@pytest.mark.parametrize("error,item", [
    (ConnectionError("503 Service Unavailable"), "meta"),
    (OSError(errno.EIO, "Input/output error"), "state"),
    (PermissionError(errno.EACCES, "Permission denied"), "meta"),
    (TimeoutError("read timed out"), "state"),
    (MemoryError(), "state"),
    (_wrapped("UNAVAILABLE: Error reading \"rows/0\" in OCDBT database: HTTP response code: 503"), "state"),
    (_wrapped("RESOURCE_EXHAUSTED: Out of memory allocating 17179869184 bytes"), "state"),
], ids=["connection-meta", "eio-state", "permission-meta", "timeout-state", "memory-state", "ts-unavailable", "ts-exhausted"])
def test_a_transient_read_error_is_retried_and_resumes_the_newest(workdir, monkeypatch, caplog, error, item):
    before = _files(workdir)
    manager = CheckpointManager(workdir, 1, 5)
    calls = _failing(manager, monkeypatch, error, times=1, item=item)
    state = manager.restore_latest(_state(0), META)
    assert calls == [6] and int(state["step"]) == 6
    np.testing.assert_array_equal(np.asarray(state["rows"]), np.full((2, 4), 6.0))
    assert manager.all_steps() == [3, 6] and _files(workdir) == before  # nothing moved
    assert any("reading checkpoint step 6 failed" in r.getMessage() for r in caplog.records)


def test_an_always_failing_read_is_one_line_and_moves_nothing(workdir, monkeypatch):
    before = _files(workdir)
    manager = CheckpointManager(workdir, 1, 5)
    monkeypatch.setattr(checkpoints, "READ_ATTEMPTS", 4)
    calls = _failing(manager, monkeypatch, PermissionError(errno.EACCES, "Permission denied: 'gs://b/run/checkpoints/6'"), None)
    with pytest.raises(CheckpointError) as error:
        manager.restore_latest(_state(0), META)
    message = str(error.value)
    assert "\n" not in message and "step 6" in message and "PermissionError" in message and "4 tries" in message
    assert message.endswith("nothing was moved; run again when the storage is reachable")
    assert calls == [6] * 4  # never went on to the older step
    assert _files(workdir) == before and not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))
    with pytest.raises(SystemExit) as exit_:  # as the train command reports it: one line, exit status 1
        with user_errors("train"):
            manager.restore_latest(_state(0), META)
    assert str(exit_.value.code).startswith("train: checkpoint step 6 ")


def test_damage_still_sets_the_step_aside(workdir):
    """Garbage JSON in step 6's metadata: resume takes step 3, step 6 is moved aside, its bytes kept."""
    path = os.path.join(workdir, "checkpoints", "6", "meta", "metadata")
    with open(path, "w") as f:
        f.write("{not json")
    state = CheckpointManager(workdir, 1, 5).restore_latest(_state(0), META)
    assert int(state["step"]) == 3
    with open(os.path.join(workdir, "damaged_checkpoints", "6", "meta", "metadata")) as f:
        assert f.read() == "{not json"
    assert CheckpointManager(workdir, 1, 5).all_steps() == [3]


def test_an_absent_file_is_damage_only_when_its_folders_list(workdir, monkeypatch):
    """A deleted metadata file is damage; the same 'not found' while a folder of the step cannot be listed
    (how a folder without read permission looks to Orbax) is an error of reading: nothing moved."""
    os.remove(os.path.join(workdir, "checkpoints", "6", "meta", "metadata"))
    before = _files(workdir)
    path_type = type(epath.Path(workdir))
    real = path_type.iterdir

    def iterdir(self):
        if self.name == "6":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    with monkeypatch.context() as patch:
        patch.setattr(path_type, "iterdir", iterdir)
        with pytest.raises(CheckpointError, match="step 6 .*PermissionError.*nothing was moved"):
            CheckpointManager(workdir, 1, 5).restore_latest(_state(0), META)
    assert _files(workdir) == before
    state = CheckpointManager(workdir, 1, 5).restore_latest(_state(0), META)  # listable now: the file is missing
    assert int(state["step"]) == 3 and os.path.isdir(os.path.join(workdir, "damaged_checkpoints", "6"))


def test_read_error_kinds():
    try:
        json.loads("{not json")
    except ValueError as e:
        bad_json = e
    assert read_error_kind(bad_json) == "damage"
    assert read_error_kind(UnicodeDecodeError("utf-8", b"\xa5", 0, 1, "invalid start byte")) == "damage"
    assert read_error_kind(_wrapped('DATA_LOSS: Error reading "a/0" in OCDBT database: Error decoding')) == "damage"
    assert read_error_kind(_wrapped("OUT_OF_RANGE: Requested byte range [0, 2291) is not valid")) == "damage"
    assert read_error_kind(ValueError('FAILED_PRECONDITION: Error reading local file "_sharding": Invalid JSON')) == "damage"
    assert read_error_kind(FileNotFoundError("File /w/checkpoints/6/meta/metadata not found.")) == "missing"
    assert read_error_kind(KeyError('Item "state" was not found in the checkpoint. Available items: [\'meta\']')) == "missing"
    assert read_error_kind(ValueError('NOT_FOUND: Error reading "a/.zarray"')) == "missing"
    for transient in (PermissionError(13, "denied"), ConnectionError(), TimeoutError(), MemoryError(), OSError(5, "EIO"),
                      _wrapped("PERMISSION_DENIED: Failed to open"), _wrapped("DEADLINE_EXCEEDED: x"), RuntimeError("UNAVAILABLE: x")):
        assert read_error_kind(transient) == "unavailable", transient
    mismatch = ValueError("Requested shape: (999,) is not compatible with the stored shape: (1000,).")
    assert read_error_kind(mismatch) == "other" and read_error_kind(mismatch, as_saved=True) == "damage"
    assert read_error_kind(KeyError("rows")) == "other" and read_error_kind(ValueError("INVALID_ARGUMENT: x")) == "other"
