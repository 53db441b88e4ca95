"""The methods end to end on a small diffusers-format model made at test time.

Each method config trains a few steps; each of its terms shows up in the metrics and moves
the learned rows the way the term says (measured on a fixed batch with fixed noise, before
vs after). Where a method's default weight is too small for a 4-6 step run to show the
term's direction through the denoising loss, the test raises that weight and says so.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image, ImageDraw

from jax_inversion.artifacts.checkpoints import CheckpointManager, read_run
from jax_inversion.objectives import losses


def _ball_images(directory, mask_directory=None, count=4, size=64, striped=True, seed=0):
    """Balls in the left half of the image (masks: the ball's disc)."""
    os.makedirs(directory, exist_ok=True)
    if mask_directory:
        os.makedirs(mask_directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(40, 200, 3)))
        draw = ImageDraw.Draw(image)
        r = size // 5
        cx, cy = int(rng.integers(r, size // 2 - r // 2)), int(rng.integers(r, size - r))
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=(220, 40, 40))
        if striped:
            for y in range(cy - r, cy + r, 5):
                draw.line((cx - r, y, cx + r, y), fill=(250, 230, 60), width=2)
        image.save(os.path.join(directory, f"ball_{i}.png"))
        if mask_directory:
            mask = Image.new("L", (size, size), 0)
            ImageDraw.Draw(mask).ellipse(box, fill=255)
            mask.save(os.path.join(mask_directory, f"ball_{i}.png"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("method_images")
    dirs = {name: str(root / name) for name in ("concept", "masks", "subject")}
    _ball_images(dirs["concept"], dirs["masks"])
    _ball_images(dirs["subject"], striped=False, seed=1)
    return dirs


def _small(config, model, concept_dir, steps, lr=1e-2):
    config.model = model
    config.data.concept_dir = concept_dir
    config.train.num_steps = steps
    config.train.batch_size = 8
    config.train.learning_rate = lr  # the effective rate: not scaled by the batch
    config.train.scale_lr = False
    config.train.log_every = steps  # every step has its metrics line; the per-term gradient norms (one more backward
    # pass per term) only on the last step, the one _assert_every_weighted_term_has_a_gradient reads
    config.train.checkpoint_every = steps
    config.train.max_grad_norm = 0.0
    config.data.flip_probability = 0.0
    return config


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _rows(workdir, step=None):
    return np.asarray(read_run(workdir, step)[1]["embeddings"]["text_encoder"], np.float32)


def _evaluate(config, workdir, rows_by_name):
    """Each active term's value for the given learned rows on one fixed batch with fixed noise."""
    objective, outputs = _probe(config, workdir)
    evaluate = jax.jit(lambda rows: objective(outputs(rows))[1])
    return {name: {k: float(v) for k, v in evaluate(jnp.asarray(rows)).items()} for name, rows in rows_by_name.items()}


def _probe(config, workdir, **step_options):
    """``(objective, outputs(rows))``: the config's objective and its forward on one fixed batch with fixed noise;
    ``step_options``: more :class:`StepConfig` fields."""
    from jax_inversion.text import tokens as tokens_lib
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.models.unet import cross_attention_layers
    from jax_inversion.objectives.terms import Objective, TermSetup
    from jax_inversion.data.phases import plan_run
    from jax_inversion.diffusion.schedule import NoiseSchedule
    from jax_inversion.text.conditioning import frozen_params, input_embedding_table, vae_factor
    from jax_inversion.data.dataset import build_dataset
    from jax_inversion.training.step import StepConfig, make_forward
    from jax_inversion.training.train import class_word_ids

    model = load_pretrained(config.model)
    plan = plan_run(config)
    layouts = {"text_encoder": tokens_lib.add_placeholder_tokens(model.tokenizer, plan.tokens)}
    resolution = model.unet.config.sample_size * vae_factor(model)
    setup = TermSetup(
        options=config.loss_options, tokenizers={"text_encoder": model.tokenizer},
        tables={"text_encoder": input_embedding_table(model, "text_encoder")},
        concept_rows=(plan.concept.start, plan.concept.stop), initializer=config.data.initializer_token,
        class_word=config.data.class_word, attention_layers=cross_attention_layers(model.unet.config, resolution // vae_factor(model)),
    )
    objective = Objective(dict(config.loss), setup)
    phase = plan.phases[-1]
    dataset = build_dataset(config, model, phase, workdir, "masks" in objective.needs)
    forward = make_forward(
        model, NoiseSchedule.from_config(model.scheduler_config), layouts, objective,
        StepConfig(resolution=resolution, trainable=phase.trainable, num_stages=plan.num_stages, separate_kv=plan.separate_kv,
                   **step_options),
        reference_ids=class_word_ids(config, model) if "reference_maps" in objective.needs else None,
    )
    n = 16
    pick = np.arange(n) % dataset.num_images
    batch = {
        "latent_mean": jnp.asarray(dataset.latent_mean[pick]),
        "latent_std": jnp.asarray(dataset.latent_std[pick]),
        "input_ids": {"text_encoder": jnp.asarray(dataset.input_ids["text_encoder"][np.arange(n) % dataset.num_prompts])},
    }
    if dataset.masks is not None:
        batch["masks"] = jnp.asarray(dataset.masks[pick])
    frozen = frozen_params(model)
    return objective, lambda rows: forward({"text_encoder": rows}, frozen, batch, jax.random.PRNGKey(7))


def _table(model_dir):
    from jax_inversion.models.loading import load_pretrained

    model = load_pretrained(model_dir, components=("text_encoder",))
    return model.tokenizer, np.asarray(model.text_encoder_params["text_model"]["embeddings"]["token_embedding"]["embedding"])


def _cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.heavy(46)
def test_lego_subject_frozen_context_moves_and_resume_across_phases(one_level_sd1, images, tmp_path):
    """Phase 2 leaves <subj> bit-identical; the context term raises cosine to the positive word
    (weight raised from 0.01 to 1 so 4 steps show it); resuming at the phase boundary equals an
    uninterrupted run."""
    from jax_inversion.configs import lego
    from jax_inversion.training.train import train

    config = _small(lego.get_config(), one_level_sd1, images["concept"], steps=4)
    config.data.subject_dir = images["subject"]
    config.data.subject_initializer_token = "ball"
    config.train.subject_steps = 4
    config.train.checkpoint_every = 4
    config.loss.context = 1.0
    config.loss_options.context.positives = [["striped"]]
    config.loss_options.context.negatives = [["dotted"]]
    full = str(tmp_path / "full")
    train(config, full)

    records = _records(full)
    assert [r["phase"] for r in records] == ["subject"] * 4 + ["concept"] * 4
    assert all("loss/context" in r and "loss/diffusion" in r for r in records)
    _assert_every_weighted_term_has_a_gradient(config, full, "lego")
    at_boundary, final = _rows(full, 4), _rows(full, 8)
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.data.phases import plan_run
    from jax_inversion.training.train import initial_rows

    start = initial_rows(config, load_pretrained(one_level_sd1), plan_run(config))["text_encoder"]
    assert not np.array_equal(at_boundary[0], start[0])  # phase 1 trained <subj> ...
    np.testing.assert_array_equal(at_boundary[1], start[1])  # ... and left <cpt> where it starts
    np.testing.assert_array_equal(final[0], at_boundary[0])  # <subj> bit-identical through phase 2
    assert not np.array_equal(final[1], at_boundary[1])

    tokenizer, table = _table(one_level_sd1)
    striped = losses.word_embedding(tokenizer, table, "striped")
    print(f"lego: cosine(<cpt>, striped) {_cosine(at_boundary[1], striped):.4f} -> {_cosine(final[1], striped):.4f}")
    assert _cosine(final[1], striped) > _cosine(at_boundary[1], striped) + 0.05

    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
    assert CheckpointManager(resumed, 1, 3, read_only=True).latest_step() == 4
    train(config, resumed)
    np.testing.assert_array_equal(_rows(resumed, 8), final)


@pytest.mark.heavy(67)
def test_compositional_anchor_and_location_move_their_way(tiny_sd1, images, tmp_path):
    """paper + location: both terms in the metrics; after training the sparse-anchor loss and the
    attention mass outside the mask are lower on a fixed batch (location weight raised to 1). It runs on the
    two-level model, where six steps lower the mass outside the mask by 4e-4 (5e-5 on the one-level one)."""
    from jax_inversion.configs import compositional
    from jax_inversion.training.train import train

    config = _small(compositional.get_config("paper,location"), tiny_sd1, images["concept"], steps=6, lr=2e-2)
    config.data.placeholder_token = "<ball>"
    config.data.class_word = "ball"  # prompts "... <ball> ball"
    config.data.mask_dir = images["masks"]
    config.location_weight = 1.0
    # The anchor term is per prompt element (77 x 32 here): at 0.95 six steps do not show its direction
    # through the other two, so its weight is raised to the old normalisation's strength (x 77 * 32 / 80).
    config = ml_collections.ConfigDict(config.to_dict())
    config.loss.anchor = 0.95 * 77 * 32 / 80
    workdir = str(tmp_path / "run")
    train(config, workdir)

    records = _records(workdir)
    assert all({"loss/anchor", "loss/location", "loss/diffusion"} <= set(r) for r in records)
    _assert_every_weighted_term_has_a_gradient(config, workdir, "compositional:paper,location")
    assert records[0]["loss"] == pytest.approx(
        0.05 * records[0]["loss/diffusion"] + config.loss.anchor * records[0]["loss/anchor"] + 1.0 * records[0]["loss/location"],
        rel=1e-5,
    )
    initial, final = _rows(workdir, 6), None
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.data.phases import plan_run
    from jax_inversion.training.train import initial_rows

    initial = initial_rows(config, load_pretrained(tiny_sd1), plan_run(config))["text_encoder"]
    final = _rows(workdir, 6)
    values = _evaluate(config, workdir, {"initial": initial, "final": final})
    print(f"compositional: {values}")
    assert values["final"]["location"] < values["initial"]["location"]
    assert values["final"]["anchor"] < values["initial"]["anchor"]


@pytest.mark.heavy(12)
def test_compositional_code_variant_with_masked_reconstruction(one_level_sd1, images, tmp_path):
    """The released code's anchor term (prompt embeddings vs the anchor-word prompt) combined with
    the masked reconstruction loss: both in the metrics; the rows move toward the anchor word.
    The term is a mean over all 77 x d prompt entries, so it is ~1e-5 here: its weight is raised to
    100 for 4 steps to dominate the reconstruction's direction."""
    from jax_inversion.configs import compositional
    from jax_inversion.training.train import train

    config = _small(compositional.get_config("code"), one_level_sd1, images["concept"], steps=4)
    config.data.placeholder_token = "<ball>"
    config.data.initializer_token = ""
    config.loss_options.anchor_prompt.word = "ball"
    config.data.class_word = "ball"  # prompts "... <ball> ball"
    config.data.mask_dir = images["masks"]
    config.loss.diffusion = 0.0
    config.loss.masked_diffusion = 0.05
    config.loss.anchor_prompt = 100.0
    workdir = str(tmp_path / "run")
    train(config, workdir)
    records = _records(workdir)
    assert all({"loss/anchor_prompt", "loss/masked_diffusion"} <= set(r) for r in records)
    assert "loss/diffusion" not in records[0]
    _assert_every_weighted_term_has_a_gradient(config, workdir, "compositional:code")

    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.data.phases import plan_run
    from jax_inversion.training.train import initial_rows

    tokenizer, table = _table(one_level_sd1)
    anchor = losses.word_embedding(tokenizer, table, "ball")
    initial = initial_rows(config, load_pretrained(one_level_sd1), plan_run(config))["text_encoder"][0]
    print(f"anchor_prompt: |v - e_ball| {np.linalg.norm(initial - anchor):.4f} -> {np.linalg.norm(_rows(workdir)[0] - anchor):.4f}")
    assert np.linalg.norm(_rows(workdir)[0] - anchor) < np.linalg.norm(initial - anchor)


def test_stage_sources_follow_the_nearest_trained_stage():
    """Hand-computed: 5 stages of 1,000 timesteps are [0, 200), [200, 400), ... ; a stage no trained timestep
    reaches takes the nearest reached stage's rows (the lower on a tie)."""
    from jax_inversion.artifacts.extended import stage_sources

    assert stage_sources(5, 1000, 0, 1000) == (0, 1, 2, 3, 4)
    assert stage_sources(5, 1000, 200, 1000) == (1, 1, 2, 3, 4)  # the default job's t >= 200
    assert stage_sources(5, 1000, 199, 1000) == (0, 1, 2, 3, 4)
    assert stage_sources(5, 1000, 0, 400) == (0, 1, 1, 1, 1)
    assert stage_sources(5, 1000, 450, 550) == (2, 2, 2, 2, 2)
    assert stage_sources(4, 1000, 250, 750) == (1, 1, 2, 2)
    assert stage_sources(3, 1000, 0, 334) == (0, 0, 0)  # t = 333 is stage 0 (3 * 333 = 999 < 1000)
    assert stage_sources(3, 1000, 0, 335) == (0, 1, 1)  # t = 334 is stage 1 (1002 // 1000)


@pytest.mark.heavy(60)
def test_sefi_stage_kv_rows_attention_loss_and_export(one_level_sd1, images, tmp_path):
    """Per-stage K/V rows [5, 2, n, d] train, the attention term lowers the difference to the
    class-word prompt's maps on a fixed batch (denoising weight 0 to isolate it), and the run
    exports as an extended file with per-stage key and value rows."""
    from jax_inversion.configs import sefi
    from jax_inversion.artifacts.export import export_run
    from jax_inversion.artifacts.extended import read_extended
    from jax_inversion.training.train import train

    config = _small(sefi.get_config(), one_level_sd1, images["concept"], steps=4, lr=2e-2)
    config.data.placeholder_token = "<ball>"
    config.data.class_word = "ball"
    config.train.min_timestep = 400  # t in [400, 1000): stages 2-4 train, stages 0 and 1 (sampling's last steps) do not
    workdir = str(tmp_path / "run")
    train(config, workdir)
    records = _records(workdir)
    assert all({"loss/attention", "loss/diffusion"} <= set(r) for r in records)
    _assert_every_weighted_term_has_a_gradient(config, workdir, "sefi")
    rows = _rows(workdir)
    assert rows.shape == (5, 2, 1, 32)
    assert not np.array_equal(rows[:, 0], rows[:, 1])  # keys and values learned separately
    # the untrained stages carry the nearest trained stage's rows, not their initial ones
    np.testing.assert_array_equal(rows[0], rows[2])
    np.testing.assert_array_equal(rows[1], rows[2])
    assert not np.array_equal(rows[2], rows[3])

    out = str(tmp_path / "sefi.safetensors")
    export_run(workdir, out, "extended")
    parts = read_extended(out)["<ball>"]
    assert parts["stages"] == 5
    np.testing.assert_array_equal(parts["key"], rows[:, 0])
    np.testing.assert_array_equal(parts["value"], rows[:, 1])
    with pytest.raises(ValueError, match="--format extended"):
        export_run(workdir, str(tmp_path / "plain.safetensors"), "diffusers")

    # The attention term alone, on one fixed batch with fixed noise: four Adam steps on its gradient lower it.
    isolated = _small(sefi.get_config(), one_level_sd1, images["concept"], steps=4, lr=2e-2)
    isolated.data.placeholder_token = "<ball>"
    isolated.data.class_word = "ball"
    isolated.loss.diffusion = 0.0
    isolated.loss.attention = 1.0
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.data.phases import plan_run
    from jax_inversion.training.train import initial_rows

    objective, outputs = _probe(isolated, str(tmp_path / "isolated"))
    # the objective is the attention term alone (weight 1): its value and gradient, one compiled program
    value_and_gradient = jax.jit(jax.value_and_grad(lambda r: objective(outputs(r))[1]["attention"]))
    rows = jnp.asarray(initial_rows(isolated, load_pretrained(one_level_sd1), plan_run(isolated))["text_encoder"])
    optimizer = optax.adam(2e-2)
    opt_state = optimizer.init(rows)
    seen = []
    for _ in range(4):
        value, gradient = value_and_gradient(rows)
        seen.append(float(value))
        updates, opt_state = optimizer.update(gradient, opt_state)
        rows = optax.apply_updates(rows, updates)
    values = {"initial": {"attention": seen[0]}, "final": {"attention": float(value_and_gradient(rows)[0])}}
    print(f"sefi: {values}")
    assert values["final"]["attention"] < values["initial"]["attention"]

    # The reference forward run whole (as on TPU, where libtpu cannot compile it cut short) gives the same term.
    objective, outputs = _probe(isolated, str(tmp_path / "isolated"), whole_reference_forward=True)
    whole_value, whole_gradient = jax.jit(jax.value_and_grad(lambda r: objective(outputs(r))[1]["attention"]))(rows)
    value, gradient = value_and_gradient(rows)
    np.testing.assert_allclose(float(whole_value), float(value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(whole_gradient), np.asarray(gradient), rtol=1e-5, atol=1e-7 * float(jnp.abs(gradient).max()))


# ----------------------------------------------------------------------------- declarations and errors


def test_method_configs_declare_their_terms():
    from jax_inversion.configs import compositional, lego, sefi, ti
    from jax_inversion.objectives.terms import COCO_CLASSES

    assert len(COCO_CLASSES) == 80 and "traffic light" in COCO_CLASSES and "toothbrush" in COCO_CLASSES
    plain = ti.get_config()
    assert {k: v for k, v in plain.loss.items() if v} == {"diffusion": 1.0}

    config = lego.get_config()
    assert config.data.subject_token == "<subj>" and config.train.subject_steps > 0
    assert config.loss.context == 0.01 and config.loss_options.context.temperature == 0.07

    config = compositional.get_config()
    assert (config.loss.diffusion, config.loss.anchor, config.loss.anchor_prompt, config.loss.location) == pytest.approx((0.05, 0.95, 0, 0))
    assert config.loss_options.anchor.max_atoms == 5
    config.anchor_lambda = 0.5  # lambda is one knob: both weights follow it
    assert (config.loss.diffusion, config.loss.anchor) == (0.5, 0.5)
    config = compositional.get_config("code,location")
    assert config.loss.anchor == 0 and config.loss.anchor_prompt == pytest.approx(0.95) and config.loss.location == 0.1
    with pytest.raises(ValueError, match="unknown compositional variant"):
        compositional.get_config("paper,bogus")

    config = sefi.get_config()
    assert (config.data.num_stages, config.data.separate_kv, config.loss.attention) == (5, True, 0.003)
    assert config.loss_options.attention.resolution == 16 and config.loss_options.attention.reduction == "sum"


def test_method_recipes():
    """Each config's optimisation recipe: base lr 5e-3 times the global batch (0.04 at batch 8), no clipping;
    TI and Compositional Inversion 5,000 steps; Compositional Inversion's prompts say "S* <class>"."""
    from jax_inversion.configs import compositional, lego, sefi, ti
    from jax_inversion.training.optim import make_optimizer

    for module in (ti, lego, sefi, compositional):
        train = ti.resolve_unset(module.get_config()).train
        assert (train.learning_rate, train.scale_lr, train.max_grad_norm) == (5e-3, True, 0.0), module.__name__
        _, schedule = make_optimizer(train, 8)
        assert float(schedule(0)) == pytest.approx(0.04)
    assert ti.resolve_unset(ti.get_config()).train.num_steps == compositional.get_config().train.num_steps == 5000
    assert compositional.get_config().data.append_class_word and not ti.get_config().data.append_class_word


def test_class_word_prompts_hand_written(tmp_path):
    """data.append_class_word: the class word follows each group's tokens, multi-vector and Lego's two tokens too."""
    from transformers import CLIPTokenizer

    from jax_inversion.configs import compositional, lego
    from jax_inversion.data.images import DataError, templates_for, tokenize_prompts
    from jax_inversion.data.phases import plan_run
    from jax_inversion.models.tokenizer_files import write_clip_tokenizer
    from jax_inversion.text.tokens import add_placeholder_tokens

    config = compositional.get_config()
    config.data.placeholder_token, config.data.num_vectors, config.data.initializer_token = "<c>", 3, "cat"
    (phase,) = plan_run(config).phases
    assert phase.prompt_text == "<c> <c>_1 <c>_2 cat"
    assert templates_for("object")[0].format(phase.prompt_text) == "a photo of a <c> <c>_1 <c>_2 cat"
    config.data.class_word = "dog"  # the class word wins over the initializer
    assert plan_run(config).phases[0].prompt_text == "<c> <c>_1 <c>_2 dog"
    config.data.class_word = "teddy bear"  # only text: several tokens are fine here
    assert plan_run(config).phases[0].prompt_text == "<c> <c>_1 <c>_2 teddy bear"
    config.data.class_word, config.data.initializer_token = "", ""
    with pytest.raises(DataError, match="append_class_word needs a class word.*data.class_word"):
        plan_run(config)

    config = lego.get_config()
    config.data.append_class_word = True
    config.data.subject_dir, config.data.subject_initializer_token, config.data.num_vectors = "/subject", "dog", 2
    subject, concept = plan_run(config).phases
    assert subject.prompt_text == "<subj> dog"
    assert concept.prompt_text == "<cpt> <cpt>_1 <subj> dog"  # the concept has no class word (no initializer)
    config.data.initializer_token, config.data.concept_before_subject = "frozen", False
    assert plan_run(config).phases[1].prompt_text == "<subj> dog <cpt> <cpt>_1 frozen"

    # Tokenized: the ids of a training prompt, by hand.
    write_clip_tokenizer(str(tmp_path), ["a", "photo", "of", "cat"])
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    ids = add_placeholder_tokens(tokenizer, ["<c>", "<c>_1"])
    vocab = tokenizer.get_vocab()
    (row,) = tokenize_prompts(tokenizer, ["a photo of <c> <c>_1 cat"], max_length=10)
    word = lambda w: vocab[w + "</w>"]
    expected = [tokenizer.bos_token_id, word("a"), word("photo"), word("of"), ids.first_id, ids.first_id + 1, word("cat")]
    assert row[:7].tolist() == expected and set(row[7:].tolist()) == {tokenizer.pad_token_id}


def test_lego_plan_phases():
    from jax_inversion.configs import lego
    from jax_inversion.data.images import DataError
    from jax_inversion.data.phases import plan_run

    config = lego.get_config()
    config.data.subject_dir = "/subject"
    config.data.concept_dir = "/concept"
    config.data.num_vectors = 2
    config.train.subject_steps, config.train.num_steps = 10, 20
    plan = plan_run(config)
    assert plan.tokens == ["<subj>", "<cpt>", "<cpt>_1"]
    subject, concept = plan.phases
    assert (subject.start, subject.stop, subject.trainable, subject.image_dir) == (0, 10, (0, 1), "/subject")
    assert (concept.start, concept.stop, concept.trainable, concept.image_dir) == (10, 30, (1, 3), "/concept")
    assert concept.prompt_text == "<cpt> <cpt>_1 <subj>" and subject.prompt_text == "<subj>"  # the concept (a state) first
    config.data.concept_before_subject = False
    assert plan_run(config).phases[1].prompt_text == "<subj> <cpt> <cpt>_1"
    config.data.concept_before_subject = True
    assert plan.phase_at(9) is subject and plan.phase_at(10) is concept

    config.data.subject_dir = ""
    with pytest.raises(DataError, match="subject_dir"):
        plan_run(config)
    config.data.subject_dir, config.data.subject_token = "/subject", "<cpt>"
    with pytest.raises(DataError, match="its own token"):
        plan_run(config)


def _setup(tokenizer, table, **options):
    from jax_inversion.configs.ti import get_config
    from jax_inversion.objectives.terms import TermSetup

    config = get_config()
    for key, value in options.items():
        term, field = key.split("__")
        config.loss_options[term][field] = value
    return TermSetup(
        options=config.loss_options, tokenizers={"text_encoder": tokenizer}, tables={"text_encoder": table},
        concept_rows=(0, 2), initializer="ball", class_word="ball",
        attention_layers={"down_blocks.0.attentions.0.transformer_blocks.0.attn2": 16, "mid_block.attentions.0.transformer_blocks.0.attn2": 8},
    )


def test_objective_declares_needs_and_rejects_bad_options(tmp_path):
    from transformers import CLIPTokenizer

    from jax_inversion.objectives.terms import Objective, ObjectiveError
    from jax_inversion.models.tokenizer_files import write_clip_tokenizer

    write_clip_tokenizer(str(tmp_path))
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    table = np.random.default_rng(0).standard_normal((len(tokenizer), 8)).astype(np.float32)

    objective = Objective({"diffusion": 1.0, "location": 0.1, "attention": 0.0}, _setup(tokenizer, table))
    assert objective.needs == {"masks", "attention_maps"}
    assert objective.capture_layers == (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.0.attn2",
    )
    objective = Objective({"attention": 1.0}, _setup(tokenizer, table))
    assert objective.needs == {"attention_maps", "reference_maps"}
    assert objective.capture_layers == ("down_blocks.0.attentions.0.transformer_blocks.0.attn2",)

    with pytest.raises(ObjectiveError, match=r"no cross-attention layer at 32x32 \(it has \[8, 16\]\)"):
        Objective({"location": 1.0}, _setup(tokenizer, table, location__resolution=32))
    with pytest.raises(ObjectiveError, match="positives"):
        Objective({"context": 1.0}, _setup(tokenizer, table))
    with pytest.raises(ObjectiveError, match="3 word lists for 2 concept vectors"):
        Objective({"context": 1.0}, _setup(tokenizer, table, context__positives=[["a"], ["b"], ["c"]]))
    with pytest.raises(ObjectiveError, match="unknown loss term"):
        Objective({"diffusion": 1.0, "contxt": 1.0})

    # One shared positive list applies to every concept vector; the value is the hand-checked InfoNCE.
    objective = Objective({"context": 1.0}, _setup(tokenizer, table, context__positives=[["cat"]], context__negatives=[["dog"]]))
    cat, dog = (table[tokenizer.encode(w, add_special_tokens=False)[0]] for w in ("cat", "dog"))
    v = np.stack([cat, dog])
    total, values = objective({"learned": {"text_encoder": jnp.asarray(v)}})
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    expected = np.mean([np.log(np.exp(cos(x, cat) / 0.07) + np.exp(cos(x, dog) / 0.07)) - cos(x, cat) / 0.07 for x in v])
    assert float(values["context"]) == pytest.approx(expected, rel=1e-5)


def test_masks_box_and_downsample(tmp_path):
    from jax_inversion.data import images as data

    np.testing.assert_array_equal(data.box_mask([0.0, 0.5, 0.5, 1.0], 4), np.array(
        [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], np.float32))
    with pytest.raises(data.DataError, match="x0 < x1"):
        data.box_mask([0.5, 0, 0.2, 1], 4)
    mask = np.zeros((1, 4, 4), np.float32)
    mask[0, :2, :1] = 1
    np.testing.assert_array_equal(data.downsample_mask(mask, 2), [[[0.5, 0.0], [0.0, 0.0]]])

    images, masks = tmp_path / "images", tmp_path / "masks"
    _ball_images(str(images), str(masks), count=2)
    assert data.find_mask(str(masks), str(images / "ball_1.png")) == str(masks / "ball_1.png")
    os.remove(masks / "ball_1.png")
    with pytest.raises(data.DataError, match="no mask for ball_1.png"):
        data.find_mask(str(masks), str(images / "ball_1.png"))


def test_cli_missing_masks_is_one_line_and_leaves_workdir_alone(one_level_sd1, images, tmp_path):
    import subprocess
    import sys

    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "jax_inversion.cli", "train", "--config=configs/compositional.py:paper,location",
         f"--workdir={workdir}", f"--config.model={one_level_sd1}", f"--config.data.concept_dir={images['concept']}",
         "--config.data.initializer_token=ball"],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "mask_dir" in lines[0] and "data.box" in lines[0], done.stderr[-1500:]
    assert not os.path.exists(workdir / "checkpoints")


def _assert_every_weighted_term_has_a_gradient(config, workdir, label):
    """metrics.jsonl holds grad_norm/<term> for every term with a non-zero weight, each > 0 (printed as shares)."""
    last = _records(workdir)[-1]
    terms = [k for k, v in config.loss.items() if v]
    norms = {t: last[f"grad_norm/{t}"] for t in terms}
    total = sum(norms.values())
    print(f"\n{label} grad_norm shares: " + ", ".join(f"{t} {n:.3g} ({n / total:.1%})" for t, n in norms.items()))
    assert all(n > 0 for n in norms.values()), norms
    if len(terms) == 1:
        assert norms[terms[0]] == last["grad_norm"]
    else:  # the norm of a sum is at most the sum of the norms
        assert last["grad_norm"] <= total * (1 + 1e-5)


@pytest.mark.heavy(39)
def test_train_step_term_gradient_norms_equal_jax_grad_of_each_weighted_term(one_level_sd1, images):
    """The step's ``grad_norm/<term>`` (objectives.term_gradients: one shared forward, one pullback per term) equal
    the norms of ``jax.grad`` of each weighted term alone, through a real train_step; ``grad_norm`` is that of the sum."""
    from jax_inversion.configs import compositional
    from jax_inversion.data.images import BatchSampler
    from jax_inversion.data.dataset import build_dataset, global_batch
    from jax_inversion.objectives.terms import TERMS
    from jax_inversion.training.step import StepConfig, make_forward
    from jax_inversion.training.train import setup_run

    config = _small(compositional.get_config("paper,location"), one_level_sd1, images["concept"], steps=1)
    config.data.placeholder_token, config.data.initializer_token, config.data.class_word = "<ball>", "", "ball"
    config.data.mask_dir = images["masks"]
    config.train.log_every = 1
    run = setup_run(config, jax.devices()[:1])
    phase = run.plan.phases[-1]
    workdir = images["concept"] + "_cache"
    dataset = build_dataset(config, run.model, phase, workdir, run.with_masks)
    batch = global_batch(dataset, BatchSampler(dataset.num_images, dataset.num_prompts, config.train.batch_size, 0,
                                                 config.data.flip_probability),
                         0, run.mesh, run.with_masks)
    rng = jax.random.PRNGKey(7)
    step = run.make_step(phase, dataset.resolution)
    state = jax.tree_util.tree_map(jnp.array, run.state)  # the step donates its state: keep ours
    _, metrics = step(jax.tree_util.tree_map(jnp.array, state), batch, rng)

    forward = make_forward(run.model, run.schedule, run.placeholder_ids, run.objective,
                           StepConfig(resolution=dataset.resolution, min_snr_gamma=config.train.min_snr_gamma,
                                      trainable=phase.trainable, timestep_range=run.timesteps))
    outputs = lambda rows: forward(rows, step.frozen, batch, jax.random.fold_in(rng, 0))
    a, b = phase.trainable
    trainable_norm = lambda g: float(np.linalg.norm(np.asarray(g["text_encoder"])[a:b]))
    prepared = run.objective.prepared
    total = 0.0
    assert set(run.objective.weights) == {"diffusion", "anchor", "location"}
    terms = {name: (lambda rows, name=name, weight=weight: weight * TERMS[name].loss(outputs(rows), prepared.get(name, {})))
             for name, weight in run.objective.weights.items()}
    # jax.grad of each term alone and of the whole objective, compiled as one program (one compile, not four)
    grads = jax.jit(lambda rows: ({name: jax.grad(term)(rows) for name, term in terms.items()},
                                  jax.grad(lambda r: run.objective(outputs(r))[0])(rows)))
    per_term, whole = grads(state.embeddings)
    for name, grad in per_term.items():
        np.testing.assert_allclose(float(metrics[f"grad_norm/{name}"]), trainable_norm(grad), rtol=2e-4)
        total = total + np.asarray(grad["text_encoder"])
    np.testing.assert_allclose(np.asarray(whole["text_encoder"]), total, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(metrics["grad_norm"]), trainable_norm(whole), rtol=2e-4)


def test_lego_concept_vectors_can_start_at_their_positive_words(one_level_sd1, images):
    """loss_options.context.init_from_positives: each <cpt> vector starts at the mean input embedding of its own
    positive words (one list per vector, or one shared), by hand; <subj> keeps its initializer; a list count that
    fits neither is one line."""
    from jax_inversion.text import tokens as tokens_lib
    from jax_inversion.text.conditioning import input_embedding_table
    from jax_inversion.configs import lego
    from jax_inversion.core.errors import TrainError
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.data.phases import plan_run
    from jax_inversion.training.train import initial_rows

    config = _small(lego.get_config(), one_level_sd1, images["concept"], steps=1)
    config.data.subject_dir, config.data.subject_initializer_token = images["subject"], "ball"
    config.data.num_vectors = 2
    config.loss_options.context.positives = [["striped", "red"], ["cube"]]
    config.loss_options.context.init_from_positives = True
    model = load_pretrained(one_level_sd1, components=("text_encoder",))
    rows = initial_rows(config, model, plan_run(config))["text_encoder"]
    table = input_embedding_table(model, "text_encoder")
    vocab = model.tokenizer.get_vocab()
    row = lambda word: table[vocab[word + "</w>"]]
    np.testing.assert_allclose(rows[1], (row("striped") + row("red")) / 2, rtol=1e-6)
    np.testing.assert_allclose(rows[2], row("cube"), rtol=1e-6)
    np.testing.assert_allclose(rows[0], tokens_lib.word_embedding(model.tokenizer, table, "ball"), rtol=1e-6)
    config.loss_options.context.positives = [["striped"], ["red"], ["cube"]]
    with pytest.raises(TrainError, match="3 word lists for 2 concept vectors"):
        initial_rows(config, model, plan_run(config))
