"""Our Flax models vs the PyTorch reference (diffusers / transformers) on one checkpoint.

Torch, diffusers and transformers' PyTorch models are imported here only: they are test
and verification dependencies, never runtime ones.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_inversion.models import single_file
from jax_inversion.models.loading import load_pretrained, read_json


@dataclasses.dataclass
class ParityResult:
    component: str
    output: str
    max_abs_diff: float
    max_abs_reference: float


def _text_ids(tokenizer, batch: int, rng: np.random.Generator, length: int) -> np.ndarray:
    """Random prompts of random length: BOS, random tokens, EOS, padding."""
    vocab = min(len(tokenizer), tokenizer.eos_token_id)
    ids = np.full((batch, length), tokenizer.pad_token_id, dtype=np.int64)
    for b in range(batch):
        n = int(rng.integers(1, length - 2))
        ids[b, 0] = tokenizer.bos_token_id
        ids[b, 1 : n + 1] = rng.integers(0, vocab, n)
        ids[b, n + 1] = tokenizer.eos_token_id
    return ids


def _torch_load(cls, directory: str):
    """PyTorch reference in fp32; a checkpoint PyTorch cannot fully load is an error, not a warning."""
    import torch

    model, info = cls.from_pretrained(directory, torch_dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"PyTorch {cls.__name__} could not load {directory} exactly: {problems}")
    return model.eval()


def _torch_single_file(path: str, model_tokenizer: str):
    """The PyTorch reference of a single-file checkpoint: diffusers' ``from_single_file``, offline, with a local
    ``config=`` folder written from our own reading of the file (configs and tokenizers, no weights)."""
    import tempfile

    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    checkpoint = single_file.read_single_file(path, tokenizer=model_tokenizer)
    cls = StableDiffusionXLPipeline if checkpoint.kind == "sdxl" else StableDiffusionPipeline
    with tempfile.TemporaryDirectory(prefix="jax_inversion_single_file_config_") as config:
        checkpoint.write_diffusers_configs(config)
        return cls.from_single_file(path, config=config, local_files_only=True, torch_dtype=torch.float32)


def check_parity(path: str, *, latent_size: Optional[int] = None, batch: int = 2, seed: int = 0,
                 model_tokenizer: str = "") -> list[ParityResult]:
    """Runs identical random inputs through UNet, text encoder(s) and VAE in both stacks.

    A single-file checkpoint's PyTorch side is diffusers' ``from_single_file`` (its own key conversion)."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel as TorchUNet
    import transformers
    from diffusers.utils import logging as diffusers_logging

    torch.set_grad_enabled(False)
    diffusers_logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    model = load_pretrained(path, dtype=jnp.float32, tokenizer=model_tokenizer)
    if single_file.is_single_file(path):
        pipeline = _torch_single_file(path, model_tokenizer)
        torch_model = lambda name, class_of: getattr(pipeline, name).eval()  # noqa: E731
    else:
        torch_model = lambda name, class_of: _torch_load(class_of(name), os.path.join(model.path, name))  # noqa: E731
    rng = np.random.default_rng(seed)
    results: list[ParityResult] = []

    def record(component, output, ours, reference):
        ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
        results.append(ParityResult(component, output, float(np.abs(ours - reference).max()), float(np.abs(reference).max())))

    def text_class(name):
        architectures = read_json(os.path.join(model.path, name, "config.json")).get("architectures") or ["CLIPTextModel"]
        return getattr(transformers, architectures[0])

    for name, module, params, tokenizer in (
        ("text_encoder", model.text_encoder, model.text_encoder_params, model.tokenizer),
        ("text_encoder_2", model.text_encoder_2, model.text_encoder_2_params, model.tokenizer_2 or model.tokenizer),
    ):
        if module is None:
            continue
        reference = torch_model(name, text_class)
        ids = _text_ids(tokenizer, batch, rng, module.config.max_position_embeddings)
        ref = reference(torch.from_numpy(ids), output_hidden_states=True)
        ours = jax.jit(module.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
        record(name, "last_hidden_state", ours.last_hidden_state, ref.last_hidden_state.numpy())
        record(name, "penultimate_hidden_state", ours.hidden_states[-2], ref.hidden_states[-2].numpy())
        if ours.text_embeds is not None and hasattr(ref, "text_embeds"):
            record(name, "text_embeds", ours.text_embeds, ref.text_embeds.numpy())

    size = latent_size or min(model.unet.config.sample_size, 32)
    _unet_parity(model, torch_model("unet", lambda _: TorchUNet), size, batch, rng, record)
    _vae_parity(model, torch_model("vae", lambda _: TorchVAE), size, batch, rng, record)
    return results


def _unet_parity(model, reference, size: int, batch: int, rng, record) -> None:
    """Ours vs the PyTorch UNet on the same random latents, timesteps and text states (and SDXL's added inputs)."""
    import torch

    unet_config = model.unet.config
    latents = rng.standard_normal((batch, unet_config.in_channels, size, size)).astype(np.float32)
    timesteps = rng.integers(0, 1000, batch)
    states = rng.standard_normal((batch, 77, unet_config.cross_attention_dim[0])).astype(np.float32)
    added = None
    if unet_config.addition_embed_type == "text_time":
        text_dim = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
        added = {
            "text_embeds": rng.standard_normal((batch, text_dim)).astype(np.float32),
            "time_ids": np.tile(np.array([[size * 8, size * 8, 0, 0, size * 8, size * 8]], np.float32), (batch, 1)),
        }
    ref = reference(
        torch.from_numpy(latents),
        torch.from_numpy(timesteps),
        torch.from_numpy(states),
        added_cond_kwargs=None if added is None else {k: torch.from_numpy(v) for k, v in added.items()},
    ).sample.numpy()
    ours = jax.jit(model.unet.apply)(
        {"params": model.unet_params},
        jnp.asarray(latents.transpose(0, 2, 3, 1)),
        jnp.asarray(timesteps),
        jnp.asarray(states),
        None if added is None else {k: jnp.asarray(v) for k, v in added.items()},
    )
    record("unet", "noise_prediction", np.asarray(ours).transpose(0, 3, 1, 2), ref)


def _vae_parity(model, reference, size: int, batch: int, rng, record) -> None:
    """Ours vs the PyTorch VAE: the latent mean of the same images, and the decode of PyTorch's mean."""
    import torch

    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    images = rng.uniform(-1, 1, (batch, 3, size * factor, size * factor)).astype(np.float32)
    mean_ref = reference.encode(torch.from_numpy(images)).latent_dist.mean
    decoded_ref = reference.decode(mean_ref).sample.numpy()
    encode = jax.jit(lambda p, x: model.vae.apply(p, x, method="encode"))
    decode = jax.jit(lambda p, z: model.vae.apply(p, z, method="decode"))
    mean, _ = encode({"params": model.vae_params}, jnp.asarray(images.transpose(0, 2, 3, 1)))
    decoded = decode({"params": model.vae_params}, jnp.asarray(mean_ref.numpy().transpose(0, 2, 3, 1)))
    record("vae", "latent_mean", np.asarray(mean).transpose(0, 3, 1, 2), mean_ref.numpy())
    record("vae", "decoded_image", np.asarray(decoded).transpose(0, 3, 1, 2), decoded_ref)
