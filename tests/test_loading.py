"""load_pretrained on diffusers-format directories, and its errors."""
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jax_inversion.models.loading import ModelLoadError, load_pretrained, read_state_dict


def test_loads_every_component(tiny_sd2):
    model = load_pretrained(tiny_sd2)
    assert model.prediction_type == "v_prediction"
    assert model.unet.config.prediction_type == "v_prediction"
    assert model.unet.config.use_linear_projection and model.unet.config.upcast_attention
    assert model.unet.config.num_attention_heads == (2, 4, 4)
    assert model.scheduler_config["beta_schedule"] == "scaled_linear"
    assert model.tokenizer("a photo of a cat").input_ids[0] == model.tokenizer.bos_token_id
    assert model.text_encoder.config.hidden_act == "gelu"
    assert model.vae.config.scaling_factor == pytest.approx(0.18215)


def test_dtype_sets_compute_and_storage(tiny_sd1):
    model = load_pretrained(tiny_sd1, dtype=jnp.bfloat16, components=("unet",))
    assert model.unet.dtype == jnp.bfloat16
    leaf = model.unet_params["conv_in"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    assert model.vae is None and model.text_encoder is None


def test_bin_weights_read_with_weights_only(tiny_sd1, tmp_path):
    import torch
    from safetensors.numpy import load_file

    copy = tmp_path / "model"
    shutil.copytree(tiny_sd1, copy)
    unet_dir = copy / "unet"
    tensors = load_file(str(unet_dir / "diffusion_pytorch_model.safetensors"))
    os.remove(unet_dir / "diffusion_pytorch_model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, unet_dir / "diffusion_pytorch_model.bin")
    state = read_state_dict(str(unet_dir))
    assert state.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(state[k], tensors[k])


def test_bin_with_code_is_refused(tmp_path):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "unet").mkdir()
    torch.save({"x": Evil()}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safely"):
        read_state_dict(str(tmp_path / "unet"))
    assert not (tmp_path / "pwned").exists()


def test_missing_and_misshaped_weights_name_the_key(tiny_sd1, tmp_path):
    from safetensors.numpy import load_file, save_file

    copy = tmp_path / "model"
    shutil.copytree(tiny_sd1, copy)
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    del tensors["mid_block.resnets.1.conv2.bias"]
    tensors["conv_in.weight"] = np.zeros((32, 4, 5, 5), np.float32)
    save_file(tensors, str(path))
    with pytest.raises(ModelLoadError) as error:
        load_pretrained(str(copy), components=("unet",))
    message = str(error.value)
    assert "mid_block.resnets.1.conv2.bias" in message and "conv_in.weight" in message


def test_unknown_path_and_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="not a diffusers-format model"):
        load_pretrained(str(tmp_path))


def test_unreachable_hub_id_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not be fetched"):
        load_pretrained("someone/not-a-real-model-xyz")


@pytest.mark.heavy(28)
def test_check_parity_cli_on_our_tiny_model_writer(tmp_path):
    """With no --model, check-parity writes a model with our own writer (jax_inversion.models.tiny) and compares
    it with what diffusers/transformers load from it: no missing keys, every output within 1e-4."""
    # One run at a tolerance nothing meets: it exits non-zero marking every row FAIL, and the table it prints shows
    # every difference within 1e-4 (the default tolerance, whose "parity ok" path is the same comparison).
    tight = subprocess.run([sys.executable, "-m", "jax_inversion.cli", "check-parity", "--latent_size=8", "--tolerance=1e-12"],
                           capture_output=True, text=True)
    assert tight.returncode != 0 and "difference above tolerance 1e-12" in tight.stderr, tight.stderr[-2000:]
    rows = [line.split() for line in tight.stdout.splitlines() if line.endswith(("ok", "FAIL"))]
    assert {r[0] for r in rows} >= {"unet", "vae", "text_encoder"} and all(r[-1] == "FAIL" for r in rows if float(r[2]) > 1e-12)
    assert all(float(r[2]) <= 1e-4 for r in rows), rows
    written = tight.stdout.split("tiny random SD1-style model in ", 1)[1].split()[0]
    shutil.rmtree(written)
    missing = subprocess.run(
        [sys.executable, "-m", "jax_inversion.cli", "check-parity", f"--model={tmp_path / 'nope'}"],
        capture_output=True, text=True,
    )
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines()[-1].startswith("check-parity: model path")
