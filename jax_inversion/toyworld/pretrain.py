"""Pretrains the toy world's text-to-image model with our own models and schedule.

Stage 1 trains a small AutoencoderKL on the world's scenes; the latents of every scene are
then encoded once and cached, and the latent scaling factor set to 1 / their std (as SD
did). Stage 2 trains the CLIP text encoder and the UNet end to end on (latent, caption)
pairs with the epsilon objective of :mod:`jax_inversion.diffusion.schedule`, dropping 10% of the
captions so classifier-free guidance works, and keeps an EMA of the weights. The result
is a diffusers-format directory (PyTorch diffusers loads it too). Stage 3 trains the
world's detector (:mod:`jax_inversion.toyworld.detector`) used by the evaluation.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jax_inversion.diffusion.schedule import NoiseSchedule, add_noise, min_snr_weights, sample_timesteps
from jax_inversion.models import clip, unet as unet_lib, vae as vae_lib
from jax_inversion.models.loading import load_pretrained
from jax_inversion.models.tiny import TINY_SCHEDULER, tiny_text_config, write_component, write_scheduler_and_index
from jax_inversion.models.tokenizer_files import write_clip_tokenizer
from jax_inversion.toyworld import ToyWorldError, detector, world

MAX_LENGTH = 24  # tokens per prompt: the world's longest caption is 14 with BOS/EOS
TOY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": world.SIZE,
    "scaling_factor": 1.0,  # replaced by 1 / std of the trained VAE's latents
}
TOY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": world.SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": [2, 4],  # heads per block (diffusers' legacy name)
    "cross_attention_dim": 64,
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
TOY_SCHEDULER = dict(TINY_SCHEDULER)


def toy_text_config(vocab_size: int, bos: int, eos: int) -> dict:
    return tiny_text_config(vocab_size, bos, eos, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            max_position_embeddings=MAX_LENGTH, projection_dim=64)


WORLDS = ("seen", "unnamed")


def pretraining_words(world_name: str = "seen") -> tuple[str, ...]:
    """The tokenizer's whole words: the seen vocabulary (+ "shape" in the unnamed world); the other words (star, checkered, melting) stay byte pieces."""
    return ("a", "and") + world.SEEN.words + (world.UNNAMED_WORDS if world_name == "unnamed" else ())


def pretraining_scenes(config) -> list:
    """``config.num_scenes`` scenes of ``config.world`` (checked by :func:`pretrain`): the seen world, or the one with unnamed stars and checkers."""
    if config.world == "unnamed":
        return world.unnamed_scenes(config.seed, config.num_scenes, config.unnamed_rate, config.generic_rate)
    return world.scenes(config.seed, config.num_scenes, world.SEEN)


def carry_token_rows(table: np.ndarray, old_vocab: dict, new_vocab: dict) -> np.ndarray:
    """The embedding table of a grown tokenizer: each token the old one had keeps its row.

    A new whole word starts at the mean row of the seen shape words (the new words are
    generic shape words); other new pieces (parts of a word no caption uses alone) at the
    mean of every row.
    """
    shape_rows = [old_vocab[s + "</w>"] for s in world.SEEN.shapes if s + "</w>" in old_vocab]
    shape_mean = table[shape_rows].mean(0) if shape_rows else table.mean(0)
    out = np.empty((len(new_vocab), table.shape[1]), table.dtype)
    for token, index in new_vocab.items():
        if token in old_vocab:
            out[index] = table[old_vocab[token]]
        else:
            out[index] = shape_mean if token.endswith("</w>") else table.mean(0)
    return out


def _images_to_unit(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 127.5 - 1.0


def train_vae(config, images: np.ndarray, log: Callable) -> tuple[vae_lib.AutoencoderKL, dict]:
    """L1 + L2 reconstruction of the posterior sample plus a small KL term.

    Trained on random ``config.vae.crop`` crops (the VAE is convolutional; a quarter of the
    pixels per example at 32 of 64), then used on whole images.
    """
    module = vae_lib.AutoencoderKL(vae_lib.AutoencoderKLConfig.from_dict(TOY_VAE))
    rng = jax.random.PRNGKey(config.seed)
    params = jax.jit(module.init)(rng, jnp.zeros((1, world.SIZE, world.SIZE, 3)))["params"]  # one compile, not one per op
    schedule = optax.cosine_decay_schedule(config.vae.learning_rate, config.vae.steps, alpha=0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = jax.jit(optimizer.init)(params)
    data = jnp.asarray(images)

    def loss_fn(params, x, rng):
        mean, logvar = module.apply({"params": params}, x, method="encode")
        z = vae_lib.latent_dist_sample(mean, logvar, rng)
        recon = module.apply({"params": params}, z, method="decode")
        kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        l1 = jnp.mean(jnp.abs(recon - x))
        return l1 + jnp.mean((recon - x) ** 2) + config.vae.kl_weight * kl, {"l1": l1, "kl": kl}

    crop, stride = config.vae.crop, 2 ** (len(TOY_VAE["block_out_channels"]) - 1)
    positions = (world.SIZE - crop) // stride + 1

    def random_crop(image, rng):  # at multiples of the VAE's stride, as the whole image is seen
        y, x = jax.random.randint(rng, (2,), 0, positions) * stride
        return jax.lax.dynamic_slice(image, (y, x, 0), (crop, crop, 3))

    @jax.jit
    def step(params, opt_state, rng):
        rng_index, rng_crop, rng_sample = jax.random.split(rng, 3)
        index = jax.random.randint(rng_index, (config.vae.batch_size,), 0, data.shape[0])
        batch = jax.vmap(random_crop)(data[index], jax.random.split(rng_crop, config.vae.batch_size))
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, _images_to_unit(batch), rng_sample)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, dict(aux, loss=loss)

    for i in range(config.vae.steps):
        params, opt_state, metrics = step(params, opt_state, jax.random.fold_in(rng, i))
        if (i + 1) % config.log_every == 0 or i + 1 == config.vae.steps:
            log("vae", i + 1, metrics)
    return module, params


def encode_all(module: vae_lib.AutoencoderKL, params, images: np.ndarray, chunk: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and std of every image, ``[N, h, w, 4]`` each."""
    encode = jax.jit(lambda x: module.apply({"params": params}, _images_to_unit(x), method="encode"))
    means, stds = [], []
    for start in range(0, len(images), chunk):
        mean, logvar = encode(jnp.asarray(images[start:start + chunk]))
        means.append(np.asarray(mean))
        stds.append(np.asarray(jnp.exp(0.5 * logvar)))
    return np.concatenate(means), np.concatenate(stds)


def train_text_to_image(config, tokenizer, input_ids: np.ndarray, latent_mean: np.ndarray, latent_std: np.ndarray,
                        scaling_factor: float, log: Callable, init_params: Optional[dict] = None,
                        save: Optional[Callable] = None):
    """Text encoder + UNet, end to end, from ``init_params`` or from scratch; returns the EMA of their params.

    The epsilon loss is Min-SNR-gamma weighted (``config.diffusion.min_snr_gamma``; 0 turns it
    off), which moves the effort from nearly clean timesteps to the noisy ones where layout and
    shape are decided. ``save(text_config, ema, step)`` runs every ``config.diffusion.save_every`` steps.
    """
    text_config = toy_text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    text_encoder = clip.CLIPTextTransformer(clip.CLIPTextConfig.from_dict(text_config))
    unet = unet_lib.UNet2DConditionModel(unet_lib.UNet2DConditionConfig.from_dict(TOY_UNET))
    rng_text, rng_unet, rng = jax.random.split(jax.random.PRNGKey(config.seed + 1), 3)
    side = TOY_UNET["sample_size"]
    params = init_params or {
        "text_encoder": jax.jit(text_encoder.init)(rng_text, jnp.zeros((1, MAX_LENGTH), jnp.int32))["params"],
        "unet": jax.jit(unet.init)(rng_unet, jnp.zeros((1, side, side, 4)), jnp.zeros((1,)),
                                   jnp.zeros((1, MAX_LENGTH, TOY_UNET["cross_attention_dim"])))["params"],
    }
    if init_params:
        rng = jax.random.fold_in(rng, 1)  # a continuation draws fresh batches and noise
    cfg = config.diffusion
    warmup = min(cfg.warmup_steps, cfg.steps // 10)
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, cfg.steps, end_value=0.1 * cfg.learning_rate)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=1e-2))
    opt_state = jax.jit(optimizer.init)(params)
    schedule = NoiseSchedule.from_config(TOY_SCHEDULER)
    ids_all, mean_all, std_all = jnp.asarray(input_ids), jnp.asarray(latent_mean), jnp.asarray(latent_std)
    empty = jnp.asarray(tokenizer([""], padding="max_length", max_length=MAX_LENGTH).input_ids[0], jnp.int32)
    eos_id = tokenizer.eos_token_id

    def loss_fn(params, ids, latents, rng):
        rng_noise, rng_time = jax.random.split(rng)
        eos = jnp.argmax(ids == eos_id, axis=-1)
        states = text_encoder.apply({"params": params["text_encoder"]}, ids, eos_positions=eos).last_hidden_state
        noise = jax.random.normal(rng_noise, latents.shape)
        timesteps = sample_timesteps(rng_time, latents.shape[0], schedule)
        noisy = add_noise(schedule, latents, noise, timesteps)
        prediction = unet.apply({"params": params["unet"]}, noisy, timesteps, states)
        per_example = jnp.mean((prediction - noise) ** 2, axis=(1, 2, 3))
        return jnp.mean(per_example * min_snr_weights(schedule, timesteps, cfg.min_snr_gamma))

    @jax.jit
    def step(params, ema, opt_state, index_step, rng):
        rng_index, rng_drop, rng_latent, rng_loss = jax.random.split(rng, 4)
        index = jax.random.randint(rng_index, (cfg.batch_size,), 0, ids_all.shape[0])
        drop = jax.random.uniform(rng_drop, (cfg.batch_size, 1)) < cfg.caption_dropout
        ids = jnp.where(drop, empty[None], ids_all[index])
        latents = scaling_factor * (mean_all[index] + std_all[index] * jax.random.normal(rng_latent, mean_all[index].shape))
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, latents, rng_loss)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = jnp.minimum(cfg.ema_decay, (1.0 + index_step) / (10.0 + index_step))
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        return params, ema, opt_state, {"loss": loss}

    ema = params
    for i in range(cfg.steps):
        params, ema, opt_state, metrics = step(params, ema, opt_state, i, jax.random.fold_in(rng, i))
        if (i + 1) % config.log_every == 0 or i + 1 == cfg.steps:
            log("diffusion", i + 1, metrics)
        if save and cfg.save_every and (i + 1) % cfg.save_every == 0 and i + 1 < cfg.steps:
            log("saved", i + 1, {"path": save(text_config, ema, i + 1)})
    return text_config, ema


def write_model(directory: str, text_config: dict, params: dict, vae_config: dict, vae_params) -> str:
    """Completes the diffusers directory beside its tokenizer: text_encoder, unet, vae, scheduler, model_index.json."""
    write_component(os.path.join(directory, "text_encoder"), text_config, params["text_encoder"], "model.safetensors")
    write_component(os.path.join(directory, "unet"), TOY_UNET, params["unet"], "diffusion_pytorch_model.safetensors")
    write_component(os.path.join(directory, "vae"), vae_config, vae_params, "diffusion_pytorch_model.safetensors")
    write_scheduler_and_index(directory, TOY_SCHEDULER)
    return directory


def pretrain(config: ml_collections.ConfigDict, workdir: str, log: Callable = None) -> dict:
    """Runs ``config.stages``; writes ``workdir/model`` (diffusers) and ``workdir/detector``."""
    stages = [s.strip() for s in config.stages.split(",") if s.strip()]
    unknown = set(stages) - {"model", "detector"}
    if unknown or not stages:
        raise ToyWorldError(f"unknown pretraining stages {sorted(unknown) or stages}: set --config.stages to model, detector or model,detector")
    if "model" in stages and config.world not in WORLDS:
        raise ToyWorldError(f"unknown world {config.world!r}: set --config.world to one of {', '.join(WORLDS)}")
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, "pretrain_log.jsonl")
    started = time.time()

    def default_log(stage, step, metrics):
        record = {"stage": stage, "step": step, "seconds": round(time.time() - started, 1)}
        record.update({k: v if isinstance(v, str) else float(v) for k, v in metrics.items()})
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    log = log or default_log
    out = {}
    if "model" in stages:
        out["model"] = pretrain_model(config, os.path.join(workdir, "model"), log)
    if "detector" in stages:
        out["detector"] = detector.train_detector(config, os.path.join(workdir, "detector"), log)
    log("done", 0, {"minutes": (time.time() - started) / 60})
    return out


def pretrain_model(config: ml_collections.ConfigDict, model_dir: str, log: Callable) -> str:
    """The VAE on the seen world's scenes, then the text encoder + UNet on their cached latents."""
    from transformers import CLIPTokenizer

    scene_list = pretraining_scenes(config)
    images, _ = world.render_all(scene_list, seed=config.seed)
    log("data", 0, {"scenes": len(scene_list)})
    words = pretraining_words(config.world)

    init_params = None
    if config.init_from:  # continue a model this command wrote: its VAE as it is, text encoder + UNet trained on
        base = load_pretrained(config.init_from)
        vae_module, vae_params = base.vae, base.vae_params
        init_params = {"text_encoder": base.text_encoder_params, "unet": base.unet_params}
        vae_config = dict(TOY_VAE, scaling_factor=base.vae.config.scaling_factor)
        latent_mean, latent_std = encode_all(vae_module, vae_params, images)
    else:
        vae_module, vae_params = train_vae(config, images, log)
        latent_mean, latent_std = encode_all(vae_module, vae_params, images)
        vae_config = dict(TOY_VAE, scaling_factor=round(float(1.0 / np.std(latent_mean)), 5))
    log("latents", 0, {"scaling_factor": vae_config["scaling_factor"]})

    write_clip_tokenizer(os.path.join(model_dir, "tokenizer"), words, model_max_length=MAX_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    if init_params is not None and len(tokenizer) != base.text_encoder.config.vocab_size:  # new caption words: grow the table
        embeddings = init_params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]
        embeddings["embedding"] = jnp.asarray(carry_token_rows(np.asarray(embeddings["embedding"]), base.tokenizer.get_vocab(), tokenizer.get_vocab()))
    input_ids = np.asarray(
        tokenizer([s.caption for s in scene_list], padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids,
        np.int32,
    )

    def save(text_config, params, step=None):
        """The final model, or a whole model of its own under ``snapshots/step_N`` (a run stopped mid-write keeps the earlier ones)."""
        directory = model_dir
        if step is not None:
            directory = os.path.join(os.path.dirname(model_dir), "snapshots", f"step_{step}")
            write_clip_tokenizer(os.path.join(directory, "tokenizer"), words, model_max_length=MAX_LENGTH)
        return write_model(directory, text_config, params, vae_config, vae_params)

    text_config, params = train_text_to_image(
        config, tokenizer, input_ids, latent_mean, latent_std, vae_config["scaling_factor"], log, init_params, save
    )
    return save(text_config, params)
