"""The toy world: generator, held-out concepts, shipped model and detector, pretraining, evaluation."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
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
    assert concepts.read_concept(info["images"])["label"] == "state:melting"
    assert concepts.read_concept(str(tmp_path)) is None
    star = concepts.write_concept("star", str(tmp_path / "star"), count=2)
    assert "subject_images" not in star and star["class_word"] in world.SEEN.words


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
    from jax_inversion.parity import check_parity

    results = check_parity(SHIPPED_MODEL, latent_size=16)
    assert {r.component for r in results} == {"text_encoder", "unet", "vae"}
    for r in results:  # relative to the output's scale: the VAE decodes to pixels, the UNet predicts noise
        assert r.max_abs_diff < 1e-4 * max(1.0, r.max_abs_reference), r


def test_shipped_detector_reads_fresh_scenes_and_the_held_out_concepts(tmp_path):
    """Per label group on 300 fresh scenes, as drawn and through the shipped VAE (what generated images
    are); and each held-out attribute found in its concept's images, never in its subject's."""
    from jax_inversion.data import list_concept_images

    detector = detector_lib.load_detector(SHIPPED_DETECTOR)
    scene_list = world.scenes(999, 300, world.ALL)
    # measured when shipped: precision >= 0.995 and recall >= 0.973 in every group; through the VAE
    # precision >= 0.962, recall >= 0.946, colour-and-shape objects 0.993 / 0.981
    accuracy = detector_lib.detector_accuracy(detector, scene_list)
    through_vae = detector_lib.detector_accuracy(detector, scene_list, detector_lib.vae_roundtrip(SHIPPED_MODEL))
    for group in ("shape", "colour", "texture", "state", "object"):
        assert accuracy[f"{group}_precision"] > 0.97 and accuracy[f"{group}_recall"] > 0.95, (group, accuracy)
        assert through_vae[f"{group}_precision"] > 0.93 and through_vae[f"{group}_recall"] > 0.92, (group, through_vae)
    assert through_vae["object_precision"] > 0.97 and through_vae["object_recall"] > 0.96, through_vae
    assert accuracy["colour"] > 0.97, accuracy
    read = lambda folder: np.stack([np.asarray(Image.open(p)) for p in list_concept_images(folder)])
    for name in concepts.CONCEPTS:
        info = concepts.write_concept(name, str(tmp_path / name))
        label = detector.index(info["label"])
        assert (detector(read(info["images"]))[0][:, label] > 0.5).mean() >= 0.75, name
        if "subject_images" in info:
            assert (detector(read(info["subject_images"]))[0][:, label] > 0.5).mean() <= 0.25, name


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


def test_toyworld_pretrain_writes_a_diffusers_model(tmp_path):
    """A few steps of every stage: the reproduction script runs and its output loads in both stacks."""
    from diffusers import StableDiffusionPipeline

    from jax_inversion.loading import load_pretrained

    done = _cli("toyworld", "pretrain", f"--workdir={tmp_path}", "--config.num_scenes=64", "--config.vae.steps=2",
                "--config.diffusion.steps=2", "--config.detector.steps=2", "--config.detector.num_scenes=64", "--config.log_every=1",
                "--config.detector.eval_scenes=32",
                f"--config.detector.vae_from={tmp_path}/model")  # the model the same command writes first
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "pretrain_log.jsonl")]
    assert [r["stage"] for r in log if r["stage"] in ("vae", "diffusion", "detector")] == ["vae"] * 2 + ["diffusion"] * 2 + ["detector"] * 2
    assert [r["stage"] for r in log if r["stage"].startswith("detector_eval")] == ["detector_eval", "detector_eval_through_vae"]
    model = load_pretrained(str(tmp_path / "model"))
    scaling = json.load(open(tmp_path / "model" / "vae" / "config.json"))["scaling_factor"]
    assert abs(scaling - next(r["scaling_factor"] for r in log if r["stage"] == "latents")) < 1e-4
    assert model.unet.config.sample_size == 16
    StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), safety_checker=None)
    detector_lib.load_detector(str(tmp_path / "detector"))

    # a continuation (how the shipped model got its second round): same VAE, text encoder + UNet trained on
    done = _cli("toyworld", "pretrain", f"--workdir={tmp_path}/more", f"--config.init_from={tmp_path}/model", "--config.stages=model",
                "--config.num_scenes=64", "--config.diffusion.steps=3", "--config.diffusion.save_every=2", "--config.log_every=1")
    assert done.returncode == 0, done.stderr[-3000:]
    more_log = [json.loads(line) for line in open(tmp_path / "more" / "pretrain_log.jsonl")]
    assert [(r["stage"], r["step"]) for r in more_log if r["stage"] in ("diffusion", "saved")] == [
        ("diffusion", 1), ("diffusion", 2), ("saved", 2), ("diffusion", 3)]
    more = load_pretrained(str(tmp_path / "more" / "model"))
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    snapshot = load_pretrained(next(r["path"] for r in more_log if r["stage"] == "saved"))  # a whole model of its own
    assert snapshot.path.endswith(os.path.join("snapshots", "step_2")) and not same(snapshot.unet_params, more.unet_params)
    assert same(more.vae_params, model.vae_params) and more.vae.config.scaling_factor == model.vae.config.scaling_factor
    assert not same(more.unet_params, model.unet_params) and not same(more.text_encoder_params, model.text_encoder_params)
    assert not os.path.exists(tmp_path / "more" / "detector")


def test_default_train_then_toyworld_eval(tmp_path):
    """README's first command on the shipped model (shortened), then the eval table of that run."""
    run = tmp_path / "run"
    done = _cli("train", f"--workdir={run}", "--config.train.num_steps=4", "--config.train.checkpoint_every=4")
    assert done.returncode == 0, done.stderr[-3000:]
    done = _cli("toyworld", "eval", f"--workdir={run}", "--images_per_prompt=2", "--steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 2 * (4 + 1)  # header, rule; 4 prompts + a mean, for the learned and the random token
    assert "a <concept> and a red square" in done.stdout and "shape:star" in done.stdout
    table = open(run / "toyworld_eval" / "table.md").read()
    assert table.strip() == "\n".join(lines)

    # The table's learned rows are what the shipped detector reads in samples.png, row by row (the PNG is lossless).
    concept = concepts.read_concept(str(run / "default_concept" / "images"))
    grid = np.asarray(Image.open(run / "toyworld_eval" / "samples.png").convert("RGB"))
    side = world.SIZE
    detector = detector_lib.load_detector(SHIPPED_DETECTOR)
    reference = ev.reference_features(detector, concept["images"])
    learned_rows = [line.split("|")[2:6] for line in lines[2:6]]
    companions = [None] + list(concept["companions"])
    assert len(learned_rows) == len(companions) == grid.shape[0] // side
    for row, (cells, companion) in enumerate(zip(learned_rows, companions)):
        images = np.stack([grid[row * side : (row + 1) * side, col * side : (col + 1) * side] for col in range(2)])
        probs, features = detector(images)
        concept_found = np.mean(probs[:, detector.index(concept["label"])] > 0.5)
        assert cells[1].strip() == f"{concept_found:.2f}", (row, cells)
        if companion is not None:
            assert cells[2].strip() == f"{np.mean(probs[:, detector.index(ev.object_label(companion))] > 0.5):.2f}"
        assert abs(float(cells[3]) - ev._cosine(features, reference)) <= 0.0051, (row, cells)


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
    done = _cli("toyworld", "pretrain", f"--workdir={tmp_path}/det", "--config.stages=detector", f"--config.detector.vae_from={tmp_path}/none")
    assert done.returncode == 1 and "does not exist" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = _cli("toyworld", "concepts", f"--out={tmp_path}", "--names=dragon")
    assert done.returncode == 1 and "unknown held-out concept" in done.stderr and len(done.stderr.strip().splitlines()) == 1


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
    (model / "diffusion_pytorch_model.safetensors").write_bytes(b"weights trained longer")
    assert not finished_run(str(run), run_fingerprint(str(tmp_path / "model"), 150, 0, 5e-3))
    assert not (run / "checkpoint").exists() and not (run / "trained.json").exists()
    assert not finished_run(str(run), run_fingerprint(str(tmp_path / "model"), 300, 0, 5e-3))
