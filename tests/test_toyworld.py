"""The toy world: generator, held-out concepts, shipped model and detector, pretraining, evaluation."""
import glob
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from PIL import Image

from jax_inversion.toyworld import SHIPPED_DETECTOR, SHIPPED_MODEL, concepts, detector as detector_lib, evaluate as ev, world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "jax_inversion.cli", *args], capture_output=True, text=True, cwd=REPO, **kwargs)


def test_scenes_are_deterministic_and_captions_follow_the_grammar():
    a, b = world.scenes(3, 40), world.scenes(3, 40)
    assert a == b and a != world.scenes(4, 40)
    images_a, masks_a = world.render_all(a, seed=3)
    images_b, _ = world.render_all(b, seed=3)
    np.testing.assert_array_equal(images_a, images_b)
    obj = world.WorldObject("square", "red", "striped", "tilted")
    assert obj.phrase == "a tilted red striped square"
    assert world.WorldObject("circle", "blue").phrase == "a blue circle"
    two = world.Scene((obj, world.WorldObject("moon", "white", state="hollow")), (20, 20, 20))
    assert two.caption == "a tilted red striped square and a hollow white moon"
    for scene, masks in zip(a, masks_a):
        assert 1 <= len(scene.objects) <= 2 and len(masks) == len(scene.objects)
        for o, m in zip(scene.objects, masks):
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = o.box  # tilted shapes may poke out of their box; a small hollow cross is a 20-pixel outline
            assert m.sum() >= 15 and xs.min() >= x0 - 8 and xs.max() <= x1 + 8 and ys.min() >= y0 - 8 and ys.max() <= y1 + 8


def test_rendering_in_processes_gives_the_same_scenes():
    scene_list = world.scenes(5, 1000, world.ALL)
    serial, serial_masks = world.render_all(scene_list, seed=11, workers=1)
    spawned, spawned_masks = world.render_all(scene_list, seed=11, workers=2)
    np.testing.assert_array_equal(serial, spawned)
    assert all(np.array_equal(a, b) for m, n in zip(serial_masks, spawned_masks) for a, b in zip(m, n))


def test_pretraining_scenes_never_show_the_held_out_concepts():
    seen = world.scenes(0, 2000, world.SEEN)
    words = {w for s in seen for w in s.caption.split()}
    assert not words & {world.NEW_SHAPE, world.NEW_TEXTURE, world.NEW_STATE}
    assert {o.shape for s in seen for o in s.objects} == set(world.SEEN.shapes)
    assert {o.texture for s in seen for o in s.objects} == set(world.SEEN.textures)
    assert {o.state for s in seen for o in s.objects} == set(world.SEEN.states)


def test_unnamed_world_shows_stars_and_checkers_without_naming_them():
    """The continuation's world: a few percent of objects are stars (always captioned "shape") or
    checkered (texture unsaid); "shape" also stands for other shapes; melting never appears."""
    scene_list = world.unnamed_scenes(0, 3000)
    objects = [o for s in scene_list for o in s.objects]
    assert scene_list == world.unnamed_scenes(0, 3000) and len(scene_list) == 3000
    words = {w for s in scene_list for w in s.caption.split()}
    assert words <= set(("a", "and") + world.SEEN.words + world.UNNAMED_WORDS) and world.GENERIC_SHAPE in words
    stars = [o for o in objects if o.shape == world.NEW_SHAPE]
    checkered = [o for o in objects if o.texture == world.NEW_TEXTURE]
    assert 0.03 < len(stars) / len(objects) < 0.07 and 0.03 < len(checkered) / len(objects) < 0.07
    assert all(o.phrase.endswith(" shape") for o in stars)
    named_shape = [o for o in objects if o.shape != world.NEW_SHAPE and o.phrase.endswith(" shape")]
    assert {o.shape for o in named_shape} == set(world.SEEN.shapes)  # generic: every shape is sometimes "a shape"
    assert len(stars) / (len(stars) + len(named_shape)) < 0.6  # "shape" is no name for a star
    assert not any(o.state == world.NEW_STATE for o in objects)
    obj = world.WorldObject("star", "purple", "checkered", "tilted", shape_word="shape", texture_word="")
    assert obj.phrase == "a tilted purple shape"


def test_carry_token_rows_keeps_old_rows_and_starts_new_words_at_the_shape_words():
    from jax_inversion.toyworld.pretrain import carry_token_rows

    old = {"a</w>": 0, "circle</w>": 1, "moon</w>": 2, "<eos>": 3}
    table = np.array([[1.0, 0.0], [2.0, 4.0], [4.0, 8.0], [9.0, 9.0]], np.float32)
    new = {"a</w>": 0, "circle</w>": 1, "moon</w>": 2, "sh": 3, "shape</w>": 4, "<eos>": 5}
    out = carry_token_rows(table, old, new)
    np.testing.assert_array_equal(out[[0, 1, 2, 5]], table)
    np.testing.assert_array_equal(out[4], [3.0, 6.0])  # mean of circle and moon, by hand
    np.testing.assert_array_equal(out[3], [4.0, 5.25])  # a piece no caption uses alone: mean of every row


def test_rendered_colours_and_masks_match_the_scene():
    obj = world.WorldObject("square", "red", box=(10, 20, 40, 50))
    image, (mask,) = world.render(world.Scene((obj,), (30, 40, 50)))
    assert mask[22:48, 12:38].all() and not mask[:18].any() and not mask[:, 42:].any()
    np.testing.assert_array_equal(image[30, 25], world.COLOURS["red"])
    np.testing.assert_array_equal(image[5, 5], [30, 40, 50])
    striped = world.render(world.Scene((world.WorldObject("square", "blue", "striped", box=(8, 8, 56, 56)),), (0, 0, 0)))[0]
    column = striped[10:54, 30, 2].astype(int)  # the blue channel alternates between full and 0.38x
    assert set(np.unique(column)) >= {round(0.38 * 235), 235}


def test_detector_labels_of_a_hand_built_scene():
    scene = world.Scene((world.WorldObject("star", "yellow", "checkered", "melting"), world.WorldObject("circle", "blue")), (0, 0, 0))
    y = detector_lib.labels_of(scene)
    on = {detector_lib.LABELS[i] for i in np.nonzero(y)[0]}
    assert on == {"shape:star", "shape:circle", "colour:yellow", "colour:blue", "texture:checkered", "state:melting",
                  "object:yellow star", "object:blue circle"}


def test_concept_folders(tmp_path):
    info = concepts.write_concept("melting", str(tmp_path / "melting"), count=4, seed=1)
    images = sorted(os.listdir(info["images"]))
    assert images == sorted(os.listdir(info["masks"])) == sorted(os.listdir(info["subject_images"])) == [f"{i:02d}.png" for i in range(4)]
    for name in images:
        image = np.asarray(Image.open(os.path.join(info["images"], name)))
        mask = np.asarray(Image.open(os.path.join(info["masks"], name))) > 127
        green = np.all(np.abs(image.astype(int) - world.COLOURS["green"]) < 3, axis=-1)
        assert (green & mask).sum() > 0.8 * green.sum() > 0  # the mask is the object
    assert concepts.read_concept(info["images"])["labels"] == ["object:green square", "state:melting"]
    assert concepts.read_concept(str(tmp_path)) is None
    star = concepts.write_concept("star", str(tmp_path / "star"), count=2)
    assert "subject_images" not in star and star["class_word"] in world.UNNAMED_WORDS
    checkered = concepts.CONCEPTS["checkered"]
    assert checkered.transfer_prompt("<c>", "red square") == "a red <c> square"
    assert concepts.CONCEPTS["melting"].transfer_prompt("<c>", "red circle") == "a <c> red circle"


def test_shipped_model_is_small_and_pytorch_diffusers_loads_it():
    import torch
    from diffusers import StableDiffusionPipeline

    files = [os.path.join(d, f) for d, _, fs in os.walk(SHIPPED_MODEL) for f in fs]
    assert sum(os.path.getsize(f) for f in files) < 25 * 2**20
    assert all(not f.endswith((".bin", ".pkl", ".pt")) for f in files)
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODEL, safety_checker=None)
    ids = pipe.tokenizer(["a red square"], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    assert pipe.tokenizer.model_max_length == ids.shape[1] and pipe.tokenizer.convert_ids_to_tokens(ids[0, 1:4].tolist()) == ["a</w>", "red</w>", "square</w>"]
    with torch.no_grad():
        states = pipe.text_encoder(ids).last_hidden_state
        out = pipe.unet(torch.randn(1, 4, 16, 16), 500, encoder_hidden_states=states).sample
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_shipped_model_matches_pytorch():
    from jax_inversion.models.parity import check_parity

    results = check_parity(SHIPPED_MODEL, latent_size=16)
    assert {r.component for r in results} == {"text_encoder", "unet", "vae"}
    for r in results:  # relative to the output's scale: the VAE decodes to pixels, the UNet predicts noise
        assert r.max_abs_diff < 1e-4 * max(1.0, r.max_abs_reference), r


@pytest.mark.heavy(39)
def test_shipped_detector_reads_fresh_scenes_and_every_concept():
    """Per label group on 300 fresh scenes, as drawn and through the shipped VAE (what generated images
    are); and each concept found in its images through the VAE, its attribute never in its subject's."""
    detector = detector_lib.load_detector(SHIPPED_DETECTOR)
    scene_list = world.scenes(999, 300, world.ALL)
    # measured when shipped: precision >= 0.995 and recall >= 0.973 in every group; through the VAE
    # precision >= 0.962, recall >= 0.946, colour-and-shape objects 0.993 / 0.981
    accuracy = detector_lib.detector_accuracy(detector, scene_list)
    roundtrip = detector_lib.vae_roundtrip(SHIPPED_MODEL)
    through_vae = detector_lib.detector_accuracy(detector, scene_list, roundtrip)
    for group in ("shape", "colour", "texture", "state", "object"):
        assert accuracy[f"{group}_precision"] > 0.97 and accuracy[f"{group}_recall"] > 0.95, (group, accuracy)
        assert through_vae[f"{group}_precision"] > 0.93 and through_vae[f"{group}_recall"] > 0.92, (group, through_vae)
    assert through_vae["object_precision"] > 0.97 and through_vae["object_recall"] > 0.96, through_vae
    assert accuracy["colour"] > 0.97, accuracy
    # The bar: every concept's labels all found in >= 95 % of its images through the VAE
    # (measured when the model was continued, 200 images each: >= 0.98), its attribute never in its subject.
    for name, concept in concepts.CONCEPTS.items():
        images, _ = world.render_all(concepts.concept_scenes(concept.attributes, 64, seed=3), seed=3)
        found = detector(roundtrip(images))[0] > 0.5
        assert found[:, [detector.index(label) for label in concept.labels]].all(axis=1).mean() >= 0.95, name
        if concept.subject:
            subject, _ = world.render_all(concepts.concept_scenes(concept.subject, 32, seed=4), seed=4)
            assert (detector(roundtrip(subject))[0][:, detector.index(concept.attribute_label)] > 0.5).mean() <= 0.05, name


def test_shipped_model_follows_seen_prompts():
    """The issue's bar, on a small sample: the detector finds the prompted objects in >= 80 % of samples
    (measured when shipped, 16 samples at 10 DDIM steps: 1.0, and no unprompted object)."""
    model, detector = ev.load_model(SHIPPED_MODEL), detector_lib.load_detector(SHIPPED_DETECTOR)
    result = ev.prompt_following(model, detector, num_prompts=8, images_per_prompt=2,
                                 settings=ev.EvalSettings(images_per_prompt=2, steps=10), seed=4321)
    assert result["samples"] == 16
    assert result["prompted_object_found"] >= 0.8 and result["unprompted_object_found"] <= 0.2, result


def test_prompt_following_counts_prompted_and_unprompted_objects(monkeypatch):
    """A stand-in model drawing exactly each caption's scene follows every prompt and shows nothing else;
    one drawing the next caption's scene is read as not following (and as showing unprompted objects)."""
    from types import SimpleNamespace

    scene_list = world.scenes(77, 12, world.SEEN)
    images, _ = world.render_all(scene_list, seed=0)
    row = {s.caption: i for i, s in enumerate(scene_list)}
    model = SimpleNamespace(text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=64)))
    detector = detector_lib.load_detector(SHIPPED_DETECTOR)
    results = []
    for shift in (0, 1):
        draw = lambda model, learned, request, cache=None: SimpleNamespace(
            images=images[[(row[request.prompt] + shift) % len(scene_list)] * request.num_images])
        monkeypatch.setattr(ev, "generate", draw)
        results.append(ev.prompt_following(model, detector, num_prompts=12, images_per_prompt=2, seed=77))
    follows, shifted = results
    assert follows["samples"] == shifted["samples"] == 24
    assert follows["prompted_object_found"] >= 0.95 and follows["all_objects_found"] >= 0.9, follows
    assert follows["unprompted_object_found"] <= 0.1, follows
    assert shifted["prompted_object_found"] <= 0.3 and shifted["unprompted_object_found"] >= 0.8, shifted


def _stand_in_generator(concept, transfer_leaks: bool):
    """``generate`` for a model that draws each prompt's scene exactly, the token read as the concept;
    with ``transfer_leaks`` it draws the training object instead of the attribute on the new subject."""
    from types import SimpleNamespace

    def draw(model, learned, request, cache=None):
        prompt, first = request.prompt, world.WorldObject(box=(4, 4, 30, 30), **concept.attributes)
        if " and " in prompt:  # "a <c> and a red square"
            colour, shape = prompt.split()[-2:]
            objects = (first, world.WorldObject(shape, colour, box=(34, 34, 60, 60)))
        elif prompt == "a <c>":
            objects = (first,)
        else:  # "a red <c> square": the attribute on a new subject
            colour, shape = [w for w in prompt.split() if w not in ("a", "<c>")]
            moved = dict(concept.attributes, colour=colour, shape=shape)
            objects = (first,) if transfer_leaks else (world.WorldObject(box=(4, 4, 30, 30), **moved),)
        image, _ = world.render(world.Scene(objects, (30, 30, 30)))
        return SimpleNamespace(images=np.repeat(image[None], request.num_images, axis=0))

    return draw


def test_score_concept_reads_identity_composition_and_transfer(monkeypatch, tmp_path):
    """Against a stand-in model that draws each prompt's scene: everything found, no leakage; a model
    that draws the training object for "a red <c> square" reads as leaking and missing the new subject."""
    concept = concepts.CONCEPTS["checkered"]
    info = concepts.write_concept("checkered", str(tmp_path / "checkered"), count=4)
    detector = detector_lib.load_detector(SHIPPED_DETECTOR)
    pooled, runs = {}, {}
    for leaks in (False, True):
        monkeypatch.setattr(ev, "generate", _stand_in_generator(concept, leaks))
        scores = ev.score_concept(None, detector, None, "<c>", info, ev.EvalSettings(images_per_prompt=3), transfer_token="<c>",
                                  samples={"identity": 4})
        assert [s.prompt for s in scores] == ["a <c>", "a <c> and a red square", "a <c> and a yellow triangle", "a <c> and a white moon",
                                              "a red <c> square", "a yellow <c> triangle"]
        assert [len(s.concept) for s in scores] == [4, 3, 3, 3, 3, 3]
        pooled[leaks], runs[leaks] = ev.summary(scores), scores
    faithful, leaky = pooled[False], pooled[True]
    for key in ("identity/concept", "composition/concept", "composition/companion", "composition/both", "transfer/concept", "transfer/companion"):
        assert faithful[key] == (1.0, 1.0, 1.0), (key, faithful[key])
    assert faithful["transfer/leakage"] == (0.0, 0.0, 0.0) and faithful["identity/alignment"][0] > 0.9
    assert leaky["transfer/leakage"] == (1.0, 1.0, 1.0) and leaky["transfer/companion"] == (0.0, 0.0, 0.0)
    assert leaky["transfer/concept"] == (1.0, 1.0, 1.0) and leaky["identity/concept"] == faithful["identity/concept"]
    only = ev.score_concept(None, detector, None, "<c>", info, ev.EvalSettings(images_per_prompt=3), transfer_token="<c>",
                            kinds=("identity", "transfer"))
    assert [s.prompt for s in only] == ["a <c>", "a red <c> square", "a yellow <c> triangle"]
    table = ev.markdown_table([("faithful", runs[False]), ("leaky", runs[True])]).splitlines()
    # columns: concept found, companion found, both, leakage (then image alignment)
    assert any(line.startswith("| faithful | a red <c> square | 3 | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] "
                               "| 0.00 [0.00, 0.00] |") for line in table), table
    assert any(line.startswith("| leaky | a red <c> square | 3 | 1.00 [1.00, 1.00] | 0.00 [0.00, 0.00] | 0.00 [0.00, 0.00] "
                               "| 1.00 [1.00, 1.00] |") for line in table), table


def _cluttered_generator(concept, with_distractor: bool):
    """``generate`` for a model drawing the star of each prompt, with or without the concept's clutter
    (its distractor object beside the star, or its fixed background instead of a dark grey one)."""
    from types import SimpleNamespace

    def draw(model, learned, request, cache=None):
        objects = [world.WorldObject(box=(4, 4, 30, 30), **concept.attributes)]
        if " and " in request.prompt:  # "a <c> and a blue circle"
            colour, shape = request.prompt.split()[-2:]
            objects.append(world.WorldObject(shape, colour, box=(34, 34, 60, 60)))
        if with_distractor and concept.distractor_objects:
            objects.append(world.WorldObject(box=(34, 34, 60, 60), **concept.distractor_objects[0]))
        background = tuple(concept.background) if with_distractor and concept.background else (30, 30, 30)
        image, _ = world.render(world.Scene(tuple(objects), background, concept.gradient))
        return SimpleNamespace(images=np.repeat(image[None], request.num_images, axis=0))

    return draw


def test_cluttered_concepts_write_their_distractors_and_masks_only_the_star(tmp_path):
    detector = detector_lib.load_detector(SHIPPED_DETECTOR)
    star = detector.index("object:yellow star")
    info = concepts.write_concept("star_with_square", str(tmp_path / "square"), count=8, seed=2)
    assert list(info["distractors"]) == ["object:red square"] and concepts.read_concept(info["images"])["distractors"] == ["object:red square"]
    names = sorted(os.listdir(info["images"]))
    images = np.stack([np.asarray(Image.open(os.path.join(info["images"], n))) for n in names])
    masks = np.stack([np.asarray(Image.open(os.path.join(info["masks"], n))) > 127 for n in names])
    probs = detector(images)[0] > 0.5
    assert probs[:, star].mean() >= 7 / 8 and probs[:, detector.index("object:red square")].mean() >= 7 / 8
    for scene, mask in zip(concepts.concept_scenes(concepts.CONCEPTS["star_with_square"].attributes, 8, 2,
                                                   info["distractor_objects"], (), 0.0), masks):
        (sx0, sy0, sx1, sy1), (dx0, dy0, dx1, dy1) = scene.objects[0].box, scene.objects[1].box
        assert mask[sy0:sy1, sx0:sx1].sum() > 0.9 * mask.sum() > 0 and not mask[dy0:dy1, dx0:dx1].any()
    assert (scene.objects[1].shape, scene.objects[1].colour) == ("square", "red")

    teal = concepts.write_concept("star_on_teal", str(tmp_path / "teal"), count=8, seed=2)
    written = concepts.read_concept(teal["images"])
    assert written["distractors"] == ["background:20,130,130"] and written["background"] == [20, 130, 130]
    teal_images = np.stack([np.asarray(Image.open(p)) for p in sorted(_pngs(teal["images"]))])
    assert (detector(teal_images)[0][:, star] > 0.5).mean() >= 7 / 8
    # the border rule: the training background reads as present, the varied random backgrounds as absent
    assert ev.shows_background(teal_images, concepts.TEAL).all()
    random_backgrounds, _ = world.render_all(concepts.concept_scenes(concepts.CONCEPTS["star"].attributes, 100, seed=5), seed=5)
    assert ev.shows_background(random_backgrounds, concepts.TEAL).mean() <= 0.05
    assert not ev.shows_background(images, concepts.TEAL).any()


def _pngs(directory):
    return [os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".png")]


@pytest.mark.parametrize("name", ["star_with_square", "star_on_teal"])
def test_score_concept_reads_distractors(monkeypatch, tmp_path, name):
    """A stand-in model drawing the clutter with the star reads as distractor found 1.0, one without it 0.0."""
    concept = concepts.CONCEPTS[name]
    info = concepts.write_concept(name, str(tmp_path / name), count=2)
    detector = detector_lib.load_detector(SHIPPED_DETECTOR)
    kinds = ("identity", "composition") if name == "star_on_teal" else ("identity",)  # three objects: beyond the detector's scenes
    runs = {}
    for clutter in (True, False):
        monkeypatch.setattr(ev, "generate", _cluttered_generator(concept, clutter))
        runs[clutter] = ev.score_concept(None, detector, None, "<c>", info, ev.EvalSettings(images_per_prompt=2), kinds=kinds)
        pooled = ev.summary(runs[clutter])
        for kind in kinds:
            assert pooled[f"{kind}/distractor"] == ((1.0,) * 3 if clutter else (0.0,) * 3), (clutter, kind, pooled)
            assert pooled[f"{kind}/concept"] == (1.0, 1.0, 1.0)
    table = ev.markdown_table([("clutter", runs[True]), ("clean", runs[False])]).splitlines()
    assert table[0].endswith("| image alignment | distractor found |") and table[1] == "|" + "---|" * 9
    assert any(line.startswith("| clutter | a <c> | 2 |") and line.endswith("| 1.00 [1.00, 1.00] |") for line in table), table
    assert any(line.startswith("| clean | a <c> | 2 |") and line.endswith("| 0.00 [0.00, 0.00] |") for line in table), table


def test_any_concept_folder_evaluates_its_own_transfer_prompts():
    """A concept.json naming no concept of the project builds its transfer prompts from its own fields."""
    concept = {"name": "someone_elses", "companions": ["a red square"], "attribute_label": "state:tilted",
               "transfer_subjects": ["blue circle"]}
    assert ev.concept_prompts(concept, "<s> <c>", "<c>") == [
        ("a <s> <c>", "identity", None), ("a <s> <c> and a red square", "composition", "a red square"),
        ("a <c> blue circle", "transfer", "blue circle")]
    concept["attribute_label"] = "texture:striped"
    assert ev.concept_prompts(concept, "<c>", "<c>")[-1] == ("a blue <c> circle", "transfer", "blue circle")
    assert concepts.transfer_prompt("texture:dotted", "<c>", "red square") == concepts.CONCEPTS["dotted_moon"].transfer_prompt("<c>", "red square")


def test_bootstrap_interval_against_hand_values():
    assert ev.bootstrap_interval([1, 1, 1, 1]) == (1.0, 1.0, 1.0)
    mean, low, high = ev.bootstrap_interval(np.r_[np.ones(200), np.zeros(200)])
    half = 1.96 * np.sqrt(0.25 / 400)  # the normal approximation: 0.049
    assert mean == 0.5 and abs((0.5 - low) - half) < 0.01 and abs((high - 0.5) - half) < 0.01
    assert all(np.isnan(ev.bootstrap_interval([])))


@pytest.mark.heavy(113)
def test_toyworld_pretrain_writes_a_diffusers_model(tmp_path, monkeypatch):
    """A few steps of every stage: the reproduction script runs and its output loads in both stacks.

    The UNet has one level and the text encoder one layer here (the shipped model: two and three), which
    halves the compile of the text-to-image step; the stages, files and continuation are the same code."""
    from diffusers import StableDiffusionPipeline

    from jax_inversion.models.loading import load_pretrained

    # In this process (the command's flags and errors: test_toyworld_bad_input_is_one_line): the same config it reads.
    from jax_inversion.toyworld import pretrain as pretrain_lib
    from jax_inversion.toyworld.config import get_config
    from jax_inversion.toyworld.pretrain import pretrain

    one_level = dict(block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D"], attention_head_dim=[2])
    monkeypatch.setattr(pretrain_lib, "TOY_UNET", {**pretrain_lib.TOY_UNET, **one_level})
    toy_text_config = pretrain_lib.toy_text_config
    monkeypatch.setattr(pretrain_lib, "toy_text_config", lambda *args: {**toy_text_config(*args), "num_hidden_layers": 1})

    config = get_config()
    config.num_scenes, config.vae.steps, config.diffusion.steps, config.log_every = 64, 2, 2, 1
    config.detector.steps, config.detector.num_scenes, config.detector.eval_scenes = 2, 64, 32
    config.detector.vae_from = f"{tmp_path}/model"  # the model the same run writes first
    pretrain(config, str(tmp_path))
    log = [json.loads(line) for line in open(tmp_path / "pretrain_log.jsonl")]
    assert [r["stage"] for r in log if r["stage"] in ("vae", "diffusion", "detector")] == ["vae"] * 2 + ["diffusion"] * 2 + ["detector"] * 2
    assert [r["stage"] for r in log if r["stage"].startswith("detector_eval")] == ["detector_eval", "detector_eval_through_vae"]
    model = load_pretrained(str(tmp_path / "model"))
    scaling = json.load(open(tmp_path / "model" / "vae" / "config.json"))["scaling_factor"]
    assert abs(scaling - next(r["scaling_factor"] for r in log if r["stage"] == "latents")) < 1e-4
    assert model.unet.config.sample_size == 16 and model.unet.config.block_out_channels == (32,)
    assert model.text_encoder.config.num_hidden_layers == 1
    StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), safety_checker=None)
    detector_lib.load_detector(str(tmp_path / "detector"))

    # a continuation on the unnamed world (how the shipped model got its last rounds): same VAE, text
    # encoder + UNet trained on, the tokenizer grown by the word "shape"
    more_config = get_config()
    more_config.init_from, more_config.stages, more_config.world = f"{tmp_path}/model", "model", "unnamed"
    more_config.num_scenes, more_config.diffusion.steps, more_config.diffusion.save_every, more_config.log_every = 64, 3, 2, 1
    pretrain(more_config, f"{tmp_path}/more")
    more_log = [json.loads(line) for line in open(tmp_path / "more" / "pretrain_log.jsonl")]
    assert [(r["stage"], r["step"]) for r in more_log if r["stage"] in ("diffusion", "saved")] == [
        ("diffusion", 1), ("diffusion", 2), ("saved", 2), ("diffusion", 3)]
    more = load_pretrained(str(tmp_path / "more" / "model"))
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    snapshot = load_pretrained(next(r["path"] for r in more_log if r["stage"] == "saved"))  # a whole model of its own
    assert snapshot.path.endswith(os.path.join("snapshots", "step_2")) and not same(snapshot.unet_params, more.unet_params)
    assert same(more.vae_params, model.vae_params) and more.vae.config.scaling_factor == model.vae.config.scaling_factor
    assert "shape</w>" in more.tokenizer.get_vocab() and "shape</w>" not in model.tokenizer.get_vocab()
    assert more.text_encoder.config.vocab_size == len(more.tokenizer) == len(model.tokenizer) + 4  # sh, sha, shap, shape</w>
    assert not same(more.unet_params, model.unet_params) and not same(more.text_encoder_params, model.text_encoder_params)
    assert not os.path.exists(tmp_path / "more" / "detector")


@pytest.mark.heavy(37)
def test_default_train_then_toyworld_eval(tmp_path):
    """README's first command on the shipped model (shortened), then the eval table of that run."""
    run = tmp_path / "run"
    done = _cli("train", f"--workdir={run}", "--config.train.num_steps=4", "--config.train.checkpoint_every=4")
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = json.load(open(run / "config.json"))
    assert (recipe["data"]["num_vectors"], recipe["train"]["min_timestep"], recipe["train"]["num_steps"]) == (8, 200, 4)
    done = _cli("toyworld", "eval", f"--workdir={run}", "--images_per_prompt=2", "--steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 2 * (4 + 2)  # header, rule; 4 prompts + identity and composition pooled, learned and random token
    assert "a <concept> and a red square" in done.stdout and "object:yellow star" in done.stdout
    table = open(run / "toyworld_eval" / "table.md").read()
    assert table.strip() == "\n".join(lines)

    # The table's learned rows are what the shipped detector reads in samples.png, row by row (the PNG is lossless).
    concept = concepts.read_concept(str(run / "default_concept" / "images"))
    grid = np.asarray(Image.open(run / "toyworld_eval" / "samples.png").convert("RGB"))
    side = world.SIZE
    detector = detector_lib.load_detector(SHIPPED_DETECTOR)
    reference = ev.reference_features(detector, concept["images"])
    learned_rows = [[c.strip() for c in line.split("|")[2:9]] for line in lines[2:6]]
    companions = [None] + list(concept["companions"])
    assert len(learned_rows) == len(companions) == grid.shape[0] // side
    mean = lambda cell: float(cell.split()[0])
    for row, (cells, companion) in enumerate(zip(learned_rows, companions)):
        images = np.stack([grid[row * side : (row + 1) * side, col * side : (col + 1) * side] for col in range(2)])
        probs, features = detector(images)
        found = (probs[:, detector.index("object:yellow star")] > 0.5).astype(float)
        assert cells[1] == "2" and mean(cells[2]) == float(f"{found.mean():.2f}"), (row, cells)
        if companion is not None:
            other = (probs[:, detector.index(ev.object_label(companion))] > 0.5).astype(float)
            assert mean(cells[3]) == float(f"{other.mean():.2f}") and mean(cells[4]) == float(f"{(found * other).mean():.2f}")
        assert abs(mean(cells[6]) - ev.alignment(features, reference).mean()) <= 0.00051, (row, cells)


def test_toyworld_bad_input_is_one_line(tmp_path, tiny_sd1):
    done = _cli("toyworld")
    assert done.returncode != 0 and "give one subcommand" in done.stderr
    done = _cli("toyworld", "eval", f"--workdir={tmp_path}")
    assert done.returncode == 1 and "has no checkpoints" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = _cli("toyworld", "eval", f"--detector={tmp_path}")
    assert done.returncode == 1 and "no detector" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = _cli("toyworld", "pretrain", f"--workdir={tmp_path}/pre", "--config.stages=vae")
    assert done.returncode == 1 and "unknown pretraining stages ['vae']" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pre").exists()
    done = _cli("toyworld", "pretrain", f"--workdir={tmp_path}/mars", "--config.stages=model", "--config.world=mars")
    assert done.returncode == 1 and "unknown world 'mars'" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mars").exists()
    done = _cli("toyworld", "pretrain", f"--workdir={tmp_path}/det", "--config.stages=detector", f"--config.detector.vae_from={tmp_path}/none")
    assert done.returncode == 1 and "does not exist" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = _cli("toyworld", "concepts", f"--out={tmp_path}", "--names=dragon")
    assert done.returncode == 1 and "unknown toy-world concept" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_quality_benchmark_never_reuses_a_run_of_another_model(tmp_path):
    """A finished run is reused only for the same model weights and budget; a stale one is trained again."""
    from benchmarks.quality import finished_run, run_fingerprint

    model = tmp_path / "model" / "unet"
    model.mkdir(parents=True)
    (model / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    fingerprint = run_fingerprint(str(tmp_path / "model"), 150, 0, 5e-3)
    run = tmp_path / "run"
    assert not finished_run(str(run), fingerprint)
    (run / "checkpoint").write_text("part-way")
    assert not finished_run(str(run), fingerprint) and (run / "checkpoint").exists()  # interrupted: resumes
    (run / "trained.json").write_text("{}")
    assert finished_run(str(run), fingerprint)
    shutil.copytree(tmp_path / "model", tmp_path / "elsewhere")  # the same weights from another checkout: the same run
    assert finished_run(str(run), run_fingerprint(str(tmp_path / "elsewhere"), 150, 0, 5e-3))
    (model / "diffusion_pytorch_model.safetensors").write_bytes(b"weights trained longer")
    assert not finished_run(str(run), run_fingerprint(str(tmp_path / "model"), 150, 0, 5e-3))
    assert not (run / "checkpoint").exists() and not (run / "trained.json").exists()
    assert not finished_run(str(run), run_fingerprint(str(tmp_path / "model"), 300, 0, 5e-3))


def test_each_method_is_sampled_its_own_way(monkeypatch, tmp_path):
    """Compositional Inversion's runs prompt "S* <class>" and guide the layout of their compositions (the
    paper's spatial inversion), not their one-object prompts; a TI run does neither."""
    from jax_inversion.configs import compositional, ti

    info = concepts.write_concept("star_with_square", str(tmp_path / "star_with_square"), count=2)
    requests = []

    def record(model, learned, request, cache=None):
        requests.append(request)
        return SimpleNamespace(images=np.zeros((request.num_images, 64, 64, 3), np.uint8))

    monkeypatch.setattr(ev, "generate", record)
    monkeypatch.setattr(ev, "reference_features", lambda detector, image_dir: np.ones((1, 4)))
    stand_in = type("Detector", (), {"__call__": lambda self, images: (np.zeros((len(images), 64)), np.ones((len(images), 4))),
                                     "index": lambda self, label: 0})()
    for config, word, guided in ((compositional.get_config("paper"), "shape", True), (ti.get_config(), "", False)):
        config.data.initializer_token = "shape"
        sampling = ev.method_sampling(json.loads(config.to_json_best_effort()))
        assert sampling == ev.MethodSampling(word, guided)
        requests.clear()
        ev.score_concept(None, stand_in, None, "<c>", info, ev.EvalSettings(images_per_prompt=2), sampling=sampling)
        named = "<c> shape" if word else "<c>"
        assert [r.prompt for r in requests] == [f"a {named}"] + [f"a {named} and {c}" for c in info["companions"]]
        assert [r.layout_guidance for r in requests] == [False] + [guided] * len(info["companions"])
    assert ev.method_sampling({}) == ev.MethodSampling()  # a run from before the sampling section: plain


def test_quality_benchmark_reads_any_concept_folder_and_builds_each_methods_config(tmp_path):
    """--concept_dir: one folder or a folder of them, paths resolved inside; method specs override config keys;
    ti_captioned writes captions naming the distractor objects; the default budget is the default job's."""
    import argparse

    from benchmarks import quality

    for name in ("star_with_square", "star_on_teal"):
        concepts.write_concept(name, str(tmp_path / "written" / name), count=2)
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "written"), moved)  # concept.json's absolute paths now point nowhere
    args = argparse.Namespace(concept_dir=str(moved), workdir=str(tmp_path / "bench"), seed=0, concepts="")
    read = quality.read_concepts(args)
    assert sorted(read) == ["star_on_teal", "star_with_square"]
    assert read["star_with_square"]["images"] == str(moved / "star_with_square" / "images")
    assert quality.read_concepts(argparse.Namespace(**{**vars(args), "concept_dir": str(moved / "star_on_teal")})).keys() == {"star_on_teal"}
    concept = read["star_with_square"]
    config = quality.method_config("compositional:anchor_lambda=0.5;train.num_steps=7", concept, "MODEL", "default", 0, 5e-3, args.workdir)
    assert (config.loss.diffusion, config.loss.anchor, config.train.num_steps) == (0.5, 0.5, 7)
    assert (config.data.num_vectors, config.train.min_timestep, config.sampling.layout_guidance) == (8, 200, True)
    masked = quality.method_config("masked", concept, "MODEL", "default", 0, 5e-3, args.workdir)
    assert (masked.loss.diffusion, masked.loss.masked_diffusion, masked.data.mask_dir) == (0.0, 1.0, concept["masks"])
    captioned = quality.method_config("ti_captioned", concept, "MODEL", "paper", 0, 5e-3, args.workdir)
    captions = sorted(glob.glob(os.path.join(captioned.data.concept_dir, "*.txt")))
    assert len(captions) == 2 and all(open(c).read() == "a {} and a red square" for c in captions)
    assert captioned.train.num_steps == 5000 and captioned.data.caption_extension == ".txt"  # paper: ti.py's own steps
    assert quality.expand_sweep("sefi:loss.attention=0.001,0.003") == ["sefi:loss.attention=0.001", "sefi:loss.attention=0.003"]
    with pytest.raises(SystemExit, match="not a key"):
        quality.method_config("ti:train.no_such_key=1", concept, "MODEL", "default", 0, 5e-3, args.workdir)


def test_quality_plane_draws_each_curve_in_its_methods_colour():
    """One colour per series: the points on no curve each their own, in order; a method's sweep in that method's
    colour; a sweep whose method has no point of its own the next free colour; no two series share one."""
    from benchmarks.quality import PALETTE, series_colours

    names = ["ti", "sefi", "masked", "sefi:w=0", "sefi:w=0.3", "lego:c=0", "lego:c=1"]
    colours = series_colours(names, {"s": ["sefi:w=0", "sefi:w=0.3"], "l": ["lego:c=0", "lego:c=1"]})
    assert [colours[n] for n in ("ti", "sefi", "masked")] == PALETTE[:3]
    assert colours["sefi:w=0"] == colours["sefi:w=0.3"] == colours["sefi"]
    assert colours["lego:c=0"] == colours["lego:c=1"] == PALETTE[3]


def test_distractor_reads_survive_the_vae():
    """Generated images pass through the VAE: the border rule still finds the teal background in every
    round-tripped star_on_teal scene and in no scene of random backgrounds, and the detector still
    finds the star and the red square of star_with_square."""
    roundtrip = detector_lib.vae_roundtrip(SHIPPED_MODEL)  # one compiled program per batch size, not one per op
    through_vae = lambda scenes: roundtrip(np.stack([world.render(s)[0] for s in scenes]))

    teal, square = concepts.CONCEPTS["star_on_teal"], concepts.CONCEPTS["star_with_square"]
    on_teal = through_vae(concepts.concept_scenes(teal.attributes, 32, 1, (), teal.background, teal.gradient))
    elsewhere = through_vae(concepts.concept_scenes(teal.attributes, 64, 2))
    assert ev.shows_background(on_teal, teal.background).all() and not ev.shows_background(elsewhere, teal.background).any()
    detector = detector_lib.load_detector(SHIPPED_DETECTOR)
    probs, _ = detector(through_vae(concepts.concept_scenes(square.attributes, 32, 3, square.distractor_objects)))
    assert (probs[:, detector.index("object:yellow star")] > 0.5).mean() >= 0.95
    assert (probs[:, detector.index("object:red square")] > 0.5).mean() >= 0.95
