"""Multi-process (multi-host) training, rehearsed on one machine: 2 processes x 4 CPU devices.

The processes are started by ``launch/local_multiprocess.py`` and joined by ``jax.distributed``
(gloo collectives), each feeding its half of every global batch, exactly as the hosts of a
pod or a SLURM job would. The run must equal a 1-process run on 8 devices.
"""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import optax
import pytest

from jax_inversion.artifacts.checkpoints import CheckpointManager, read_run
from jax_inversion.commands import runtime
from jax_inversion.commands.default_job import write_concept_images
from tests.xla_flags import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.py")
DISTRIBUTED_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "JAX_NUM_CPU_DEVICES")


def _train_args(model, concept_dir, workdir):
    return [
        "train", f"--workdir={workdir}", f"--config.model={model}", f"--config.data.concept_dir={concept_dir}",
        "--config.data.placeholder_token=<ball>", "--config.data.initializer_token=ball", "--config.data.num_vectors=2",
        "--config.train.batch_size=8", "--config.train.num_steps=4", "--config.train.log_every=2",
        "--config.train.checkpoint_every=2", "--config.train.learning_rate=5e-3", "--config.seed=0",
    ]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARS and not k.startswith("SLURM_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, (REPO, env.get("PYTHONPATH")))))
    return env


def _launch(args, env, num_processes=2, devices_per_process=4):
    return subprocess.Popen(
        [sys.executable, LAUNCHER, "--num_processes", str(num_processes), "--devices_per_process", str(devices_per_process),
         "--", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.fixture(scope="module")
def runs(one_level_sd1, tmp_path_factory):
    """The same 4-step job as 1 process x 8 devices and as 2 processes x 4 devices (via the launcher)."""
    root = tmp_path_factory.mktemp("multihost")
    concept_dir = write_concept_images(str(root / "concept"), count=4)
    env = _env()
    one_dir, two_dir = str(root / "one"), str(root / "two")
    start = time.perf_counter()
    # Both jobs at once (the machine has few cores; neither needs all of them).
    one = subprocess.Popen(
        [sys.executable, "-m", "jax_inversion.cli", *_train_args(one_level_sd1, concept_dir, one_dir)],
        env=dict(env, XLA_FLAGS=xla_flags(8)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    two = _launch(_train_args(one_level_sd1, concept_dir, two_dir), env)
    two_out, _ = two.communicate(timeout=400)
    one_out, _ = one.communicate(timeout=400)
    seconds = time.perf_counter() - start
    assert one.returncode == 0, one_out[-3000:]
    assert two.returncode == 0, two_out[-3000:]
    return dict(one=one_dir, two=two_dir, two_out=two_out, seconds=seconds, model=one_level_sd1, concept_dir=concept_dir)


@pytest.mark.heavy(67)
def test_two_processes_equal_one_then_resume(runs, tmp_path):
    """The 2-process run equals the 1-process one; run again with more steps, it resumes from its
    checkpoint (one test, so that the runs are made once, on one worker)."""
    one_dir, two_dir, two_out = runs["one"], runs["two"], runs["two_out"]
    # Every process trained (each prints its own line, prefixed by the launcher).
    assert "[p0] trained to step 4" in two_out and "[p1] trained to step 4" in two_out, two_out[-3000:]

    steps = {d: CheckpointManager(d, 1, 1, read_only=True).all_steps() for d in (one_dir, two_dir)}
    assert sorted(steps[one_dir]) == sorted(steps[two_dir]) == [2, 4]
    step_one, state_one, meta_one = read_run(one_dir)
    step_two, state_two, meta_two = read_run(two_dir)
    assert step_one == step_two == 4
    assert meta_one["layout"] == meta_two["layout"]
    rows_one = np.asarray(state_one["embeddings"]["text_encoder"])
    rows_two = np.asarray(state_two["embeddings"]["text_encoder"])
    assert rows_one.shape == (2, 32)
    max_diff = float(np.abs(rows_one - rows_two).max())
    print(f"\n2 processes x 4 devices vs 1 x 8: max |rows difference| = {max_diff:.3g} "
          f"(rows up to {np.abs(rows_one).max():.3g}); both runs {runs['seconds']:.0f} s")
    np.testing.assert_allclose(rows_two, rows_one, atol=1e-6, rtol=0)
    assert int(state_two["step"]) == 4
    # The optimizer moments travel the same way.
    mu = lambda s: np.asarray(optax.tree_utils.tree_get(s["opt_state"], "mu")["text_encoder"])
    np.testing.assert_allclose(mu(state_two), mu(state_one), atol=1e-6, rtol=0)
    # One metrics line per step (process 0 writes them; the others do not duplicate them).
    with open(os.path.join(two_dir, "metrics.jsonl")) as f:
        assert [int(line.split('"step": ')[1].split(",")[0]) for line in f] == [1, 2, 3, 4]
    assert len(os.listdir(os.path.join(two_dir, "tensorboard"))) == 1

    # Resumed: a copy of the 2-process run, run again to step 6.
    workdir = str(tmp_path / "two")
    shutil.copytree(runs["two"], workdir)
    args = [a.replace("num_steps=4", "num_steps=6") for a in _train_args(runs["model"], runs["concept_dir"], workdir)]
    proc = _launch(args, _env())
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert CheckpointManager(workdir, 1, 1, read_only=True).all_steps() == [2, 4, 6]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [int(line.split('"step": ')[1].split(",")[0]) for line in f] == [1, 2, 3, 4, 5, 6]


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX's threads in this pytest process: the child only calls prctl
def test_launcher_stops_the_others_when_one_fails(tmp_path):
    """Process 1 fails at once; process 0 (which would wait a minute) is stopped, the status is kept."""
    sys.path.insert(0, os.path.join(REPO, "launch"))
    try:
        import local_multiprocess
    finally:
        sys.path.pop(0)
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/sh\n"
        'echo "process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES at $JAX_COORDINATOR_ADDRESS; $XLA_FLAGS; $JAX_PLATFORMS"\n'
        'if [ "$JAX_PROCESS_ID" = 1 ]; then echo boom; exit 3; fi\n'
        "exec sleep 60\n"
    )
    fake_python.chmod(0o755)
    out = tmp_path / "out.txt"
    start = time.perf_counter()
    with open(out, "w") as f:
        status = local_multiprocess.launch(["train"], 2, 3, python=str(fake_python), grace_seconds=5, out=f)
    text = out.read_text()
    assert status == 3, text
    assert time.perf_counter() - start < 30
    assert "[p1] boom" in text
    assert "[p0] process 0 of 2 at localhost:" in text and "[p1] process 1 of 2 at localhost:" in text
    assert "--xla_force_host_platform_device_count=3; cpu" in text
    assert "[launch] process 1 exited with 3" in text


# ----------------------------------------------------------------------------- how a process finds its place


@pytest.fixture
def calls(monkeypatch):
    """Records jax.distributed.initialize calls instead of making them; a clean environment."""
    import jax

    for key in list(os.environ):
        if key.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE", "TPU_WORKER", "CUDA_VISIBLE")) or key == "JAX_DISTRIBUTED":
            monkeypatch.delenv(key)
    made = []
    from jax._src import cloud_tpu_init

    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)  # as here, on a TPU VM too
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: made.append(k))
    return made


def test_single_process_does_not_initialize(calls, monkeypatch):
    runtime.initialize_distributed()
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # a one-task SLURM step: nothing to join
    monkeypatch.setenv("SLURM_STEP_NODELIST", "n1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    runtime.initialize_distributed()
    assert calls == []


def test_explicit_variables(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    runtime.initialize_distributed()
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2, local_device_ids=None,
                          cluster_detection_method="deactivate")]


FAKE_SCONTROL = """#!/bin/sh
# scontrol show hostnames LIST, as SLURM's: one host a line; an unknown list fails
[ "$1 $2" = "show hostnames" ] || exit 2
echo "$3" >> "$(dirname "$0")/asked"
case "$3" in
  "gpu[007-008]") printf 'gpu007\\ngpu008\\n' ;;
  "a[1-2]-ib") printf 'a1-ib\\na2-ib\\n' ;;
  "n[1-2]-ib[0-1]") printf 'n1-ib0\\nn1-ib1\\nn2-ib0\\nn2-ib1\\n' ;;
  *) echo "scontrol: error: Unable to create hostlist from $3" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A fake ``scontrol`` first on PATH; returns the file listing the node lists it was asked."""
    bin_dir = tmp_path / "slurm_bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bin_dir / "asked"


@pytest.fixture
def no_scontrol(tmp_path, monkeypatch):
    """A PATH without scontrol."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def _slurm(monkeypatch, tasks, tasks_per_node, procid, localid, nodeid):
    for key, value in dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[007-008]", SLURM_NTASKS=str(tasks),
                           SLURM_PROCID=str(procid), SLURM_LOCALID=str(localid), SLURM_NODEID=str(nodeid),
                           SLURM_STEP_TASKS_PER_NODE=tasks_per_node).items():
        monkeypatch.setenv(key, value)


def test_slurm_one_task_per_node_uses_all_gpus(calls, monkeypatch, scontrol):
    _slurm(monkeypatch, 2, "1(x2)", procid=1, localid=0, nodeid=1)
    runtime.initialize_distributed()
    port = 4242 % 4096 + 65535 - 4096 + 1
    assert calls == [dict(coordinator_address=f"gpu007:{port}", num_processes=2, process_id=1, local_device_ids=None,
                          cluster_detection_method="deactivate")]
    assert scontrol.read_text().splitlines() == ["gpu[007-008]"]


def test_slurm_one_task_per_gpu(calls, monkeypatch, scontrol):
    _slurm(monkeypatch, 16, "8(x2)", procid=13, localid=5, nodeid=1)
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "5555")
    runtime.initialize_distributed()  # every task sees the node's 8 GPUs: it takes GPU SLURM_LOCALID
    assert calls[-1] == dict(coordinator_address="gpu007:5555", num_processes=16, process_id=13, local_device_ids=[5],
                             cluster_detection_method="deactivate")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # --gpus-per-task=1: SLURM bound it; it is device 0 now
    runtime.initialize_distributed()
    assert calls[-1]["local_device_ids"] is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "5")  # the user's choice wins (JAX reads it)
    runtime.initialize_distributed()
    assert calls[-1]["local_device_ids"] is None
    # The sbatch script's explicit variables win over SLURM's, with the same device rule.
    monkeypatch.delenv("JAX_LOCAL_DEVICE_IDS")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "gpu007:6000")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "16")
    monkeypatch.setenv("JAX_PROCESS_ID", "13")
    runtime.initialize_distributed()
    assert calls[-1] == dict(coordinator_address="gpu007:6000", num_processes=16, process_id=13, local_device_ids=[5],
                             cluster_detection_method="deactivate")


def test_tpu_and_opt_in_use_jax_detection(calls, monkeypatch):
    monkeypatch.setenv("JAX_DISTRIBUTED", "auto")
    runtime.initialize_distributed()
    monkeypatch.delenv("JAX_DISTRIBUTED")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1,t2")
    runtime.initialize_distributed()
    assert calls == [{}, {}]


@pytest.mark.parametrize("nodelist,first", [("a[1-2]-ib", "a1-ib"), ("n[1-2]-ib[0-1]", "n1-ib0"), ("gpu[007-008]", "gpu007")])
def test_first_slurm_host_is_scontrols_first_line(nodelist, first, scontrol):
    assert runtime.first_slurm_host(nodelist) == first
    assert scontrol.read_text().splitlines() == [nodelist]


def test_first_slurm_host_without_scontrol_expands_nothing(no_scontrol):
    assert runtime.first_slurm_host("node001") == "node001"
    assert runtime.first_slurm_host("node001,host2") == "node001"  # a plain list: nothing to expand
    with pytest.raises(runtime.LaunchError) as error:
        runtime.first_slurm_host("a[1-2]-ib")  # the hand parser said "a1"
    message = str(error.value)
    assert "\n" not in message and "'a[1-2]-ib'" in message and "scontrol is not on PATH" in message
    assert "JAX_COORDINATOR_ADDRESS" in message


def test_scontrol_failing_is_one_line(scontrol):
    with pytest.raises(runtime.LaunchError, match=r"scontrol show hostnames 'bad\[' failed \(scontrol: error: Unable to create hostlist"):
        runtime.first_slurm_host("bad[")


def test_slurm_without_scontrol_needs_the_coordinator_address(calls, monkeypatch, no_scontrol):
    _slurm(monkeypatch, 2, "1(x2)", procid=1, localid=0, nodeid=1)  # SLURM_STEP_NODELIST=gpu[007-008]
    with pytest.raises(SystemExit) as exit_:
        runtime.initialize_distributed()
    assert "\n" not in str(exit_.value.code) and "JAX_COORDINATOR_ADDRESS" in str(exit_.value.code)
    assert calls == []
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "gpu007:6000")  # what launch/slurm_gpu.sbatch sets
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    runtime.initialize_distributed()
    assert calls == [dict(coordinator_address="gpu007:6000", num_processes=2, process_id=1, local_device_ids=None,
                          cluster_detection_method="deactivate")]


def test_slurm_tasks_on_node():
    assert [runtime.slurm_tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert runtime.slurm_tasks_on_node("4", 0) == 4
