"""Sampling with learned tokens: per-stage rows against PyTorch diffusers, layout guidance, PNG outputs."""
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from jax_inversion import sampling


@pytest.fixture(scope="module")
def model(one_level_sd1):
    from jax_inversion.loading import load_pretrained

    return load_pretrained(one_level_sd1)


def _learned(rows, token="<ball>"):
    n = rows.shape[-2]
    return sampling.LearnedTokens({token: [token] + [f"{token}_{i}" for i in range(1, n)]}, {"text_encoder": rows})


def test_stage_kv_tokens_sample_like_diffusers(one_level_sd1, tmp_path):
    """SeFi-IDE rows from an extended file: our loop (stage picked from each step's timestep) vs
    diffusers' DDIM loop on the PyTorch UNet with jax_inversion.torch's per-stage processors."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from jax_inversion.extended import write_extended
    from jax_inversion.loading import load_pretrained
    from jax_inversion.torch import ExtendedTokens

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
    from jax_inversion.loading import load_pretrained

    a = sampling.generate(model, plain, request).latents
    b = sampling.generate(load_pretrained(model.path), staged, request).latents
    np.testing.assert_allclose(a, b, atol=1e-5)


def _inside_mass(result, positions, box):
    """Mean share of the tokens' attention (averaged over steps) that falls inside ``box``."""
    from jax_inversion.data import box_mask

    maps = result.attention  # [B, HW, L]
    side = int(np.sqrt(maps.shape[1]))
    mask = box_mask(box, side).reshape(-1)
    token_maps = (maps * positions[:, None, :]).sum(-1)  # [B, HW]
    return float(((token_maps * mask).sum(-1) / token_maps.sum(-1)).mean())


@pytest.mark.heavy(30)
def test_layout_guidance_moves_attention_into_the_box(tiny_sd1):
    """Fixed seed, same prompt: with guidance, <ball>'s mean 16x16 cross-attention mass inside its box is higher.

    The random tiny model's cross-attention logits are ~0 (uniform maps that barely depend on the
    latent: guidance moves the mass by 4e-4), so its cross-attention queries and keys are scaled by 8
    to make the maps depend on the latent as a trained model's do.
    """
    import flax

    from jax_inversion.loading import load_pretrained

    model = load_pretrained(tiny_sd1)
    flat = flax.traverse_util.flatten_dict(model.unet_params)
    model.unet_params = flax.traverse_util.unflatten_dict(
        {k: v * 8.0 if "attn2" in k and k[-2] in ("to_q", "to_k") else v for k, v in flat.items()}
    )
    rows = np.random.default_rng(2).standard_normal((1, 32)).astype(np.float32) * 0.3
    learned = _learned(rows)
    box = (0.0, 0.0, 0.5, 1.0)
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


@pytest.mark.heavy(24)
def test_sample_and_attention_commands_write_pngs(one_level_sd1, tmp_path):
    from jax_inversion.export import write_embedding_file

    rows = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32) * 0.3
    embedding = write_embedding_file(str(tmp_path / "ball.safetensors"), "diffusers", "<ball>", {"text_encoder": rows})
    out = tmp_path / "grid.png"
    done = _cli("sample", f"--model={one_level_sd1}", f"--embedding={embedding}", "--prompt=a photo of <ball>",
                "--num-images=4", "--steps=4", "--scheduler=dpm++2m", f"--out={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    image = Image.open(out)
    assert image.size == (64, 64)  # 2 x 2 grid of 32 px images
    assert image.text["prompt"] == "a photo of <ball>" and image.text["seed"] == "0"
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


@pytest.mark.heavy(19)
def test_validation_grids_during_training(one_level_sd1, tmp_path):
    from tests.helpers import make_config

    from jax_inversion.default_job import write_concept_images
    from jax_inversion.train import train

    config = make_config(one_level_sd1, write_concept_images(str(tmp_path / "images"), count=2), num_steps=2,
                         checkpoint_every=2, log_every=1, validation_every=2, validation_steps=3, validation_images=2)
    config.train.validation_prompts = ("a photo of <ball>", "<ball> on the beach")
    workdir = str(tmp_path / "run")
    train(config, workdir)
    image = Image.open(os.path.join(workdir, "validation", "step_000002.png"))
    assert image.size == (2 * 32, 2 * 32)  # one row per prompt, one column per image
    assert json.loads(json.dumps(image.text))["prompts"] == "a photo of <ball> | <ball> on the beach"
    grid = np.asarray(image.convert("RGB"))

    # The grid is what sampling the step-2 checkpoint with the same settings draws, on a freshly loaded model.
    from jax_inversion.loading import load_pretrained
    from jax_inversion.sampling import SampleRequest, generate, image_grid, tokens_from_run

    model_path, learned = tokens_from_run(workdir, step=2)
    model = load_pretrained(model_path)
    rows = [image_grid(generate(model, learned, SampleRequest(prompt, num_images=2, steps=3, seed=config.seed)).images, columns=2)
            for prompt in config.train.validation_prompts]
    np.testing.assert_array_equal(grid, np.concatenate(rows))
    assert grid[:32].std() > 5 and not np.array_equal(grid[:32], grid[32:])  # images, and the prompts differ

    # TensorBoard holds the same grid under "validation" at step 2.
    from tensorboardX.proto import event_pb2

    (events,) = [os.path.join(workdir, "tensorboard", f) for f in os.listdir(os.path.join(workdir, "tensorboard"))]
    logged = {}
    with open(events, "rb") as f:
        while header := f.read(12):  # TFRecord: uint64 length, uint32 crc, data, uint32 crc
            data = f.read(int.from_bytes(header[:8], "little"))
            f.read(4)
            event = event_pb2.Event.FromString(data)
            for value in event.summary.value:
                if value.tag == "validation":
                    logged[event.step] = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)).convert("RGB"))
    assert list(logged) == [2]
    np.testing.assert_array_equal(logged[2], grid)
