"""Textual-inversion training on a tiny diffusers-format model built with PyTorch."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from jax_inversion.artifacts.checkpoints import CheckpointManager
from jax_inversion.commands.default_job import write_concept_images
from jax_inversion.models.loading import load_pretrained
from jax_inversion.training.train import train
from tests.helpers import make_config
from tests.xla_flags import xla_flags


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    return write_concept_images(str(tmp_path_factory.mktemp("concept")), count=4)


def final_rows(workdir):
    manager = CheckpointManager(workdir, 1, 1, read_only=True)
    step = manager.latest_step()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return step, records


def test_latent_cache_follows_the_vae_weights_not_only_the_model_path(one_level_sd1, concept_dir, tmp_path):
    """A model retrained in place (same path, new VAE) gets its own latents, not the cached ones of the old weights."""
    import dataclasses

    from jax_inversion.data.phases import plan_run
    from jax_inversion.data.dataset import build_dataset

    config = make_config(one_level_sd1, concept_dir, num_steps=1)
    config.data.flip_probability = 0.0
    model = load_pretrained(one_level_sd1)
    phase = plan_run(config).phases[0]
    first = build_dataset(config, model, phase, str(tmp_path))
    again = build_dataset(config, model, phase, str(tmp_path))
    np.testing.assert_array_equal(first.latent_mean, again.latent_mean)
    assert len(os.listdir(tmp_path / "latents")) == 1
    params = jax.tree.map(np.array, model.vae_params)
    params["encoder"]["conv_in"]["kernel"] *= 1.5
    retrained = dataclasses.replace(model, vae_params=params)
    changed = build_dataset(config, retrained, phase, str(tmp_path))
    assert len(os.listdir(tmp_path / "latents")) == 2 and not np.allclose(changed.latent_mean, first.latent_mean)
    fresh = build_dataset(config, retrained, phase, str(tmp_path / "fresh"))  # no cache to reuse
    np.testing.assert_array_equal(changed.latent_mean, fresh.latent_mean)


@pytest.mark.heavy(31)
def test_loss_decreases_and_frozen_rows_identical(one_level_sd1, concept_dir, tmp_path):
    """Fixed concept, fixed noise: the denoising loss on a fixed evaluation batch falls over 50 steps."""
    import jax.numpy as jnp

    from tests.helpers import encode_with_rows

    config = make_config(one_level_sd1, concept_dir, num_steps=50, learning_rate=2e-2, checkpoint_every=50, log_every=10)
    config.data.flip_probability = 0.0
    model = load_pretrained(one_level_sd1)
    table_before = np.array(model.text_encoder_params["text_model"]["embeddings"]["token_embedding"]["embedding"])
    params_before = jax.tree_util.tree_map(np.array, model.text_encoder_params)
    state = train(config, str(tmp_path))
    assert int(state.step) == 50

    # The frozen model on disk and the table the job used are untouched, bit for bit.
    after = load_pretrained(one_level_sd1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_before, jax.tree_util.tree_map(np.array, after.text_encoder_params))
    assert np.array_equal(table_before, np.asarray(after.text_encoder_params["text_model"]["embeddings"]["token_embedding"]["embedding"]))

    # Evaluate the learned rows vs the initial ones on the same noise/timesteps.
    from jax_inversion.text import tokens as tokens_lib
    from jax_inversion.diffusion.schedule import NoiseSchedule, add_noise, training_target
    from jax_inversion.data.phases import plan_run
    from jax_inversion.data.dataset import build_dataset

    layout = tokens_lib.add_placeholder_tokens(model.tokenizer, ["<ball>", "<ball>_1"])
    dataset = build_dataset(config, model, plan_run(config).phases[0], str(tmp_path))
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    rng = np.random.default_rng(0)
    n = 32
    rows = rng.integers(0, dataset.num_images, n)
    latents = dataset.latent_mean[rows] * model.vae.config.scaling_factor
    noise = rng.standard_normal(latents.shape).astype(np.float32)
    t = jnp.asarray(rng.integers(100, 900, n))
    ids = jnp.asarray(dataset.input_ids["text_encoder"][rng.integers(0, dataset.num_prompts, n)])

    @jax.jit
    def mean_loss(learned):
        states = encode_with_rows(model.text_encoder, model.text_encoder_params, ids, learned, layout.first_id).last_hidden_state
        noisy = add_noise(schedule, jnp.asarray(latents), jnp.asarray(noise), t)
        pred = model.unet.apply({"params": model.unet_params}, noisy, t, states)
        return jnp.mean((pred - training_target(schedule, jnp.asarray(latents), jnp.asarray(noise), t)) ** 2)

    eval_loss = lambda learned: float(mean_loss(learned))

    init_id = model.tokenizer.encode("ball", add_special_tokens=False)[0]
    initial = jnp.stack([table_before[init_id]] * 2)
    learned = state.embeddings["text_encoder"]
    assert eval_loss(learned) < eval_loss(initial) - 1e-3
    assert not np.allclose(np.asarray(learned), np.asarray(initial))
    _, records = final_rows(str(tmp_path))
    assert [r["step"] for r in records] == list(range(1, 51))
    assert all(np.isfinite(r["loss"]) for r in records)
    # One term: its gradient norm is the whole gradient's, logged at the log_every steps only.
    assert [r["step"] for r in records if "grad_norm/diffusion" in r] == [10, 20, 30, 40, 50]
    assert all(r["grad_norm/diffusion"] == r["grad_norm"] > 0 for r in records if "grad_norm/diffusion" in r)


@pytest.mark.heavy(13)
def test_one_device_equals_eight(one_level_sd1, concept_dir, tmp_path):
    assert jax.device_count() == 8
    config = make_config(one_level_sd1, concept_dir)
    one = train(config, str(tmp_path / "one"), devices=jax.devices()[:1])
    eight = train(config, str(tmp_path / "eight"))
    assert int(one.step) == int(eight.step) == 6
    np.testing.assert_allclose(np.asarray(one.embeddings["text_encoder"]), np.asarray(eight.embeddings["text_encoder"]), atol=1e-5, rtol=0)


@pytest.mark.heavy(12)
def test_resume_after_kill_equals_uninterrupted(one_level_sd1, concept_dir, tmp_path):
    import shutil

    config = make_config(one_level_sd1, concept_dir, num_steps=9)
    straight = train(config, str(tmp_path / "straight"))
    # A run killed after step 7: its last checkpoint is step 6 (step 9's never happened).
    partial = make_config(one_level_sd1, concept_dir, num_steps=9)
    partial.train.num_steps = 7
    train(partial, str(tmp_path / "killed"))
    ckpt = tmp_path / "killed" / "checkpoints"
    assert sorted(int(p) for p in os.listdir(ckpt) if p.isdigit()) == [3, 6, 7]
    shutil.rmtree(ckpt / "7")
    resumed = train(config, str(tmp_path / "killed"))
    assert int(resumed.step) == 9
    np.testing.assert_array_equal(np.asarray(resumed.embeddings["text_encoder"]), np.asarray(straight.embeddings["text_encoder"]))
    first_moment = lambda state: np.asarray(optax.tree_utils.tree_get(state.opt_state, "mu")["text_encoder"])
    np.testing.assert_array_equal(first_moment(resumed), first_moment(straight))


def _cli(*args, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "jax_inversion.cli", "train", *args], capture_output=True, text=True, env=env, **kwargs
    )


@pytest.mark.heavy(23)
def test_sigterm_saves_and_resumes(one_level_sd1, concept_dir, tmp_path):
    workdir = str(tmp_path / "run")
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    args = [f"--workdir={workdir}", f"--config.model={one_level_sd1}", f"--config.data.concept_dir={concept_dir}",
            "--config.data.placeholder_token=<ball>", "--config.data.initializer_token=ball",
            "--config.train.batch_size=2", "--config.train.checkpoint_every=100000", "--config.train.log_every=1"]
    process = subprocess.Popen([sys.executable, "-m", "jax_inversion.cli", "train", *args, "--config.train.num_steps=100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    steps = CheckpointManager(workdir, 1, 1, read_only=True).all_steps()
    assert len(steps) == 1 and 0 < steps[0] < 100000
    done = _cli(*args, f"--config.train.num_steps={steps[0] + 2}", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert CheckpointManager(workdir, 1, 1, read_only=True).latest_step() == steps[0] + 2


def _one_line_error(result, *needles):
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


@pytest.fixture(scope="module")
def existing_run(one_level_sd1, concept_dir, tmp_path_factory):
    """A finished run whose files must survive every bad invocation below."""
    workdir = str(tmp_path_factory.mktemp("existing"))
    train(make_config(one_level_sd1, concept_dir, num_steps=3), workdir)
    snapshot = {os.path.join(d, f): os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(workdir) for f in fs}
    return workdir, snapshot


BAD_INPUTS = [
    ("missing concept dir", ["--config.data.concept_dir={tmp}/nope"], ["does not exist"]),
    ("empty concept dir", ["--config.data.concept_dir={empty}"], ["no images"]),
    ("corrupt image", ["--config.data.concept_dir={corrupt}"], ["cannot read image", "broken.png"]),
    ("unknown model", ["--config.model={tmp}/no-model"], ["does not exist"]),
    ("placeholder in vocab", ["--config.data.placeholder_token=cat"], ["already exists"]),
    ("batch not divisible", ["--config.train.batch_size=3"], ["multiple of the 2 devices"]),
    # the images are checked before the model loads (seconds, where loading SD takes a minute): their error comes first
    ("images before the model", ["--config.model={tmp}/no-model", "--config.data.concept_dir={tmp}/nope"],
     ["concept dir", "nope does not exist"]),
]


@pytest.mark.parametrize("name,extra,needles", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_and_keeps_workdir(name, extra, needles, existing_run, one_level_sd1, concept_dir, tmp_path):
    workdir, snapshot = existing_run
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    write_concept_images(str(corrupt), count=2)
    (corrupt / "broken.png").write_bytes(os.urandom(300))
    base = [f"--workdir={workdir}", f"--config.model={one_level_sd1}", f"--config.data.concept_dir={concept_dir}",
            "--config.data.placeholder_token=<ball>", "--config.data.initializer_token=ball", "--config.data.num_vectors=2",
            "--config.train.batch_size=8", "--config.train.num_steps=6"]
    args = base + [a.format(tmp=tmp_path, empty=empty, corrupt=corrupt) for a in extra]
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    if name != "batch not divisible":
        args.append("--config.train.batch_size=2")
    _one_line_error(_cli(*args, env=env), *needles)
    after = {os.path.join(d, f): os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(workdir) for f in fs}
    assert after == snapshot


def test_unknown_config_key_and_unwritable_workdir(one_level_sd1, tmp_path):
    unknown = _cli(f"--workdir={tmp_path}/w", "--config.train.not_a_key=1")
    assert unknown.stderr.strip().splitlines() == [
        "train: unknown config key 'train.not_a_key' in the --config.* flags: see jax_inversion/configs/ for the keys"
    ]
    assert unknown.returncode != 0 and not (tmp_path / "w").exists()
    _one_line_error(_cli(f"--workdir={tmp_path}/w", "--config.train.num_steps=abc"), "num_steps", "invalid literal")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(_cli(f"--workdir={blocker}/sub"), "not writable")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(one_level_sd1, concept_dir, tmp_path):
    from jax_inversion.core.errors import TrainError

    workdir = str(tmp_path)
    train(make_config(one_level_sd1, concept_dir, num_steps=3), workdir)
    good = CheckpointManager(workdir, 1, 1, read_only=True)
    good_state = good.latest_step()
    # checkpoint_every=1: the overflowing update must be caught before anything is saved.
    config = make_config(one_level_sd1, concept_dir, num_steps=9, learning_rate=float("inf"), checkpoint_every=1)
    with pytest.raises(TrainError, match="NaN/inf"):
        train(config, workdir)
    assert CheckpointManager(workdir, 1, 1, read_only=True).all_steps() == [good_state]
    # Resuming with another optimizer layout is a clear error, not an Orbax traceback.
    from jax_inversion.artifacts.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="does not fit"):
        other_clipping = 0.0 if config.train.max_grad_norm > 0 else 1.0  # adds or drops the clipping state
        train(make_config(one_level_sd1, concept_dir, num_steps=9, max_grad_norm=other_clipping), workdir)


@pytest.mark.heavy(36)
def test_remat_policies_give_the_same_gradient(one_level_sd1):
    """Recomputing UNet activations in the backward pass changes memory, not the gradient. ``full`` checkpoints
    the UNet as one unit, ``blocks`` each of its blocks: the one-level model has 5 ResNet blocks (1 down, 2 mid,
    2 up) and 4 transformer blocks (1 down, 1 mid, 2 up), so 9 checkpoints. (The memory this saves shows on a TPU:
    the CPU compiler's temporaries barely move, so the TPU numbers are in the README.)"""
    import jax
    import jax.numpy as jnp

    from jax_inversion.text import tokens as tokens_lib
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.objectives.terms import Objective
    from jax_inversion.diffusion.schedule import NoiseSchedule
    from jax_inversion.text.conditioning import frozen_params
    from jax_inversion.training.step import StepConfig, make_forward

    model = load_pretrained(one_level_sd1)
    layout = tokens_lib.add_placeholder_tokens(model.tokenizer, ["<ball>"])
    rng = np.random.default_rng(0)
    ids = np.full((2, 77), model.tokenizer.eos_token_id, np.int32)
    ids[:, :3] = [[model.tokenizer.bos_token_id, 300, layout.first_id]] * 2
    batch = {"latent_mean": jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32),
             "latent_std": jnp.full((2, 16, 16, 4), 0.1, jnp.float32), "input_ids": {"text_encoder": jnp.asarray(ids)}}
    rows = {"text_encoder": jnp.asarray(rng.standard_normal((1, 32)) * 0.1, jnp.float32)}
    objective = Objective({"diffusion": 1.0})
    grads, checkpoints = {}, {}
    for remat in ("none", "full", "blocks"):
        forward = make_forward(model, NoiseSchedule.from_config(model.scheduler_config), {"text_encoder": layout},
                               objective, StepConfig(resolution=32, remat=remat))
        loss = lambda r: objective(forward(r, frozen_params(model), batch, jax.random.PRNGKey(0)))[0]
        equations = jax.make_jaxpr(loss)(rows).jaxpr.eqns
        checkpoints[remat] = sum(e.primitive.name in ("checkpoint", "remat2") for e in equations)
        grads[remat] = np.asarray(jax.jit(jax.grad(loss))(rows)["text_encoder"])
    assert checkpoints == {"none": 0, "full": 1, "blocks": 9}
    assert np.abs(grads["none"]).max() > 0
    np.testing.assert_allclose(grads["full"], grads["none"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(grads["blocks"], grads["none"], rtol=1e-5, atol=1e-8)


def test_attention_maps_and_their_gradient_are_the_same_under_block_remat(one_level_sd1):
    """``remat=blocks`` recomputes each block in the backward pass, the attention maps sown inside it too (the maps
    Compositional Inversion and SeFi train on): the maps and the gradient of a loss on them equal those without remat."""
    import jax
    import jax.numpy as jnp

    from jax_inversion.models.unet import Conditioning, cross_attention_layers
    from jax_inversion.text.conditioning import run_unet

    model = load_pretrained(one_level_sd1)
    layers = tuple(cross_attention_layers(model.unet.config, 16))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
    states = jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32)
    timesteps = jnp.asarray([10, 500])
    results = {}
    for remat in ("none", "blocks"):
        maps_of = lambda s, remat=remat: run_unet(model, model.unet_params, x, timesteps,
                                                  Conditioning(s, capture_maps=layers), None, remat)[1]
        loss = lambda s, maps_of=maps_of: sum(jnp.sum(m[..., 1] ** 2) for m in maps_of(s).values())
        results[remat] = jax.jit(lambda s, maps_of=maps_of, loss=loss: (maps_of(s), jax.grad(loss)(s)))(states)
    (maps, grad), (maps_blocks, grad_blocks) = results["none"], results["blocks"]
    assert set(maps) == set(maps_blocks) == set(layers) and np.abs(np.asarray(grad)).max() > 0
    for name in layers:
        np.testing.assert_allclose(np.asarray(maps_blocks[name]), np.asarray(maps[name]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_blocks), np.asarray(grad), rtol=1e-5, atol=1e-8)


def test_the_step_is_compiled_before_step_one_and_a_step_too_big_for_the_device_fails_first(
        one_level_sd1, concept_dir, tmp_path, monkeypatch):
    """Ahead-of-time compile at the phase's start: its seconds are the logged ``compile_seconds``; a device
    smaller than the compiler's per-device bytes (a CPU reports none, so one is set here) stops the run before
    any step or checkpoint, naming remat and the batch; ``train.profile_steps`` writes a profiler trace."""
    from jax_inversion.core import aot
    from jax_inversion.training import train as train_lib
    from jax_inversion.core.errors import TrainError

    reports = []
    compile_ahead = aot.compile_ahead
    def recording(*args):
        compiled, report = compile_ahead(*args)
        reports.append(report)
        return compiled, report

    monkeypatch.setattr(train_lib, "compile_ahead", recording)
    workdir = str(tmp_path / "run")
    train(make_config(one_level_sd1, concept_dir, num_steps=3, profile_steps=(1, 2)), workdir)
    step, records = final_rows(workdir)
    assert step == 3 and len(reports) == 1 and reports[0].peak_bytes > reports[0].argument_bytes > 0
    assert records[-1]["compile_seconds"] == round(reports[0].seconds, 2)
    traces = [f for _, _, files in os.walk(os.path.join(workdir, "profile")) for f in files if f.endswith(".xplane.pb")]
    assert len(traces) == 1

    small = str(tmp_path / "small")
    monkeypatch.setattr(train_lib, "device_memory_bytes", lambda device: reports[0].peak_bytes - 1)
    with pytest.raises(TrainError) as error:
        train(make_config(one_level_sd1, concept_dir, num_steps=3), small)
    message = str(error.value)
    assert "\n" not in message and "GiB per device" in message and "--config.train.remat=blocks" in message
    assert "--config.train.batch_size" in message
    assert CheckpointManager(small, 1, 1, read_only=True).latest_step() is None


def test_overlong_prompts_and_bad_clip_skip_fail_before_the_workdir(one_level_sd1, concept_dir, tmp_path):
    """A template or caption longer than CLIP's 77 positions (tokens expanded) is one line naming it, its length and
    the limit; so is a clip_skip the text encoder cannot give. Nothing is written."""
    from jax_inversion.data.images import DataError
    from jax_inversion.core.errors import ConfigError

    workdir = tmp_path / "w"
    config = make_config(one_level_sd1, concept_dir)
    config.data.templates = ("a photo of {} with " + "a red ball " * 24,)  # 3 + 2 vectors + 1 + 72 words + start, end = 80
    with pytest.raises(DataError, match=r"is 80 tokens but the text encoder reads 77 \(start and end included\)"):
        train(config, str(workdir))
    caption_dir = tmp_path / "captioned"
    write_concept_images(str(caption_dir), count=2)
    (caption_dir / "ball_0.txt").write_text("a photo of <ball> " + "red " * 80)
    config = make_config(one_level_sd1, str(caption_dir))
    config.data.caption_extension = ".txt"
    with pytest.raises(DataError, match="the caption of .*ball_0.png"):
        train(config, str(workdir))
    config = make_config(one_level_sd1, concept_dir)
    config.clip_skip = 99
    with pytest.raises(ConfigError, match="clip_skip 99 is out of range"):
        train(config, str(workdir))
    assert not workdir.exists() or not any(workdir.iterdir())
