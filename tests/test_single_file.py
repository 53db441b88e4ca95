"""Single-file checkpoints (A1111 / kohya / Civitai layout): ours vs diffusers' ``from_single_file``.

The files are written from the tiny diffusers models with the published diffusers -> original key map
(``tests/ldm_checkpoint.py``); tiny models need an original yaml for what the keys cannot say (heads,
norm groups), written here in the released yamls' structure.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from jax_inversion.models import single_file
from jax_inversion.models import unet as unet_lib
from jax_inversion.models.convert import flax_params_to_state_dict
from jax_inversion.models.loading import ModelLoadError, load_pretrained, read_state_dict
from tests.ldm_checkpoint import write_checkpoint

_TINY_VAE = """
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig: {double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 16, ch_mult: [1, 2],
                   num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}
"""
# LDM does not record these: group norms (32 in LDM), text-encoder heads (64 channels each in the released models)
_TINY_EXTRAS = """
diffusers:
  unet: {norm_num_groups: 8, sample_size: 16}
  vae: {norm_num_groups: 8}
  text_encoder: {num_attention_heads: 4}
"""
# The tiny models' yamls, in the structure of v1-inference.yaml, v2-inference-v.yaml and sd_xl_base.yaml.
YAMLS = {
    "sd1": """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [1]
        num_res_blocks: 2
        channel_mult: [1, 2]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 32
        legacy: False
""" + _TINY_VAE + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
""" + _TINY_EXTRAS,
    "sd2": """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [1, 2]
        num_res_blocks: 1
        channel_mult: [1, 2, 2]
        num_head_channels: 16
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: [1, 2, 2]
        context_dim: 32
        legacy: False
""" + _TINY_VAE + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params: {freeze: True, layer: "penultimate"}
""" + _TINY_EXTRAS,
    "sdxl": """
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: 72
        num_classes: sequential
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [2]
        num_res_blocks: 1
        channel_mult: [1, 2]
        num_head_channels: 16
        use_linear_in_transformer: True
        transformer_depth: [0, 2]
        context_dim: 80
        spatial_transformer_attn_type: softmax-xformers
""" + _TINY_VAE + _TINY_EXTRAS + """  text_encoder_2: {num_attention_heads: 4}
""",
}
# What the keys say: every architecture field but the heads and norm groups.
ARCHITECTURE = {
    "unet": ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
             "cross_attention_dim", "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
             "projection_class_embeddings_input_dim"),
    "vae": ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels"),
    "text_encoder": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings",
                     "hidden_act"),
}


def _tokenizers(source: str, target: str) -> None:
    for name in ("tokenizer", "tokenizer_2"):
        if os.path.isdir(os.path.join(source, name)):
            shutil.copytree(os.path.join(source, name), os.path.join(target, name))


def _write(tmp_path, directory: str, kind: str, name: str = "model.safetensors", yaml_text=None, tokenizers=True, **kw):
    """``tmp_path/kind/name`` (+ ``model.yaml``, the tokenizer folders beside it, as an A1111 model folder)."""
    folder = tmp_path / kind
    folder.mkdir(exist_ok=True)
    path = write_checkpoint(directory, kind, str(folder / name), **kw)
    if yaml_text:
        (folder / (os.path.splitext(name)[0] + ".yaml")).write_text(yaml_text)
    if tokenizers:
        _tokenizers(directory, str(folder))
    return path


def _source(directory: str, component: str) -> dict:
    """The diffusers model's own weights, named as ours come back from ``flax_params_to_state_dict``."""
    state = read_state_dict(os.path.join(directory, component))
    if component.startswith("text_encoder"):
        state = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}
    return state


def _torch_shapes(params) -> dict:
    """PyTorch key -> PyTorch-layout shape of a Flax param tree (of arrays or ShapeDtypeStructs)."""
    from flax import traverse_util

    from jax_inversion.models.convert import flax_path_to_torch_key

    out = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        out[flax_path_to_torch_key(path)] = shape
    return out


def _assert_same(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), f"{what}: {sorted(set(ours) ^ set(theirs))[:6]}"
    for key in ours:
        np.testing.assert_array_equal(ours[key], np.asarray(theirs[key]).reshape(ours[key].shape), err_msg=f"{what} {key}")


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_weights_equal_diffusers_from_single_file(kind, request, tmp_path):
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    from diffusers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    directory = request.getfixturevalue(f"tiny_{kind}")
    path = _write(tmp_path, directory, kind, yaml_text=YAMLS[kind])
    model = load_pretrained(path)
    assert model.path == os.path.abspath(path) and model.model_index["_single_file"] == model.path
    reference = load_pretrained(directory, components=())
    assert model.prediction_type == reference.prediction_type
    assert model.unet.config.num_attention_heads == unet_lib.UNet2DConditionConfig.from_dict(
        yaml.safe_load(open(os.path.join(directory, "unet", "config.json")))).num_attention_heads

    # the heads we read from the yaml are the ones diffusers' own reading of it gives
    heads = create_unet_diffusers_config_from_ldm(yaml.safe_load(YAMLS[kind]), load_file(path))["attention_head_dim"]
    levels = len(model.unet.config.block_out_channels)
    assert (tuple(heads) if isinstance(heads, list) else (heads,) * levels) == model.unet.config.num_attention_heads

    kwargs = dict(config=directory, local_files_only=True, torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_single_file(path, subfolder="unet", **kwargs)
    vae = AutoencoderKL.from_single_file(path, subfolder="vae", **kwargs)
    pipeline_class = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipeline = pipeline_class.from_single_file(path, unet=unet, vae=vae, **kwargs)  # its text encoders
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        params = getattr(model, f"{component}_params")
        if component == "text_encoder_2" and kind != "sdxl":
            assert params is None
            continue
        ours = flax_params_to_state_dict(params)
        theirs = {k: v.numpy() for k, v in getattr(pipeline, component).state_dict().items() if not k.endswith("position_ids")}
        if component.startswith("text_encoder"):
            theirs = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in theirs.items()}
        _assert_same(ours, theirs, f"{kind} {component} vs diffusers")
        _assert_same(ours, _source(directory, component), f"{kind} {component} vs the model it was written from")


def test_ckpt_half_and_sd2_prediction_heuristic(tiny_sd2, tmp_path):
    """A .ckpt (torch.save of tensors, float16) loads through weights_only; with no LDM params in the yaml, SD2 is
    v-prediction unless global_step says 2.0-base (diffusers' heuristic); model_tokenizer gives the tokenizer."""
    only_extras = yaml.safe_load(YAMLS["sd2"])
    only_extras = {"diffusers": {**only_extras["diffusers"], "unet": {"norm_num_groups": 8, "attention_head_dim": [2, 4, 4]}}}
    path = _write(tmp_path, tiny_sd2, "sd2", "model.ckpt", yaml.safe_dump(only_extras), tokenizers=False, half=True)
    model = load_pretrained(path, components=("text_encoder",), tokenizer=tiny_sd2)
    assert model.prediction_type == "v_prediction" and model.unet is None
    ours = flax_params_to_state_dict(model.text_encoder_params)
    source = {k: v.astype(np.float16).astype(np.float32) for k, v in _source(tiny_sd2, "text_encoder").items()}
    _assert_same(ours, source, "float16 .ckpt")

    base = _write(tmp_path, tiny_sd2, "sd2", "base.ckpt", yaml.safe_dump(only_extras), tokenizers=False, global_step=875000)
    model = load_pretrained(base, components=(), tokenizer=tiny_sd2)
    assert model.prediction_type == "epsilon" and model.unet is None


def test_architecture_from_keys_alone(tiny_sdxl, tiny_sd2, tmp_path, monkeypatch):
    """Without a yaml's LDM part the architecture comes from the keys: the configs' shape fields are the diffusers
    model's, and a shapes-only load (header only, no weight read) gives its parameter shapes."""
    extras = yaml.safe_load(YAMLS["sdxl"])["diffusers"]
    extras["unet"] = {"norm_num_groups": 8, "attention_head_dim": [2, 4]}
    path = _write(tmp_path, tiny_sdxl, "sdxl", yaml_text=yaml.safe_dump({"diffusers": extras}))
    checkpoint = single_file.read_single_file(path)
    assert checkpoint.kind == "sdxl" and checkpoint.scheduler_config["prediction_type"] == "epsilon"
    assert checkpoint.configs["vae"]["scaling_factor"] == 0.13025 and checkpoint.configs["unet"]["sample_size"] == 512
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected = yaml.safe_load(open(os.path.join(tiny_sdxl, component, "config.json")))
        fields = ARCHITECTURE["text_encoder" if component.startswith("text") else component]
        assert {f: checkpoint.configs[component].get(f) for f in fields} == {
            f: list(v) if isinstance(v, tuple) else v for f, v in ((f, expected.get(f)) for f in fields)}, component
    assert checkpoint.configs["text_encoder_2"]["projection_dim"] == 24
    with pytest.raises(ModelLoadError, match="one tokenizer folder but an SDXL checkpoint needs two"):
        single_file.read_single_file(path, tokenizer=os.path.join(tiny_sdxl, "tokenizer"))
    assert checkpoint.configs["unet"]["transformer_layers_per_block"][-1] == 2

    monkeypatch.setattr(single_file.SingleFile, "state_dict", lambda *a: pytest.fail("shapes_only read weights"))
    shapes = load_pretrained(path, shapes_only=True)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours = _torch_shapes(getattr(shapes, f"{component}_params"))
        assert ours == {k: v.shape for k, v in _source(tiny_sdxl, component).items()}, component

    # no yaml at all: the 64-channels-per-head rule cannot give heads for the tiny widths, and says so
    (tmp_path / "bare").mkdir()
    bare = _write(tmp_path / "bare", tiny_sd2, "sd2")
    with pytest.raises(ModelLoadError, match=r"cannot infer the attention heads .*model\.yaml") as error:
        single_file.read_single_file(bare)
    assert "\n" not in str(error.value)


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def test_bad_files_are_one_line_errors(tiny_sd1, tmp_path, monkeypatch):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Evil()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ModelLoadError, match="cannot read .* safely .* convert it to safetensors") as error:
        load_pretrained(str(tmp_path / "pickled.ckpt"))
    _one_line(error)
    assert not (tmp_path / "pwned").exists()

    for name in ("garbage.safetensors", "garbage.ckpt"):
        (tmp_path / name).write_bytes(os.urandom(4096))
        with pytest.raises(ModelLoadError, match="cannot read") as error:
            load_pretrained(str(tmp_path / name))
        _one_line(error)

    save_file({"emb_params": np.zeros((1, 768), np.float32)}, str(tmp_path / "embedding.safetensors"))
    with pytest.raises(ModelLoadError, match="not an SD1/SD2/SDXL checkpoint: .*embedding") as error:
        load_pretrained(str(tmp_path / "embedding.safetensors"))
    _one_line(error)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pretrained(str(tmp_path / "missing.safetensors"))

    # a UNet without its text encoder; then a whole file without any tokenizer to go with it
    path = _write(tmp_path, tiny_sd1, "sd1", yaml_text=YAMLS["sd1"], tokenizers=False)
    state = load_file(path)
    save_file({k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}, str(tmp_path / "unet_only.safetensors"))
    with pytest.raises(ModelLoadError, match="no text encoder") as error:
        load_pretrained(str(tmp_path / "unet_only.safetensors"))
    _one_line(error)
    (tmp_path / "sd1" / "model.yaml").write_text(YAMLS["sd2"])
    with pytest.raises(ModelLoadError, match=r"model_channels x channel_mult \[32, 64, 64\] but .* has \[32, 64\]: the yaml belongs"):
        load_pretrained(path)
    (tmp_path / "sd1" / "model.yaml").write_text(YAMLS["sd1"])
    monkeypatch.setattr(single_file, "_cached_tokenizer", lambda repo, subfolder: None)  # whatever this machine's cache holds
    with pytest.raises(ModelLoadError, match="holds no tokenizer .*--config.model_tokenizer=DIR.* openai/clip-vit-large-patch14") as error:
        load_pretrained(path)
    _one_line(error)


def test_cli_refuses_a_bad_model_file_in_one_line(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint at all")
    save_file({"<cat>": np.zeros((1, 32), np.float32)}, str(tmp_path / "cat.safetensors"))
    result = subprocess.run(
        [sys.executable, "-m", "jax_inversion.cli", "sample", f"--model={tmp_path / 'model.safetensors'}",
         f"--embedding={tmp_path / 'cat.safetensors'}", "--prompt=a <cat>", f"--out={tmp_path / 'out.png'}"],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sample: cannot read") and "model.safetensors" in last, result.stderr[-1500:]


def test_bfloat16_tensors_widen_exactly(tmp_path):
    """numpy has no bfloat16: such tensors are read as raw bits and widened to float32, as torch's .float() does."""
    import torch
    from safetensors.torch import save_file as save_torch

    value = torch.randn(3, 5).to(torch.bfloat16)
    save_torch({"a": value, "b": value.half()}, str(tmp_path / "mixed.safetensors"))
    tensors = single_file.open_tensors(str(tmp_path / "mixed.safetensors"))
    assert tensors.shapes == {"a": (3, 5), "b": (3, 5)}
    np.testing.assert_array_equal(tensors.get("a"), value.float().numpy())
    assert tensors.get("a").dtype == np.float32 and tensors.get("b").dtype == np.float32
