"""The train loop's hooks: each acts on its own schedule, metrics are checked before a checkpoint."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from jax_inversion.core.errors import TrainError
from jax_inversion.training.hooks import CheckpointHook, ExportHook, Hook, MetricsHook, StepEnd

PHASE = SimpleNamespace(name="concept")


def ends(n, last_at=None, nonfinite_from=None):
    """StepEnd 1..n, the last one marked last (or ``last_at``), with a loss of step/10."""
    for step in range(1, n + 1):
        bad = nonfinite_from is not None and step >= nonfinite_from
        state = SimpleNamespace(nonfinite_steps=np.int32(int(bad)), embeddings={})
        metrics = {"loss": np.float32(step / 10), "grad_norm": np.float32(1.0), "grad_norm/diffusion": np.float32(0.5)}
        yield StepEnd(step, state, metrics, PHASE, last=step == (last_at or n))


class Recorder(Hook):
    def __init__(self, every, at_last):
        self.every, self.at_last, self.steps = every, at_last, []

    def run(self, end):
        self.steps.append(end.step)


@pytest.mark.parametrize("every,at_last,expected", [(3, True, [3, 6, 7]), (3, False, [3, 6]), (0, True, [7]), (0, False, [])])
def test_a_hook_runs_every_n_steps_and_at_the_last_when_asked(every, at_last, expected):
    hook = Recorder(every, at_last)
    for end in ends(7):
        hook(end)
    assert hook.steps == expected


class Lines:
    def __init__(self):
        self.lines, self.flushes = [], 0

    def write(self, line):
        self.lines.append(json.loads(line))

    def flush(self):
        self.flushes += 1


class Progress:
    def __init__(self):
        self.n, self.postfix = 0, None

    def update(self, k):
        self.n += k

    def set_postfix(self, **kw):
        self.postfix = kw


def test_metrics_are_written_at_log_and_checkpoint_steps_with_term_norms_only_where_logged():
    lines, progress = Lines(), Progress()
    hook = MetricsHook(every=4, also_every=3, metrics_file=lines, writer=None, progress=progress, last_good=lambda: None)
    hook.start_phase(PHASE, 0, compile_seconds=1.5)
    for end in ends(7):
        hook(end)
    assert [r["step"] for r in lines.lines] == [1, 2, 3, 4, 5, 6, 7]  # every step's record, fetched in batches
    assert lines.flushes == 4  # at 3 (checkpoint), 4 (log), 6 (checkpoint), 7 (last)
    assert [r["step"] for r in lines.lines if "grad_norm/diffusion" in r] == [4]  # computed only at logged steps
    assert [r["step"] for r in lines.lines if "compile_seconds" in r] == [3, 4, 6, 7]
    assert all(r["compile_seconds"] == 1.5 for r in lines.lines if "compile_seconds" in r)
    assert np.isclose(lines.lines[4]["loss"], 0.5) and progress.n == 7 and progress.postfix["loss"] == "0.7000"


def test_a_nonfinite_step_stops_the_run_before_its_checkpoint_naming_the_last_good_one():
    saved = []
    manager = SimpleNamespace(save=lambda step, state, metadata, force: saved.append(step), latest_step=lambda: saved[-1] if saved else None)
    hooks = [MetricsHook(5, 2, Lines(), None, Progress(), manager.latest_step), CheckpointHook(2, manager, {}, None)]
    with pytest.raises(TrainError, match="NaN/inf by step 4.*step 2, is kept"):
        for end in ends(8, nonfinite_from=3):
            for hook in hooks:
                hook(end)
    assert saved == [2]  # step 4's checkpoint was never written


def test_checkpoints_are_forced_only_at_a_phase_end_and_exports_follow_export_every(tmp_path):
    saved = []
    manager = SimpleNamespace(save=lambda step, state, metadata, force: saved.append((step, force)))
    checkpoint = CheckpointHook(3, manager, {}, None)
    for end in ends(7):
        checkpoint(end)
    assert saved == [(3, False), (6, False), (7, True)]
    assert [e.step for e in ends(7) if ExportHook(4, str(tmp_path), {}).due(e)] == [4, 7]
    assert [e.step for e in ends(7) if ExportHook(0, str(tmp_path), {}).due(e)] == []  # export_every=0: none, not even at the end
