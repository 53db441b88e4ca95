"""The train loop's side tasks as hooks, each with its own ``every`` (clu's periodic actions).

The loop calls every hook after every step with a :class:`StepEnd`; a hook acts when it is due:
every ``every`` steps (0: never on a schedule) and, with ``at_last``, at a phase's last step and at
a stop (SIGTERM). Metrics (``metrics.jsonl``, TensorBoard, wandb, the progress bar, the NaN check),
checkpoints, exports, validation and the profiler are one hook each, in that order: metrics are
fetched and checked before a checkpoint of the same step is written.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from etils import epath

from jax_inversion.artifacts.export import export_step
from jax_inversion.core.errors import TrainError
from jax_inversion.core.files import is_remote

log = logging.getLogger("jax_inversion")


def _import_tensorboardx():
    """tensorboardX, imported without torch.

    Its writer module tries ``import torch`` only so that it can accept torch tensors, which this
    project never passes (it logs floats). Where torch is installed (the tests, machines that also run
    diffusers) that import is 1.5 of the 2 seconds ``import tensorboardX`` takes, in every train
    process; blocking it (``sys.modules["torch"] = None`` makes ``import torch`` raise ImportError,
    which tensorboardX catches) for the length of this import skips it. A torch already imported is left
    alone, and torch imports normally afterwards.
    """
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    import tensorboardX

    return tensorboardX


SummaryWriter = _import_tensorboardx().SummaryWriter


@dataclasses.dataclass
class StepEnd:
    """What a hook sees after a step."""

    step: int  # optimizer steps done, counted over every phase
    state: Any  # the TrainState after the step (device arrays)
    metrics: dict  # the step's metrics, still on device
    phase: Any  # the Phase it belongs to
    last: bool  # the phase's last step, or the run stops here (SIGTERM)


class Hook:
    """A side task of the loop: :meth:`run` every ``every`` steps (0: never) and, with ``at_last``, at a
    phase's last step. Subclasses override :meth:`run` (and :meth:`__call__` to see every step)."""

    every: int = 0
    at_last: bool = False

    def due(self, end: StepEnd) -> bool:
        return (self.every > 0 and end.step % self.every == 0) or (self.at_last and end.last)

    def start_phase(self, phase, step: int, compile_seconds: float) -> None:
        """Called once a phase's step is compiled, before its first step runs."""

    def before_step(self, step: int) -> None:
        """Called before the step that ends at ``step + 1``."""

    def __call__(self, end: StepEnd) -> None:
        if self.due(end):
            self.run(end)

    def run(self, end: StepEnd) -> None:
        """The side task itself."""

    def close(self) -> None:
        """Called once when the loop ends, however it ends."""


class MetricsHook(Hook):
    """Every step's metrics, fetched every ``every`` steps (and whenever a checkpoint is due, so that no
    checkpoint is written past a NaN) into ``metrics.jsonl``, the writer (TensorBoard, wandb) and the
    progress bar. Per-term gradient norms are computed only at logged steps, so only those are written.

    Raises (from :meth:`__call__`):
      TrainError: the state counted a non-finite loss or gradient.
    """

    at_last = True

    def __init__(self, every: int, also_every: int, metrics_file, writer, progress, last_good: Callable[[], Optional[int]]):
        self.every, self.also_every = every, also_every
        self.metrics_file, self.writer, self.progress, self.last_good = metrics_file, writer, progress, last_good
        self.pending, self.compile_seconds, self.last_time, self.last_step = [], 0.0, time.perf_counter(), 0

    def due(self, end: StepEnd) -> bool:
        return super().due(end) or end.step % self.also_every == 0

    def start_phase(self, phase, step: int, compile_seconds: float) -> None:
        self.compile_seconds, self.last_time, self.last_step, self.pending = compile_seconds, time.perf_counter(), step, []

    def __call__(self, end: StepEnd) -> None:
        self.pending.append((end.step, end.metrics))
        super().__call__(end)
        self.progress.update(1)

    def run(self, end: StepEnd) -> None:
        fetched, self.pending = jax.device_get(self.pending), []
        now = time.perf_counter()
        rate = (end.step - self.last_step) / max(now - self.last_time, 1e-9) if end.step > self.last_step else float("nan")
        self.last_time, self.last_step = now, end.step
        if int(end.state.nonfinite_steps) > 0:
            kept = self.last_good()
            raise TrainError(
                f"loss or gradients became NaN/inf by step {end.step}: lower --config.train.learning_rate "
                f"(the last good checkpoint{'' if kept is None else f', step {kept},'} is kept)"
            )
        for step, metrics in fetched:
            logged_step = step % self.every == 0
            record = {"step": step, "phase": end.phase.name,
                      **{k: float(v) for k, v in metrics.items() if logged_step or not k.startswith("grad_norm/")}}
            if step == end.step and np.isfinite(rate):
                record["steps_per_second"] = rate
                record["compile_seconds"] = round(self.compile_seconds, 2)
            if self.metrics_file:
                self.metrics_file.write(json.dumps(record) + "\n")
            if self.writer:
                for k, v in record.items():
                    if k not in ("step", "phase"):
                        self.writer.add_scalar(k, v, step)
        if self.metrics_file:
            self.metrics_file.flush()
        self.progress.set_postfix(loss=f"{float(fetched[-1][1]['loss']):.4f}", steps_per_s=f"{rate:.2f}")


class CheckpointHook(Hook):
    """An Orbax checkpoint every ``every`` steps and at a phase's end or a stop (forced there); TensorBoard
    events uploaded with it (gs:// workdirs)."""

    at_last = True

    def __init__(self, every: int, manager, metadata: dict, writer):
        self.every, self.manager, self.metadata, self.writer = max(1, every), manager, metadata, writer

    def run(self, end: StepEnd) -> None:
        self.manager.save(end.step, end.state, self.metadata, force=end.last)
        if hasattr(self.writer, "upload"):
            self.writer.upload()


class ExportHook(Hook):
    """``train.export_every``: the rows as an embedding file every ``every`` steps and at a phase's end (first process)."""

    def __init__(self, every: int, workdir: str, metadata: dict):
        self.every, self.at_last, self.workdir, self.metadata = every, every > 0, workdir, metadata

    def run(self, end: StepEnd) -> None:
        if jax.process_index() != 0:
            return
        rows = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), end.state.embeddings)
        for path in export_step(self.workdir, end.step, rows, self.metadata):
            log.info("step %d: wrote %s", end.step, path)


class ValidationHook(Hook):
    """``validate(step, rows, metadata, writer)`` every ``train.validation_every`` steps (first process)."""

    def __init__(self, every: int, validate, metadata: dict, writer):
        self.every, self.validate, self.metadata, self.writer = every, validate, metadata, writer

    def run(self, end: StepEnd) -> None:
        if jax.process_index() == 0:
            self.validate(end.step, jax.device_get(end.state.embeddings), self.metadata, self.writer)


class ProfileHook(Hook):
    """``train.profile_steps = (first, stop)``: a ``jax.profiler`` trace of steps ``[first, stop)`` in
    ``WORKDIR/profile`` (TensorBoard's profile plugin, Perfetto)."""

    def __init__(self, steps, workdir: str):
        self.first, self.stop = (tuple(steps) + (0, 0))[:2] if steps else (0, 0)
        self.directory, self.active = os.path.join(workdir, "profile"), False

    def before_step(self, step: int) -> None:
        if self.first <= step < self.stop and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def __call__(self, end: StepEnd) -> None:
        if self.active and (end.step >= self.stop or end.last):
            jax.block_until_ready(end.state)
            jax.profiler.stop_trace()
            self.active = False
            log.warning("profile of steps %d-%d written to %s", self.first, end.step - 1, self.directory)


class UploadedSummaryWriter(SummaryWriter):
    """TensorBoard events written locally and copied to a gs:// ``target`` at each checkpoint and at the end
    (tensorboardX's own GCS writer needs the google-cloud-storage client and project settings)."""

    def __init__(self, target: str):
        self.target, self.local = epath.Path(target), tempfile.mkdtemp(prefix="jax_inversion_tensorboard_")
        super().__init__(self.local)

    def upload(self) -> None:
        self.flush()
        for root, _, names in os.walk(self.local):
            for name in names:
                path = os.path.join(root, name)
                destination = self.target / os.path.relpath(path, self.local)
                destination.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "rb") as f:
                    destination.write_bytes(f.read())

    def close(self) -> None:
        super().close()
        self.upload()
        shutil.rmtree(self.local, ignore_errors=True)


def summary_writer(directory: str):
    """A TensorBoard writer for ``directory``, local or gs://."""
    return UploadedSummaryWriter(directory) if is_remote(directory) else SummaryWriter(directory)


class MetricsFile:
    """``metrics.jsonl``, appended to: a local file as such; on an object store (no appends) the whole
    file is rewritten at each flush (the loop flushes at logged steps only)."""

    def __init__(self, path: str):
        self.remote = is_remote(path)
        if self.remote:
            self.path = epath.Path(path)
            self.text = self.path.read_text() if self.path.exists() else ""
        else:
            self.file = open(path, "a")

    def write(self, line: str) -> None:
        if self.remote:
            self.text += line
        else:
            self.file.write(line)

    def flush(self) -> None:
        if self.remote:
            self.path.write_text(self.text)
        else:
            self.file.flush()

    def close(self) -> None:
        self.flush()
        if not self.remote:
            self.file.close()


def wandb_module():
    """The ``wandb`` package (optional, imported only when ``train.wandb`` is on)."""
    try:
        import wandb
    except ImportError:
        raise TrainError("train.wandb needs the wandb package: pip install wandb, or leave --config.train.wandb=False") from None
    return wandb


class WandbWriter:
    """What the loop logs to TensorBoard, also sent to a Weights & Biases run (scalars and images)."""

    def __init__(self, tensorboard, run):
        self.tensorboard, self.run = tensorboard, run

    def add_scalar(self, key, value, step):
        self.tensorboard.add_scalar(key, value, step)
        self.run.log({key: value}, step=step)

    def add_image(self, key, image, step, **kwargs):
        self.tensorboard.add_image(key, image, step, **kwargs)
        self.run.log({key: wandb_module().Image(np.asarray(image))}, step=step)

    def upload(self):
        getattr(self.tensorboard, "upload", lambda: None)()

    def close(self):
        self.tensorboard.close()
        self.run.finish()


def open_writers(config, workdir: str, wandb=None):
    """``(writer, metrics_file)`` of the first process (TensorBoard, with wandb when given); ``(None, None)`` elsewhere."""
    if jax.process_index() != 0:
        return None, None
    writer = summary_writer(os.path.join(workdir, "tensorboard"))
    if wandb is not None:
        run = wandb.init(project=config.train.wandb_project, dir=workdir, config=config.to_dict(),
                         name=os.path.basename(os.path.normpath(workdir)), resume="allow")
        writer = WandbWriter(writer, run)
    return writer, MetricsFile(os.path.join(workdir, "metrics.jsonl"))
