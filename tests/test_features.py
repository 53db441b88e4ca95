"""What textual-inversion users expect from a trainer (issue 19): step exports, captions, gradient
accumulation, phrase initializers, LR schedules, noise offset, optional wandb, damaged-checkpoint resume.

One trained run (module fixture) serves the export, caption and resume tests; the rest need no training.
"""
import logging
import os
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_inversion.artifacts.checkpoints import CheckpointError, CheckpointManager
from jax_inversion.artifacts.export import read_embedding_file
from jax_inversion.commands.default_job import write_concept_images
from jax_inversion.configs.ti import get_config
from jax_inversion.core.errors import ConfigError, TrainError
from jax_inversion.data.images import DataError
from jax_inversion.models.loading import load_pretrained
from jax_inversion.training.optim import lr_schedule
from jax_inversion.training.train import train
from tests.helpers import make_config

CAPTION = "a photo of {} on the grass"


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    directory = write_concept_images(str(tmp_path_factory.mktemp("concept")), count=4)
    with open(os.path.join(directory, "ball_0.txt"), "w") as f:  # one captioned image, three on templates
        f.write(CAPTION)
    return directory


@pytest.fixture(scope="module")
def model_and_layout(one_level_sd1):
    """The tiny model, its tokenizer holding ``<ball> <ball>_1`` (as training adds them)."""
    from jax_inversion.text.tokens import add_placeholder_tokens

    model = load_pretrained(one_level_sd1)
    return model, add_placeholder_tokens(model.tokenizer, ["<ball>", "<ball>_1"])


def run_config(model, concept_dir, **train_overrides):
    overrides = dict(num_steps=9, checkpoint_every=3, keep_checkpoints=2, export_every=3)
    overrides.update(train_overrides)
    config = make_config(model, concept_dir, **overrides)
    config.data.caption_extension = ".txt"
    return config


@pytest.fixture(scope="module")
def run(one_level_sd1, concept_dir, tmp_path_factory):
    """9 steps, checkpoints every 3 (the last 2 kept), embeddings every 3, one captioned image."""
    workdir = str(tmp_path_factory.mktemp("run"))
    state = train(run_config(one_level_sd1, concept_dir), workdir)
    return workdir, np.asarray(state.embeddings["text_encoder"])


def snapshot(workdir):
    files = {}
    for d, _, names in os.walk(workdir):
        for name in names:
            with open(os.path.join(d, name), "rb") as f:
                files[os.path.relpath(os.path.join(d, name), workdir)] = f.read()
    return files


def test_export_every_writes_step_files_that_outlive_checkpoints(run):
    workdir, final = run
    files = sorted(os.listdir(os.path.join(workdir, "embeddings")))
    assert files == [f"ball_step_{s:06d}.safetensors" for s in (3, 6, 9)]
    manager = CheckpointManager(workdir, 1, 1, read_only=True)
    assert manager.all_steps() == [6, 9]  # step 3's checkpoint is gone, its embedding file is not
    for step in (6, 9):
        parsed = read_embedding_file(os.path.join(workdir, "embeddings", f"ball_step_{step:06d}.safetensors"))
        state, _ = manager.restore(step)
        assert parsed["token"] == "<ball>"
        np.testing.assert_array_equal(parsed["rows"]["text_encoder"], np.asarray(state["embeddings"]["text_encoder"]))
    np.testing.assert_array_equal(read_embedding_file(os.path.join(workdir, "embeddings", files[-1]))["rows"]["text_encoder"], final)


def _damage(path):
    data = bytearray(open(path, "rb").read())
    for i in range(4):
        data[len(data) // 2 + i] ^= 0xA5
    open(path, "wb").write(bytes(data))


def test_damaged_newest_checkpoint_resumes_from_the_newest_readable(run, one_level_sd1, concept_dir, tmp_path, caplog):
    """A few bytes changed in step 9's files: resume takes step 6, warns naming step 9, keeps its files,
    and the re-run steps 7-9 end exactly where the undamaged run ended."""
    source, final = run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    damaged = os.path.join(workdir, "checkpoints", "9", "meta", "metadata")  # Orbax's JSON: a UnicodeDecodeError before
    _damage(damaged)
    damaged_bytes = open(damaged, "rb").read()
    with caplog.at_level(logging.WARNING, logger="jax_inversion"):
        state = train(run_config(one_level_sd1, concept_dir), workdir)
    assert any("checkpoint step 9 is damaged" in r.getMessage() and "resuming from step 6" in r.getMessage() for r in caplog.records)
    assert int(state.step) == 9
    np.testing.assert_array_equal(np.asarray(state.embeddings["text_encoder"]), final)
    kept = os.path.join(workdir, "damaged_checkpoints", "9", "meta", "metadata")
    assert open(kept, "rb").read() == damaged_bytes
    assert CheckpointManager(workdir, 1, 1, read_only=True).all_steps() == [6, 9]


def test_no_readable_checkpoint_is_one_line_and_touches_nothing(run, one_level_sd1, concept_dir, tmp_path):
    source, _ = run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    _damage(os.path.join(workdir, "checkpoints", "9", "meta", "metadata"))
    state_dir = os.path.join(workdir, "checkpoints", "6", "state", "d")
    _damage(os.path.join(state_dir, os.listdir(state_dir)[0]))  # the arrays: tensorstore's DATA_LOSS before
    before = snapshot(workdir)
    with pytest.raises(CheckpointError) as error:
        train(run_config(one_level_sd1, concept_dir), workdir)
    message = str(error.value)
    assert "\n" not in message and "no checkpoint" in message and "step 9" in message and "step 6" in message
    assert "pass a new --workdir" in message
    assert snapshot(workdir) == before


def test_captions_and_templates_mix(model_and_layout, one_level_sd1, concept_dir, tmp_path):
    """A captioned image always says its caption (placeholder expanded to every vector); the others draw templates."""
    from jax_inversion.data.dataset import _examples, build_dataset
    from jax_inversion.data.phases import plan_run

    from jax_inversion.data.images import tokenize_prompts

    model, _ = model_and_layout
    config = run_config(one_level_sd1, concept_dir)
    dataset = build_dataset(config, model, plan_run(config).phases[0], str(tmp_path))
    assert dataset.num_prompts == 27 and list(dataset.caption_prompts) == [27, -1, -1, -1]
    expected = tokenize_prompts(model.tokenizer, [CAPTION.format("<ball> <ball>_1")])
    np.testing.assert_array_equal(dataset.input_ids["text_encoder"][[27]], expected)
    batch = _examples(dataset, {"image": np.array([0, 1, 0]), "prompt": np.array([5, 5, 9]), "flip": np.zeros(3, int)}, False)
    ids = dataset.input_ids["text_encoder"]
    np.testing.assert_array_equal(batch["input_ids"]["text_encoder"], ids[[27, 5, 27]])


def test_caption_without_the_placeholder_is_one_line(one_level_sd1, tmp_path):
    from jax_inversion.data.dataset import check_phase_images
    from jax_inversion.data.phases import plan_run

    images = write_concept_images(str(tmp_path / "images"), count=2)
    (tmp_path / "images" / "ball_1.txt").write_text("a ball on the grass")
    config = run_config(one_level_sd1, images)
    with pytest.raises(DataError) as error:
        check_phase_images(config, plan_run(config).phases[0])
    message = str(error.value)
    assert "\n" not in message and "ball_1.txt" in message and "'<ball>'" in message


class FakeWandb(types.ModuleType):
    """Stands in for wandb (not installed in the test environment): records what the loop sends."""

    def __init__(self):
        super().__init__("wandb")
        self.logged, self.inits, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished += 1


def test_gradient_accumulation_equals_the_big_batch(run, one_level_sd1, concept_dir, tmp_path, monkeypatch):
    """Batch 8 as 4 micro-batches of 2 == batch 8 at once (the fixture run's first 3 steps: its step-3
    embedding file and metrics), within float tolerance; metrics, checkpoints and the wandb log count
    optimizer steps."""
    import json

    whole_dir, _ = run
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = run_config(one_level_sd1, concept_dir, num_steps=3, export_every=0, gradient_accumulation=4, wandb=True)
    split = train(config, str(tmp_path / "split"))
    assert int(split.step) == 3
    whole = read_embedding_file(os.path.join(whole_dir, "embeddings", "ball_step_000003.safetensors"))["rows"]["text_encoder"]
    np.testing.assert_allclose(np.asarray(split.embeddings["text_encoder"]), whole, rtol=1e-5, atol=1e-6)
    assert CheckpointManager(str(tmp_path / "split"), 1, 1, read_only=True).all_steps() == [3]
    records = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    straight = [json.loads(line) for line in open(os.path.join(whole_dir, "metrics.jsonl"))][:3]
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in straight], rtol=1e-5)
    assert len(fake.inits) == 1 and fake.finished == 1
    assert sorted({s for s, v in fake.logged if "loss" in v}) == [1, 2, 3]


def test_bad_accumulation_schedule_and_missing_wandb_are_one_line(run, one_level_sd1, concept_dir, monkeypatch):
    workdir, _ = run
    before = snapshot(workdir)
    with pytest.raises(TrainError, match=r"gradient_accumulation=3 does not split train.batch_size=8 .*gradient_accumulation=2"):
        train(run_config(one_level_sd1, concept_dir, gradient_accumulation=3), workdir)
    with pytest.raises(ConfigError, match="is not a piecewise schedule"):
        train(run_config(one_level_sd1, concept_dir, lr_schedule="5e-3:200, 1e-3:abc"), workdir)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(TrainError, match="pip install wandb"):
        train(run_config(one_level_sd1, concept_dir, wandb=True), workdir)
    assert snapshot(workdir) == before


def test_phrase_initializers_fill_the_vectors_in_order(model_and_layout, one_level_sd1, concept_dir):
    from jax_inversion.text.conditioning import input_embedding_table
    from jax_inversion.data.phases import plan_run
    from jax_inversion.training.train import initial_rows

    model, _ = model_and_layout
    table = np.asarray(input_embedding_table(model, "text_encoder"), np.float32)
    a, red, toy = model.tokenizer.encode("a red toy", add_special_tokens=False)
    (ball,) = model.tokenizer.encode("ball", add_special_tokens=False)
    cases = {
        ("a red toy", 3): [table[a], table[red], table[toy]],
        ("a red toy", 6): [table[a], table[a], table[red], table[red], table[toy], table[toy]],  # fewer tokens: repeated
        ("a red toy", 2): [table[a], (table[red] + table[toy]) / 2],  # more tokens: neighbours averaged
        ("ball", 2): [table[ball], table[ball]],  # one word: every vector, as before
    }
    for (phrase, n), expected in cases.items():
        config = make_config(one_level_sd1, concept_dir)
        config.data.initializer_token, config.data.num_vectors = phrase, n
        rows = initial_rows(config, model, plan_run(config))["text_encoder"]
        np.testing.assert_allclose(rows, np.stack(expected), rtol=1e-6, atol=1e-7, err_msg=f"{phrase} over {n}")


def test_lr_schedules():
    config = get_config().train
    config.num_steps, config.warmup_steps, config.learning_rate, config.scale_lr = 100, 10, 1.0, False
    at = lambda name, steps, **kw: [round(float(lr_schedule(_with(config, lr_schedule=name, **kw), 8)(s)), 4) for s in steps]
    assert at("linear", [0, 5, 10, 55, 100]) == [0.0, 0.5, 1.0, 0.5, 0.0]
    # 2 cycles of 45 steps after warmup, each restarting at the full rate
    assert at("cosine_restarts", [10, 32.5, 55, 77.5], lr_cycles=2) == [1.0, 0.5, 1.0, 0.5]
    assert at("5e-3:200, 1e-3:1000, 1e-4", [0, 199, 200, 999, 1000, 9999]) == [0.005, 0.005, 0.001, 0.001, 0.0001, 0.0001]
    assert at("5e-3:200, 1e-3:1000", [1000, 9999]) == [0.001, 0.001]
    for bad in ("5e-3:abc", "5e-3, 1e-3:100", "1e-3:200, 1e-4:100", "cosin"):
        with pytest.raises(ConfigError) as error:
            lr_schedule(_with(config, lr_schedule=bad), 8)
        assert "\n" not in str(error.value)


def _with(config, **values):
    import copy

    changed = copy.deepcopy(config)
    for key, value in values.items():
        changed[key] = value
    return changed


def test_noise_offset_shifts_each_example_channel(model_and_layout):
    from jax_inversion.diffusion.schedule import NoiseSchedule
    from jax_inversion.training.step import StepConfig, make_draw

    model, _ = model_and_layout
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    batch = {"latent_mean": jnp.zeros((64, 8, 8, 4)), "latent_std": jnp.zeros((64, 8, 8, 4))}
    draws = {}
    for offset in (0.0, 0.1):
        draws[offset] = make_draw(model, schedule, StepConfig(32, noise_offset=offset))(batch, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(draws[0.0][2], draws[0.1][2])  # same timesteps
    shift = np.asarray(draws[0.1][1] - draws[0.0][1])
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1, :1, :], shift.shape), atol=1e-6)  # one value per [B, 1, 1, C]
    assert 0.07 < shift[:, 0, 0, :].std() < 0.13


def test_timestep_range_bounds_the_drawn_timesteps(model_and_layout):
    """train.min_timestep/max_timestep: timesteps uniform in [low, high); noise and latents as without it."""
    from jax_inversion.core.errors import ConfigError
    from jax_inversion.objectives.terms import Objective
    from jax_inversion.diffusion.schedule import NoiseSchedule
    from jax_inversion.training.step import StepConfig, make_draw, make_forward

    model, placeholders = model_and_layout
    layout = {"text_encoder": placeholders}
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    batch = {"latent_mean": jnp.zeros((512, 8, 8, 4)), "latent_std": jnp.ones((512, 8, 8, 4))}
    objective = Objective({"diffusion": 1.0})
    draw = lambda r: make_draw(model, schedule, StepConfig(32, timestep_range=r))(batch, jax.random.PRNGKey(0))
    whole, ranged, capped = draw((0, 0)), draw((200, 0)), draw((200, 400))
    for drawn in (ranged, capped):
        np.testing.assert_array_equal(drawn[0], whole[0])  # same latents
        np.testing.assert_array_equal(drawn[1], whole[1])  # same noise
    t = np.asarray(ranged[2])
    assert t.min() >= 200 and t.max() <= schedule.num_train_timesteps - 1
    assert t.min() < 210 and t.max() > 990 and abs(t.mean() - 599.5) < 25  # uniform over [200, 1000): sd 231 / sqrt(512) ~ 10
    t = np.asarray(capped[2])
    assert t.min() >= 200 and t.max() < 400 and len(np.unique(t)) > 150
    assert np.asarray(whole[2]).min() < 10
    for bad in ((400, 200), (-1, 0), (0, schedule.num_train_timesteps + 1)):
        with pytest.raises(ConfigError, match="min_timestep"):
            make_forward(model, schedule, layout, objective, StepConfig(32, timestep_range=bad))


def test_wandb_offline_receives_scalars_and_images(tmp_path, monkeypatch):
    """The real wandb package (test extra), offline: what the loop's writer sends ends up in an offline run.
    (The train loop's use of it is checked with a stand-in module in the accumulation test above.)"""
    wandb = pytest.importorskip("wandb")
    from tensorboardX import SummaryWriter

    from jax_inversion.training.hooks import WandbWriter as _WandbWriter

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="jax-inversion", dir=str(tmp_path), config={"seed": 0}, name="run", resume="allow")
    writer = _WandbWriter(SummaryWriter(str(tmp_path / "tensorboard")), run)
    for step in (1, 2, 3):
        writer.add_scalar("loss", 1.0 / step, step)
    writer.add_image("validation", np.zeros((8, 8, 3), np.uint8), 3, dataformats="HWC")
    writer.close()
    wandb.teardown()  # the wandb-core service writes the run file: wait for it to finish
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # The run file's history records hold each scalar's key and JSON value as plain protobuf strings: each value sent
    # reached it. The image went to the run's media folder as the 8x8 PNG sent.
    raw = runs[0].read_bytes()
    for value in (b"1.0", b"0.5", b"0.3333333333333333"):
        assert b"loss" in raw and value in raw, value
    (image,) = runs[0].parent.glob("files/media/images/validation_3_*.png")
    from PIL import Image

    assert Image.open(image).size == (8, 8)
