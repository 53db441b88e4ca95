"""SDXL-style models: parity with two text encoders and added embeddings, training, sdxl export."""
import numpy as np

from jax_inversion.checkpoints import read_run
from jax_inversion.configs.ti import get_config
from jax_inversion.default_job import write_concept_images
from jax_inversion.export import export_run
from jax_inversion.parity import check_parity
from jax_inversion.train import train


def test_sdxl_parity(tiny_sdxl):
    results = {(r.component, r.output): r for r in check_parity(tiny_sdxl, latent_size=16)}
    assert ("text_encoder_2", "text_embeds") in results and ("unet", "noise_prediction") in results
    for r in results.values():
        assert r.max_abs_diff < 1e-4, (r.component, r.output, r.max_abs_diff)


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
