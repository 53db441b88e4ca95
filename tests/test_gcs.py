"""A gs:// workdir end to end against a real GCS emulator (gcp-storage-emulator, started on localhost;
tests/gcs_emulator.py adds the generation headers of media downloads that TensorStore needs, and serves
it threaded, so one stalled client connection cannot block every other client).

Nothing of ours is mocked: the job writes through etils.epath (gcsfs, honouring
STORAGE_EMULATOR_HOST) and Orbax through TensorStore (honouring TENSORSTORE_GCS_HTTP_URL), the same
code paths as a real bucket. Covers train, a hard kill (SIGKILL, no chance to save), resume,
export (to gs://), sample, and an unreachable bucket (one line). Every job has a time limit, so a
hang fails with its stderr rather than stalling the suite.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.xla_flags import xla_flags

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

BUCKET = "jax-inversion-test"
TIMEOUT = 300  # seconds for any one job


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
    """The emulator on a free port, and the environment that points both clients at it."""
    port = _free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", str(port), BUCKET], cwd=root,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert time.time() < deadline and process.poll() is None, "the GCS emulator did not start"
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": "test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process reads the bucket too (checkpoints, exported files)
    yield dict(os.environ, XLA_FLAGS=xla_flags(2), **env)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _cli(command, *args, env):
    try:
        return subprocess.run([sys.executable, "-m", "jax_inversion.cli", command, *args], capture_output=True,
                              text=True, env=env, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as hung:
        stderr = (hung.stderr or b"").decode(errors="replace")  # bytes here, even with text=True
        pytest.fail(f"jax-inversion {command} ran over {TIMEOUT} s; stderr:\n{stderr[-3000:]}")


@pytest.mark.heavy(53)
def test_gs_workdir_train_kill_resume_export_sample(emulator, one_level_sd1, tmp_path):
    from etils import epath

    from jax_inversion.artifacts.checkpoints import CheckpointManager, read_run
    from jax_inversion.commands.default_job import write_concept_images
    from jax_inversion.artifacts.export import read_embedding_file

    workdir = f"gs://{BUCKET}/runs/ball"
    concept = write_concept_images(str(tmp_path / "concept"), count=2)
    args = [f"--workdir={workdir}", f"--config.model={one_level_sd1}", f"--config.data.concept_dir={concept}",
            "--config.data.placeholder_token=<ball>", "--config.data.initializer_token=ball",
            "--config.train.batch_size=2", "--config.train.checkpoint_every=2", "--config.train.export_every=2",
            "--config.train.log_every=1", "--config.train.compilation_cache=False"]
    # Train, then kill -9 (a preempted VM): whatever Orbax had in flight must not break the resume.
    log = tmp_path / "train.log"  # a file, not an undrained pipe: once a pipe is full, the job blocks on logging
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "jax_inversion.cli", "train", *args, "--config.train.num_steps=100000"],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=emulator)
    try:
        deadline = time.time() + TIMEOUT
        while not (epath.Path(workdir) / "embeddings" / "ball_step_000004.safetensors").exists():
            assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
    finally:
        process.kill()  # SIGKILL: step 4's checkpoint may be half written, and Orbax must skip it
        process.wait(timeout=60)
    steps = CheckpointManager(workdir, 1, 1, read_only=True).all_steps()
    assert steps and min(steps) >= 2, steps
    target = max(steps) + 2
    # The killed job may have been writing step `target` (on GCS Orbax writes in place and marks the
    # step finished, no rename): leave such an unfinished step there every time, not only when the
    # kill happens to land mid-save, so that the resume must cope with it.
    checkpoints = epath.Path(workdir) / "checkpoints"
    folders = [checkpoints / str(max(steps))]
    while folders:  # a copy of the newest step without its commit marker
        for source in folders.pop().iterdir():
            if source.is_dir():
                folders.append(source)
            elif source.name != "commit_success.txt":
                destination = checkpoints / str(target) / source.relative_to(checkpoints / str(max(steps)))
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(source.read_bytes())
    assert CheckpointManager(workdir, 1, 1, read_only=True).all_steps() == steps  # unfinished: not a step
    resumed = _cli("train", *args, f"--config.train.num_steps={target}", env=emulator)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step, state, _ = read_run(workdir)
    assert step == target, (step, resumed.stderr[-3000:])  # once seen 4 == 6 under a loaded CPU: the log says why
    names = {p.name for p in (epath.Path(workdir) / "embeddings").iterdir()}
    assert f"ball_step_{target:06d}.safetensors" in names
    assert (epath.Path(workdir) / "config.json").exists()
    logged = [json.loads(line)["step"] for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert logged[-2:] == [target - 1, target] and max(steps) + 1 in logged  # the resumed run appended its steps
    assert any((epath.Path(workdir) / "tensorboard").iterdir())
    assert any((epath.Path(workdir) / "latents").iterdir())

    out = f"{workdir}/exported/ball.safetensors"
    exported = _cli("export", f"--workdir={workdir}", "--format=diffusers", f"--out={out}", env=emulator)
    assert exported.returncode == 0, exported.stderr[-3000:]
    np.testing.assert_array_equal(read_embedding_file(out)["rows"]["text_encoder"], np.asarray(state["embeddings"]["text_encoder"]))

    grid = tmp_path / "grid.png"
    sampled = _cli("sample", f"--workdir={workdir}", "--prompt=a photo of <ball>", f"--out={grid}", "--num-images=2",
                   "--steps=2", env=emulator)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert grid.stat().st_size > 0


def test_unreachable_bucket_is_one_line(emulator):
    from jax_inversion.core.errors import TrainError
    from jax_inversion.training.train import check_writable

    with pytest.raises(TrainError) as error:
        check_writable("gs://no-such-bucket-of-ours/run")
    message = str(error.value)
    assert "\n" not in message and "gs://no-such-bucket-of-ours/run cannot be written" in message
