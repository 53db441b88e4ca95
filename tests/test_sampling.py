"""Sampling with learned tokens: per-stage rows against PyTorch diffusers, layout guidance, PNG outputs."""
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jax_inversion.sampling import generate as sampling


@pytest.fixture(scope="module")
def model(one_level_sd1):
    from jax_inversion.models.loading import load_pretrained

    return load_pretrained(one_level_sd1)


def _learned(rows, token="<ball>"):
    n = rows.shape[-2]
    return sampling.LearnedTokens({token: [token] + [f"{token}_{i}" for i in range(1, n)]}, {"text_encoder": rows})


def test_stage_kv_tokens_sample_like_diffusers(one_level_sd1, tmp_path):
    """SeFi-IDE rows from an extended file: our loop (stage picked from each step's timestep) vs
    diffusers' DDIM loop on the PyTorch UNet with jax_inversion.artifacts.torch's per-stage processors."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from jax_inversion.artifacts.extended import write_extended
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.artifacts.torch import ExtendedTokens

    rng = np.random.default_rng(0)
    stages, n, d = 5, 1, 32
    path = str(tmp_path / "sefi.safetensors")
    write_extended(path, {"<me>": {"base": rng.standard_normal((n, d)).astype(np.float32),
                                   "key": rng.standard_normal((stages, n, d)).astype(np.float32) * 0.5,
                                   "value": rng.standard_normal((stages, n, d)).astype(np.float32) * 0.5}})
    prompt, steps = "a photo of <me>", 10
    learned = sampling.tokens_from_file(path)
    assert learned.num_stages == 5
    request = sampling.SampleRequest(prompt, num_images=2, steps=steps, guidance=1.0, scheduler="ddim", seed=3)
    ours = sampling.generate(load_pretrained(one_level_sd1), learned, request).latents

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(one_level_sd1, "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(one_level_sd1, "text_encoder")).eval()
    unet = UNet2DConditionModel.from_pretrained(one_level_sd1, subfolder="unet").eval()
    tokens = ExtendedTokens.load(path)
    tokens.add_to(tokenizer, text_encoder)
    states = tokens.encode(tokenizer, text_encoder, [prompt] * 2)
    tokens.install(unet, states)
    scheduler = DDIMScheduler.from_pretrained(one_level_sd1, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 4)))
    x = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t, states.base).sample
            x = scheduler.step(out, t, x).prev_sample
    reference = x.numpy().transpose(0, 2, 3, 1)
    tolerance = max(1e-4, 1e-5 * float(np.abs(reference).max()))
    np.testing.assert_allclose(ours, reference, atol=tolerance, rtol=0)

    # The stages matter: stage 0's rows everywhere give other latents.
    stage0 = sampling.LearnedTokens(learned.placeholders, {"text_encoder": np.repeat(learned.rows["text_encoder"][:1], 5, axis=0)})
    other = sampling.generate(load_pretrained(one_level_sd1), stage0, request).latents
    assert float(np.abs(other - reference).max()) > 100 * tolerance


def test_equal_stage_rows_match_plain_rows_and_multi_vector_prompts_expand(model):
    rows = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32) * 0.3
    plain = _learned(rows)
    assert sampling.expand_prompt("a <ball> on <ball>s", plain) == "a <ball> <ball>_1 on <ball>s"
    staged = _learned(np.tile(rows, (3, 2, 1, 1)))
    request = sampling.SampleRequest("a photo of <ball>", num_images=1, steps=4, scheduler="dpm++2m")
    from jax_inversion.models.loading import load_pretrained

    a = sampling.generate(model, plain, request).latents
    b = sampling.generate(load_pretrained(model.path), staged, request).latents
    np.testing.assert_allclose(a, b, atol=1e-5)


def _inside_mass(result, positions, box):
    """Mean share of the tokens' attention (averaged over steps) that falls inside ``box``."""
    from jax_inversion.data.images import box_mask

    maps = result.attention  # [B, HW, L]
    side = int(np.sqrt(maps.shape[1]))
    mask = box_mask(box, side).reshape(-1)
    token_maps = (maps * positions[:, None, :]).sum(-1)  # [B, HW]
    return float(((token_maps * mask).sum(-1) / token_maps.sum(-1)).mean())


def test_layout_guidance_stops_for_good_once_below_threshold():
    """The released code sets its loss once before the step loop: a stand-in loss of 1.0 at steps 0-1 and 0.1 (below
    0.2) from step 2 gives 5 + 5 + 1 iterations, then none at steps 3-9; ours before (stop_for_good=False) ran one
    at each of steps 3-9 too. Through samplers.sample_loop (Euler, zero model output: only guidance moves x)."""
    from jax_inversion.diffusion.samplers import make_sampler, sample_loop

    loss_and_grad = lambda x, i: (jnp.where(i < 2, 1.0, 0.1), jnp.ones_like(x))

    def guided(stop_for_good, steps):
        layout = sampling.LayoutGuidance((), (), stop_for_good=stop_for_good)
        guide = sampling.layout_guide(layout, loss_and_grad, lambda i: 0.5)
        body = lambda i, carry: guide(carry[0], i, carry[1])
        x, (done, count) = jax.jit(lambda x: jax.lax.fori_loop(0, steps, body, (x, sampling.layout_guide_state())))(jnp.zeros(2))
        return int(count), bool(done), np.asarray(x)

    assert guided(True, 2)[:2] == (10, False)
    assert guided(True, 3)[:2] == (11, True)
    count, done, x = guided(True, 20)
    assert (count, done) == (11, True)
    np.testing.assert_allclose(x, [-5.5, -5.5])
    assert guided(False, 20)[0] == 18

    sampler = make_sampler("euler", {"num_train_timesteps": 1000}, 12)
    layout = sampling.LayoutGuidance((), (), stop_for_good=True)
    guide = sampling.layout_guide(layout, loss_and_grad, lambda i: 0.5)
    final = sample_loop(sampler, lambda x_in, t, i: jnp.zeros_like(x_in), jnp.zeros((1, 2, 2, 4)), guide=guide,
                        guide_state=sampling.layout_guide_state())
    np.testing.assert_allclose(np.asarray(final), -5.5)


def test_layout_places_the_token_left_and_the_other_object_right(tmp_path):
    """No --layout-words, one learned token: the code's get_constant_layout boxes, token left, the other object's
    words right; the prompts without a second object keep the token alone in the left box."""
    from transformers import CLIPTokenizer

    from jax_inversion.sampling.layout import FIXED_BOXES
    from jax_inversion.models.tokenizer_files import write_clip_tokenizer

    words = sampling.default_layout_words
    assert words("a <ball> and a dog", ["<ball>"]) == ["<ball>", "dog"]
    assert words("a photo of <ball> and a teddy bear on the grass.", ["<ball>"]) == ["<ball>", "teddy", "bear"]
    assert words("a dog in front of a <ball>", ["<ball>"]) == ["<ball>", "dog"]
    assert words("a <ball> with the red hat", ["<ball>"]) == ["<ball>", "red", "hat"]
    assert words("a photo of <ball>", ["<ball>"]) == []
    assert words("<cat> and <dog>", ["<cat>", "<dog>"]) == []

    write_clip_tokenizer(str(tmp_path), ["a", "photo", "of", "and", "dog"])
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    tokenizer.add_tokens(["<ball>"])
    model = type("Stub", (), {"tokenizer": tokenizer})()  # _layout reads only the tokenizer without a layout model
    learned = _learned(np.zeros((1, 32), np.float32))
    left, right = (tuple(float(v) for v in b) for b in FIXED_BOXES)

    def layout(prompt, **request):
        ids = np.asarray(tokenizer([prompt], padding="max_length", max_length=77).input_ids)
        return sampling._layout(model, learned, sampling.SampleRequest(prompt, layout_guidance=True, **request), ids)

    guidance = layout("a <ball> and a dog")
    assert guidance.words == ("<ball>", "dog")
    assert guidance.boxes == (left, right)
    assert [int(np.argmax(p[0])) for p in guidance.positions] == [2, 5]  # <start> a <ball> and a dog
    assert layout("a photo of <ball>").words == ("<ball>",)
    assert layout("a photo of <ball>").boxes == (left,)
    assert layout("a <ball> and a dog", layout_words=("<ball>",), boxes=((0.0, 0.0, 0.5, 1.0),)).words == ("<ball>",)


@pytest.mark.heavy(36)
def test_layout_guidance_moves_attention_into_the_box(tiny_sd1):
    """Fixed seed, same prompt: with guidance, <ball>'s mean 16x16 cross-attention mass inside its box is higher.

    The random tiny model's cross-attention logits are ~0 (uniform maps that barely depend on the
    latent: guidance moves the mass by 4e-4), so its cross-attention queries and keys are scaled by 8
    to make the maps depend on the latent as a trained model's do. The box is a quarter of the image: with
    the left half the loss reaches the 0.2 threshold early and the code's rule stops guidance for good, too
    soon to move the mean over 20 steps by 0.01 (ours before, re-checking at each step, does).
    """
    import flax

    from jax_inversion.models.loading import load_pretrained

    model = load_pretrained(tiny_sd1)
    flat = flax.traverse_util.flatten_dict(model.unet_params)
    model.unet_params = flax.traverse_util.unflatten_dict(
        {k: v * 8.0 if "attn2" in k and k[-2] in ("to_q", "to_k") else v for k, v in flat.items()}
    )
    rows = np.random.default_rng(2).standard_normal((1, 32)).astype(np.float32) * 0.3
    learned = _learned(rows)
    box = (0.0, 0.0, 0.5, 0.5)
    # Measured on the 16x16 layers guidance steers (the released code's: the first up block's; the mid block is 8x8).
    base = dict(num_images=2, steps=20, scheduler="euler", seed=5, attention_resolution=16, attention_layers=("up_blocks",))
    without = sampling.generate(model, learned, sampling.SampleRequest("a photo of <ball> and a cube", **base))
    with_guidance = sampling.generate(model, learned, sampling.SampleRequest(
        "a photo of <ball> and a cube", layout_guidance=True, layout_words=("<ball>",), boxes=(box,), **base))
    positions = sampling.token_positions(model.tokenizer, with_guidance.input_ids, "<ball>", learned)
    assert positions.sum() == 2
    inside_without = _inside_mass(without, positions, box)
    inside_with = _inside_mass(with_guidance, positions, box)
    assert inside_with > inside_without + 0.01, (inside_with, inside_without)
    assert with_guidance.boxes == (box,)
    assert not np.allclose(with_guidance.latents, without.latents)


def _cli(command, *args):
    return subprocess.run([sys.executable, "-m", "jax_inversion.cli", command, *args], capture_output=True, text=True)


@pytest.mark.heavy(29)
def test_sample_and_attention_commands_write_pngs(one_level_sd1, tmp_path):
    from jax_inversion.artifacts.export import write_embedding_file

    rows = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32) * 0.3
    embedding = write_embedding_file(str(tmp_path / "ball.safetensors"), "diffusers", "<ball>", {"text_encoder": rows})
    out = tmp_path / "grid.png"
    done = _cli("sample", f"--model={one_level_sd1}", f"--embedding={embedding}", "--prompt=a photo of <ball>",
                "--num-images=4", "--steps=4", "--scheduler=dpm++2m", "--clip-skip=2", f"--out={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    image = Image.open(out)
    assert image.size == (64, 64)  # 2 x 2 grid of 32 px images
    assert image.text["prompt"] == "a photo of <ball>" and image.text["seed"] == "0" and image.text["clip_skip"] == "2"
    # the command drew what the library draws for the same request: its flags reached the sampler
    from jax_inversion.text.conditioning import with_clip_skip
    from jax_inversion.models.loading import load_pretrained

    request = sampling.SampleRequest("a photo of <ball>", num_images=4, steps=4, scheduler="dpm++2m")
    model = with_clip_skip(load_pretrained(one_level_sd1), 2)
    expected = sampling.image_grid(sampling.generate(model, sampling.tokens_from_file(embedding), request).images)
    assert np.abs(np.asarray(image.convert("RGB"), np.int16) - expected.astype(np.int16)).max() <= 1
    assert np.asarray(image).std() > 5

    folder = tmp_path / "maps"
    folder.mkdir()
    done = _cli("attention", f"--model={one_level_sd1}", f"--embedding={embedding}", "--prompt=a photo of <ball>",
                "--num-images=1", "--steps=4", f"--out={folder}")
    assert done.returncode == 0, done.stderr[-2000:]
    (written,) = os.listdir(folder)
    figure = np.asarray(Image.open(folder / written))
    # image + "a", "photo", "of", "<ball>", "<ball>_1": six 128 px panels with a label strip
    assert figure.shape == (128 + 14, 6 * 128, 3)
    assert figure.std() > 5

    done = _cli("sample", f"--model={one_level_sd1}", f"--embedding={embedding}", "--prompt=a <ball>", "--layout-guidance",
                "--layout-words=<ball>,dog", f"--out={tmp_path / 'x.png'}", "--steps=2", "--num-images=1")
    assert done.returncode == 1 and "'dog' is not in the prompt" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.heavy(16)
def test_validation_grids_during_training(one_level_sd1, tmp_path):
    from tests.helpers import make_config

    from jax_inversion.commands.default_job import write_concept_images
    from jax_inversion.training.train import train

    config = make_config(one_level_sd1, write_concept_images(str(tmp_path / "images"), count=2), num_steps=2,
                         checkpoint_every=2, log_every=1, validation_every=2, validation_steps=3, validation_images=2,
                         validation_scheduler="euler_a", validation_negative_prompt="blurry", validation_at_start=True)
    config.train.validation_prompts = ("a photo of <ball>", "<ball> on the beach")
    workdir = str(tmp_path / "run")
    train(config, workdir)
    image = Image.open(os.path.join(workdir, "validation", "step_000002.png"))
    assert image.size == (2 * 32, 2 * 32)  # one row per prompt, one column per image
    text = json.loads(json.dumps(image.text))
    assert text["prompts"] == "a photo of <ball> | <ball> on the beach"
    assert (text["negative_prompt"], text["scheduler"], text["steps"]) == ("blurry", "euler_a", "3")
    grid = np.asarray(image.convert("RGB"))
    start = Image.open(os.path.join(workdir, "validation", "step_000000.png"))  # validation_at_start: the initial rows
    assert start.text["step"] == "0" and start.size == image.size
    start = np.asarray(start.convert("RGB"))
    assert start.std() > 5 and not np.array_equal(start, grid)

    # The grid is what sampling the step-2 checkpoint with the same settings (the `sample` command's
    # path, negative prompt included) draws, on a freshly loaded model; the negative prompt changes it.
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.sampling.generate import SampleRequest, generate, image_grid, tokens_from_run

    model_path, learned = tokens_from_run(workdir, step=2)
    model = load_pretrained(model_path)
    cache = {}  # one compiled loop for the three draws
    draw = lambda prompt, negative: image_grid(generate(model, learned, SampleRequest(
        prompt, negative_prompt=negative, num_images=2, steps=3, scheduler="euler_a", seed=config.seed), cache=cache).images, columns=2)
    rows = [draw(prompt, "blurry") for prompt in config.train.validation_prompts]
    np.testing.assert_array_equal(grid, np.concatenate(rows))
    assert grid[:32].std() > 5 and not np.array_equal(grid[:32], grid[32:])  # images, and the prompts differ
    assert np.abs(draw(config.train.validation_prompts[0], "").astype(int) - grid[:32]).max() > 10

    # TensorBoard holds the same grids under "validation" at steps 0 (first of all events) and 2.
    from tensorboardX.proto import event_pb2

    (events,) = [os.path.join(workdir, "tensorboard", f) for f in os.listdir(os.path.join(workdir, "tensorboard"))]
    logged, order = {}, []
    with open(events, "rb") as f:
        while header := f.read(12):  # TFRecord: uint64 length, uint32 crc, data, uint32 crc
            data = f.read(int.from_bytes(header[:8], "little"))
            f.read(4)
            event = event_pb2.Event.FromString(data)
            for value in event.summary.value:
                order.append((value.tag, event.step))
                if value.tag == "validation":
                    logged[event.step] = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)).convert("RGB"))
    assert list(logged) == [0, 2]
    assert order[0] == ("validation", 0)  # before the first step's metrics
    np.testing.assert_array_equal(logged[0], start)
    np.testing.assert_array_equal(logged[2], grid)


def test_clip_skip_equals_diffusers_and_is_what_sample_reads(one_level_sd1):
    """clip_skip N (A1111/kohya numbering) conditions on the N-th layer from the end through the final LayerNorm:
    equal to diffusers' encode_prompt(clip_skip=N - 1); SDXL and out-of-range values are one line."""
    import torch
    from diffusers import StableDiffusionPipeline

    from jax_inversion.text import tokens as tokens_lib
    from jax_inversion.text.conditioning import text_conditioning, with_clip_skip
    from jax_inversion.core.errors import ConfigError
    from jax_inversion.models.loading import load_pretrained

    base = load_pretrained(one_level_sd1, components=("text_encoder",))
    pipe = StableDiffusionPipeline.from_pretrained(one_level_sd1, safety_checker=None, torch_dtype=torch.float32)
    # diffusers 0.42's clip_skip path reads transformers 4's `text_model` wrapper; transformers 5's CLIPTextModel holds
    # final_layer_norm itself: alias it (outside nn.Module's registry) so diffusers' own code runs unchanged.
    if not hasattr(pipe.text_encoder, "text_model"):
        object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
    prompts = ["a red ball", "a photo of a cube on the beach"]
    ids = {"text_encoder": jnp.asarray(sampling.data_lib.tokenize_prompts(base.tokenizer, prompts))}
    placeholder = {"text_encoder": tokens_lib.add_placeholder_tokens(base.tokenizer, ["<clip-skip-test>"])}
    rows = {"text_encoder": jnp.zeros((1, base.text_encoder.config.hidden_size))}
    layers = base.text_encoder.config.num_hidden_layers
    assert layers >= 2
    for skip in (1, 2):
        model = with_clip_skip(base, skip)
        frozen = {"text_encoder": model.text_encoder_params}
        ours, _ = text_conditioning(model, frozen, ids, rows, placeholder, 64)
        with torch.no_grad():
            ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=None if skip == 1 else skip - 1)
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=2e-5)
    assert not np.allclose(np.asarray(text_conditioning(with_clip_skip(base, 2), frozen, ids, rows, placeholder, 64)[0]),
                           np.asarray(text_conditioning(base, frozen, ids, rows, placeholder, 64)[0]), atol=1e-3)
    for bad in (0, layers + 1):
        with pytest.raises(ConfigError, match=f"clip_skip {bad} is out of range"):
            with_clip_skip(base, bad)


def test_overlong_sampling_prompt_warns(model, caplog):
    """A prompt longer than the 77 positions CLIP reads is cut, with a warning naming it."""
    import logging

    rows = np.zeros((1, model.text_encoder.config.hidden_size), np.float32)
    learned = _learned(rows, "<long-prompt-test>")
    placeholder_ids = sampling.add_tokens(model, learned)
    long_prompt = "a " + " ".join(["red ball"] * 60)
    with caplog.at_level(logging.WARNING, logger="jax_inversion"):
        sampling.prompt_states(model, placeholder_ids, learned, ["a <long-prompt-test>", long_prompt], 64)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "123 tokens but the text encoder reads 77" in messages[0]


def test_a_second_validation_compiles_nothing(model, tmp_path):
    """Validation during training: the text encoder, the sampling loop and the VAE decoder are compiled on the first
    grid; a second grid from new rows lowers no program at all (counted with jax.monitoring's lowering events)."""
    from jax._src import dispatch

    lowered = []
    listener = lambda event, duration, **_: lowered.append(event) if event == dispatch.JAXPR_TO_MLIR_MODULE_EVENT else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        validator = sampling.Validator(model, str(tmp_path), ["a photo of <val-ball>", "<val-ball> on the beach"],
                                       num_images=2, steps=3, negative_prompt="blurry")
        meta = {"layout": {"tokens": ["<val-ball>", "<val-ball>_1"]}, "placeholder_token": "<val-ball>"}
        rows = np.random.default_rng(0).standard_normal((2, model.text_encoder.config.hidden_size)).astype(np.float32)
        validator(1, {"text_encoder": rows}, meta)
        first = len(lowered)
        validator(2, {"text_encoder": rows * 0.5}, meta)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first >= 1 and len(lowered) == first, (first, len(lowered))  # (programs other tests compiled are reused)
    assert os.path.exists(tmp_path / "validation" / "step_000002.png")
