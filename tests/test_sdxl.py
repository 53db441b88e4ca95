"""SDXL-style models: parity with two text encoders and added embeddings, training, sdxl export."""
import jax
import numpy as np
import pytest

from jax_inversion.artifacts.checkpoints import read_run
from jax_inversion.artifacts.export import export_run
from jax_inversion.commands.default_job import write_concept_images
from jax_inversion.configs.ti import get_config
from jax_inversion.models.parity import check_parity
from jax_inversion.training.train import train


def test_sdxl_parity(tiny_sdxl):
    results = {(r.component, r.output): r for r in check_parity(tiny_sdxl, latent_size=16)}
    assert ("text_encoder_2", "text_embeds") in results and ("unet", "noise_prediction") in results
    for r in results.values():
        assert r.max_abs_diff < 1e-4, (r.component, r.output, r.max_abs_diff)


@pytest.mark.heavy(46)
def test_sdxl_train_and_export_loads_in_diffusers(tiny_sdxl, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    config = get_config()
    config.model = tiny_sdxl
    config.data.concept_dir = write_concept_images(str(tmp_path / "concept"), count=2)
    config.data.placeholder_token = "<ball>"
    config.data.initializer_token = "ball"
    config.train.batch_size = 8
    config.train.num_steps = 3
    workdir = str(tmp_path / "run")
    state = train(config, workdir)
    rows_l = np.asarray(state.embeddings["text_encoder"])
    rows_g = np.asarray(state.embeddings["text_encoder_2"])
    assert rows_l.shape == (1, 32) and rows_g.shape == (1, 48)
    _, saved, _ = read_run(workdir)
    assert np.array_equal(np.asarray(saved["embeddings"]["text_encoder_2"]), rows_g)

    path = str(tmp_path / "ball_sdxl.safetensors")
    export_run(workdir, path, "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, torch_dtype=torch.float32)
    tensors = load_file(path)
    pipe.load_textual_inversion(tensors["clip_l"], token="<ball>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tensors["clip_g"], token="<ball>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    id_l = pipe.tokenizer.convert_tokens_to_ids("<ball>")
    id_g = pipe.tokenizer_2.convert_tokens_to_ids("<ball>")
    assert np.array_equal(pipe.text_encoder.get_input_embeddings().weight[id_l].detach().numpy(), rows_l[0])
    assert np.array_equal(pipe.text_encoder_2.get_input_embeddings().weight[id_g].detach().numpy(), rows_g[0])


@pytest.mark.heavy(22)
def test_sdxl_sample_equals_diffusers(tiny_sdxl):
    """`sample` on SDXL: a learned token in both encoders, guidance, DDIM; the same initial latents through
    diffusers' StableDiffusionXLPipeline end where ours do. No negative prompt is diffusers' zeros
    (force_zeros_for_empty_prompt), a negative prompt is encoded by both encoders."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from jax_inversion.sampling import generate as sampling
    from jax_inversion.models.loading import load_pretrained

    rng = np.random.default_rng(0)
    rows = {"text_encoder": rng.standard_normal((1, 32)).astype(np.float32) * 0.3,
            "text_encoder_2": rng.standard_normal((1, 48)).astype(np.float32) * 0.3}
    learned = sampling.LearnedTokens({"<ball>": ["<ball>"]}, rows)
    model = load_pretrained(tiny_sdxl)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_textual_inversion(torch.from_numpy(rows["text_encoder"]), token="<ball>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(torch.from_numpy(rows["text_encoder_2"]), token="<ball>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    side = model.unet.config.sample_size
    resolution = side * 2 ** (len(model.vae.config.block_out_channels) - 1)
    for negative in ("", "a blue cube"):
        request = sampling.SampleRequest("a photo of <ball>", negative_prompt=negative, num_images=2, steps=4, scheduler="ddim")
        ours = sampling.generate(model, learned, request)
        noise = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, side, side, model.unet.config.in_channels)))
        with torch.no_grad():
            ref = pipe("a photo of <ball>", negative_prompt=negative or None, num_inference_steps=4, guidance_scale=7.5,
                       latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()), output_type="latent",
                       height=resolution, width=resolution, num_images_per_prompt=2).images
        np.testing.assert_allclose(ours.latents, ref.numpy().transpose(0, 2, 3, 1), atol=2e-4, err_msg=f"negative {negative!r}")
