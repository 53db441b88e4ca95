"""The textual-inversion training job: one jit-compiled step, data parallel, resumable.

``train(config, workdir)`` loads the frozen model, caches VAE latents once, then runs
``step(state, batch, rng) -> (state, metrics)`` over a ``data`` mesh axis (batch sharded,
learned rows replicated, gradients averaged by the global-batch mean), with Orbax
checkpoints every N steps and on SIGTERM. The loop knows no method by name: the
objective is built from ``config.loss`` weights.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_inversion import checkpoints, data as data_lib, tokens as tokens_lib
from jax_inversion.extended import stage_of
from jax_inversion.loading import Pretrained, load_pretrained
from jax_inversion.models.unet import Conditioning, collect_attention_maps, cross_attention_layers
from jax_inversion.phases import ConceptSpec, Phase, RunPlan, plan_run, read_concept_list
from jax_inversion.models.clip import CLIPTextTransformer
from jax_inversion.models.vae import scale_latents
from jax_inversion.objectives import TermSetup, build_objective
from jax_inversion.schedule import NoiseSchedule, add_noise, min_snr_weights, sample_timesteps, training_target

log = logging.getLogger("jax_inversion")


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and nothing frozen)."""

    step: jax.Array
    embeddings: Any  # {encoder name: [n_tokens, d]} float32, the learned rows
    opt_state: Any
    rng: jax.Array  # the run's base key; step k uses fold_in(rng, k)
    nonfinite_steps: jax.Array  # steps skipped because loss or grads were NaN/inf


# ----------------------------------------------------------------------------- setup


def make_mesh(devices: Optional[list] = None) -> jax.sharding.Mesh:
    """All devices of all hosts (or the given ones) on one ``data`` axis."""
    devices = devices or jax.devices()
    return jax.sharding.Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def clip_per_concept(max_norm: float) -> optax.GradientTransformation:
    """``clip_by_global_norm`` applied to each concept (leading axis of every leaf) on its own."""

    def update(updates, state, params=None):
        leaves = jax.tree_util.tree_leaves(updates)
        norms = jnp.sqrt(sum(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for x in leaves))  # [C]

        def clip(x):
            norm = norms.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
            return jnp.where(norm < max_norm, x, (x / norm) * max_norm)

        return jax.tree_util.tree_map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    train_config: ml_collections.ConfigDict, global_batch: int, per_concept: bool = False
) -> optax.GradientTransformation:
    """AdamW on the learned rows, warmup then constant or cosine, optional gradient clipping
    (by global norm, or by each concept's norm when ``per_concept``: rows ``[C, ...]``)."""
    lr = train_config.learning_rate * (global_batch if train_config.scale_lr else 1)
    steps, warmup = train_config.num_steps, train_config.warmup_steps
    if train_config.lr_schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(steps, warmup + 1))
    elif train_config.lr_schedule == "constant":
        schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]) if warmup else optax.constant_schedule(lr)
    else:
        raise TrainError(f"unknown train.lr_schedule {train_config.lr_schedule!r}: use 'constant' or 'cosine'")
    clip = clip_per_concept if per_concept else optax.clip_by_global_norm
    parts = [clip(train_config.max_grad_norm)] if train_config.max_grad_norm > 0 else []
    parts.append(
        optax.adamw(
            schedule,
            b1=train_config.adam_b1,
            b2=train_config.adam_b2,
            eps=train_config.adam_eps,
            weight_decay=train_config.weight_decay,
        )
    )
    return optax.chain(*parts), schedule


def encode_latents(model: Pretrained, images: np.ndarray, chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """VAE posterior mean and std of every image, computed once (never per step)."""
    encode = jax.jit(lambda params, x: model.vae.apply({"params": params}, x, method="encode"))
    means, stds = [], []
    for start in range(0, len(images), chunk):
        mean, logvar = encode(model.vae_params, jnp.asarray(images[start : start + chunk], model.vae.dtype))
        means.append(np.asarray(mean, np.float32))
        stds.append(np.asarray(jnp.exp(0.5 * logvar), np.float32))
    return np.concatenate(means), np.concatenate(stds)


@dataclasses.dataclass
class Dataset:
    """Cached latents (index ``image + num_images * flipped``), masks likewise, prompts per encoder."""

    latent_mean: np.ndarray
    latent_std: np.ndarray
    input_ids: dict  # {encoder name: [num_prompts, L]}
    num_images: int
    resolution: int
    masks: Optional[np.ndarray] = None  # [2 * num_images or num_images, h, w] at latent resolution

    @property
    def num_prompts(self) -> int:
        return len(next(iter(self.input_ids.values())))


def encoders_of(model: Pretrained) -> dict:
    """``{encoder name: (module, tokenizer)}``: one for SD 1/2, two for SDXL."""
    encoders = {"text_encoder": (model.text_encoder, model.tokenizer)}
    if model.text_encoder_2 is not None:
        encoders["text_encoder_2"] = (model.text_encoder_2, model.tokenizer_2 or model.tokenizer)
    return encoders


def vae_factor(model: Pretrained) -> int:
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


def build_dataset(config, model: Pretrained, phase: Phase, workdir: str, with_masks: bool = False) -> Dataset:
    """Loads a phase's images (and masks) and caches their (and their flips') VAE latents on disk."""
    paths = data_lib.list_concept_images(phase.image_dir)
    factor = vae_factor(model)
    resolution = config.data.resolution or model.unet.config.sample_size * factor
    rng = np.random.default_rng([config.seed, 1])
    crops = 1 if config.data.center_crop else max(1, config.data.random_crops_per_image)
    images, masks = [], []
    box = None
    if with_masks and not phase.mask_dir:
        check_phase_data(config, phase, with_masks)  # without a box: the one-line "needs masks" error
        box = data_lib.box_mask(config.data.box, resolution)
    for path in paths:
        mask_path = data_lib.find_mask(phase.mask_dir, path) if with_masks and phase.mask_dir else None
        for _ in range(crops):
            crop_rng = copy.deepcopy(rng)  # the mask is cropped where the image is
            images.append(data_lib.load_image(path, resolution, center_crop=config.data.center_crop, rng=rng))
            if mask_path:
                masks.append(data_lib.load_mask(mask_path, resolution, center_crop=config.data.center_crop, rng=crop_rng))
            elif box is not None:
                masks.append(box)
    images = np.stack(images)
    mask_array = data_lib.downsample_mask(np.stack(masks), factor) if masks else None
    if config.data.flip_probability > 0:
        images = np.concatenate([images, images[:, :, ::-1]])
        if mask_array is not None:
            mask_array = np.concatenate([mask_array, mask_array[:, :, ::-1]])
    key = hashlib.sha256()
    key.update(json.dumps([model.path, resolution, config.data.center_crop, crops, config.seed, str(model.vae.dtype)]).encode())
    key.update(images.tobytes())
    for name in ("encoder", "quant_conv"):  # the weights that make latents: a model retrained in place misses the cache
        for leaf in jax.tree.leaves(model.vae_params[name]):
            key.update(np.asarray(leaf).tobytes())
    cache = os.path.join(workdir, "latents", key.hexdigest()[:16] + ".npz")
    if os.path.exists(cache):
        with np.load(cache) as f:
            mean, std = f["mean"], f["std"]
    else:
        mean, std = encode_latents(model, images)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{jax.process_index()}.{os.getpid()}.tmp.npz"  # processes sharing a workdir each write their own
        np.savez(tmp, mean=mean, std=std)
        os.replace(tmp, cache)
    templates = data_lib.templates_for(config.data.learnable_property, config.data.templates)
    prompts = [t.format(phase.prompt_text) for t in templates]
    input_ids = {name: data_lib.tokenize_prompts(tok, prompts) for name, (_, tok) in encoders_of(model).items()}
    return Dataset(mean, std, input_ids, num_images=len(paths) * crops, resolution=resolution, masks=mask_array)


# ----------------------------------------------------------------------------- the step


def prompt_embeddings(text_encoder: CLIPTextTransformer, params, ids: jax.Array, learned: jax.Array, first_id: int):
    """Input embeddings of tokenized prompts: frozen lookups, and the same with learned rows substituted."""
    token_embeds = text_encoder.apply({"params": params}, tokens_lib.safe_ids(ids, first_id), method="embed_tokens")
    return token_embeds, tokens_lib.substitute(token_embeds, ids, learned, first_id)


def encode_prompts(
    text_encoder: CLIPTextTransformer, params, ids: jax.Array, learned: jax.Array, first_id: int, eos_token_id=None
):
    """Text encoder outputs with the learned rows (``[n, d]`` or per example ``[B, n, d]``) at the placeholder ids.

    The pooled output is taken at the first ``eos_token_id`` (placeholder ids are larger than
    EOS, so transformers' legacy argmax rule would pick them).
    """
    _, embeds = prompt_embeddings(text_encoder, params, ids, learned, first_id)
    eos = None if eos_token_id is None else jnp.argmax(ids == eos_token_id, axis=-1)
    return text_encoder.apply({"params": params}, inputs_embeds=embeds, eos_positions=eos)


def _encode(model: Pretrained, frozen: dict, input_ids: dict, learned: dict, layouts: dict, resolution: int):
    """UNet encoder states, SDXL's added embedding, and each encoder's input embeddings."""
    encoders = encoders_of(model)
    outputs, token_embeds, prompt_embeds = {}, {}, {}
    for name, (module, tok) in encoders.items():
        first_id = layouts[name].first_id
        token_embeds[name], prompt_embeds[name] = prompt_embeddings(module, frozen[name], input_ids[name], learned[name], first_id)
        eos = jnp.argmax(input_ids[name] == tok.eos_token_id, axis=-1)
        outputs[name] = module.apply({"params": frozen[name]}, inputs_embeds=prompt_embeds[name], eos_positions=eos)
    if len(encoders) == 1:
        return outputs["text_encoder"].last_hidden_state, None, token_embeds, prompt_embeds
    states = jnp.concatenate([outputs[name].hidden_states[-2] for name in encoders], axis=-1)
    batch = states.shape[0]
    time_ids = jnp.tile(jnp.asarray([[resolution, resolution, 0, 0, resolution, resolution]], jnp.float32), (batch, 1))
    added = {"text_embeds": outputs["text_encoder_2"].text_embeds, "time_ids": time_ids}
    return states, added, token_embeds, prompt_embeds


def text_conditioning(model: Pretrained, frozen: dict, input_ids: dict, learned: dict, layouts: dict, resolution: int):
    """UNet encoder states (and SDXL's added text/time embedding) for tokenized prompts.

    SD 1/2: the last hidden state. SDXL: both encoders' penultimate states concatenated, the
    second encoder's projected pooled output and (size, crop, size) time ids, as diffusers does.
    """
    states, added, _, _ = _encode(model, frozen, input_ids, learned, layouts, resolution)
    return states, added


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep nothing, recompute the UNet in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
}


def run_unet(model: Pretrained, params, noisy, timesteps, conditioning: Conditioning, added, remat: str = "none"):
    """The UNet's prediction and the attention maps of ``conditioning.capture_maps`` (``{}`` if none).

    ``remat`` trades compute for memory in the backward pass (see :data:`REMAT_POLICIES`).
    """
    if remat not in REMAT_POLICIES:
        raise TrainError(f"unknown train.remat {remat!r}: use one of {', '.join(REMAT_POLICIES)}")
    x = noisy.astype(model.unet.dtype)

    def apply(params, x, conditioning, added):
        if not conditioning.capture_maps:
            return model.unet.apply({"params": params}, x, timesteps, conditioning, added), {}
        prediction, variables = model.unet.apply({"params": params}, x, timesteps, conditioning, added, mutable=["attention_maps"])
        return prediction, collect_attention_maps(variables["attention_maps"])

    if REMAT_POLICIES[remat] is not None:
        apply = jax.checkpoint(apply, policy=REMAT_POLICIES[remat])
    return apply(params, x, conditioning, added)


def frozen_params(model: Pretrained) -> dict:
    """The frozen arrays a step reads: UNet and text encoder(s)."""
    frozen = {"unet": model.unet_params, "text_encoder": model.text_encoder_params}
    if model.text_encoder_2 is not None:
        frozen["text_encoder_2"] = model.text_encoder_2_params
    return frozen


def make_forward(
    model: Pretrained,
    schedule: NoiseSchedule,
    layouts: dict,
    objective,
    min_snr_gamma: float,
    resolution: int,
    trainable: Optional[tuple[int, int]] = None,
    num_stages: int = 1,
    separate_kv: bool = False,
    reference_ids: Optional[dict] = None,
    remat: str = "none",
):
    """``forward(learned, frozen, batch, rng) -> outputs``: everything the objective's terms read.

    ``trainable`` (rows ``[a, b)``) marks the positions of the tokens this phase learns. With
    ``num_stages > 1`` the learned rows are ``[S, K, n, d]`` and each example uses its
    timestep's stage; ``separate_kv`` (K = 2) feeds part 0 to keys and part 1 to values.
    ``reference_ids`` (``{encoder: class word id}``) is used when the objective needs the
    class-word prompt's attention maps.
    """
    vae_config = model.vae.config
    needs = getattr(objective, "needs", frozenset())
    capture = tuple(getattr(objective, "capture_layers", ()))
    first_id, n_tokens = layouts["text_encoder"].first_id, len(layouts["text_encoder"].tokens)
    a, b = trainable if trainable is not None else (0, n_tokens)
    eos_id = model.tokenizer.eos_token_id
    if "reference_maps" in needs and not reference_ids:
        raise TrainError("the objective compares with the class-word prompt: set --config.data.class_word")

    def draw(rng, mean, std):
        rng_latent, rng_noise, rng_time = jax.random.split(rng, 3)
        latents = scale_latents(vae_config, mean + std * jax.random.normal(rng_latent, mean.shape))
        noise = jax.random.normal(rng_noise, latents.shape)
        return latents, noise, sample_timesteps(rng_time, latents.shape[0], schedule)

    def forward(learned, frozen, batch, rng):
        """``rng``: one key, or ``[C]`` keys (one per concept; the batch is concept-major, rows ``[C, n, d]``)."""
        mean, std = batch["latent_mean"], batch["latent_std"]
        concepts = rng.shape[0] if rng.ndim == 2 else 0  # stacked uint32 keys
        if concepts:
            per_concept = lambda x: x.reshape((concepts, -1) + x.shape[1:])
            latents, noise, timesteps = jax.vmap(draw)(rng, per_concept(mean), per_concept(std))
            latents, noise, timesteps = (x.reshape((-1,) + x.shape[2:]) for x in (latents, noise, timesteps))
            index = jnp.repeat(jnp.arange(concepts), mean.shape[0] // concepts)
            learned_rows = {e: rows[index] for e, rows in learned.items()}  # [B, n, d]
        else:
            latents, noise, timesteps = draw(rng, mean, std)
            learned_rows = learned
        noisy = add_noise(schedule, latents, noise, timesteps)
        ids = batch["input_ids"]
        stages = stage_of(timesteps, num_stages, schedule.num_train_timesteps) if num_stages > 1 else None
        key_rows = {e: tokens_lib.stage_rows(rows, stages, 0) for e, rows in learned_rows.items()}
        states, added, token_embeds, prompt_embeds = _encode(model, frozen, ids, key_rows, layouts, resolution)
        value_states = None
        if separate_kv:
            value_rows = {e: tokens_lib.stage_rows(rows, stages, 1) for e, rows in learned_rows.items()}
            value_states = _encode(model, frozen, ids, value_rows, layouts, resolution)[0]
        conditioning = Conditioning(states, value_states=value_states, capture_maps=capture)
        prediction, maps = run_unet(model, frozen["unet"], noisy, timesteps, conditioning, added, remat)
        offset = ids["text_encoder"] - first_id
        positions = jnp.arange(offset.shape[-1])[None, :]
        outputs = {
            "prediction": prediction.astype(jnp.float32),
            "target": training_target(schedule, latents, noise, timesteps),
            "snr_weights": min_snr_weights(schedule, timesteps, min_snr_gamma),
            "timesteps": timesteps,
            "learned": learned,
            "token_embeds": token_embeds,
            "prompt_embeds": prompt_embeds,
            "placeholder_positions": (offset >= 0) & (offset < n_tokens),
            "trainable_positions": (offset >= a) & (offset < b),
            "prompt_positions": positions <= jnp.argmax(ids["text_encoder"] == eos_id, axis=-1)[:, None],
            "attention_maps": maps,
        }
        if "masks" in needs:
            outputs["masks"] = batch["masks"]
        if "reference_maps" in needs:
            reference = {
                e: jnp.where(v >= layouts[e].first_id, reference_ids[e], v).astype(v.dtype) for e, v in ids.items()
            }
            ref_states, ref_added, _, _ = _encode(model, frozen, reference, key_rows, layouts, resolution)
            _, ref_maps = run_unet(model, frozen["unet"], noisy, timesteps, Conditioning(ref_states, capture_maps=capture), ref_added)
            outputs["reference_maps"] = jax.lax.stop_gradient(ref_maps)
        return outputs

    return forward


def make_train_step(
    model: Pretrained,
    schedule: NoiseSchedule,
    layouts: dict,
    optimizer: optax.GradientTransformation,
    objective: Callable,
    lr_schedule: Callable,
    min_snr_gamma: float,
    mesh: jax.sharding.Mesh,
    resolution: int,
    trainable: Optional[tuple[int, int]] = None,
    num_stages: int = 1,
    separate_kv: bool = False,
    reference_ids: Optional[dict] = None,
    concepts: Optional[Sequence[tuple[str, int]]] = None,
    remat: str = "none",
):
    """Returns ``step(state, batch, rng) -> (state, metrics)``, jit-compiled over ``mesh``.

    ``concepts`` (``[(name, seed)]``, batch inversion): the learned rows are ``[C, n, d]`` and the
    batch is concept-major (``B / C`` examples each). Concept ``c`` draws its noise from
    ``fold_in(PRNGKey(seed_c), step)`` and has its own objective (summed over concepts), so its
    rows follow exactly the updates of training it alone with that seed.

    ``batch`` holds ``latent_mean``/``latent_std`` ``[B, h, w, c]``, ``input_ids``
    ``{encoder: [B, L]}`` and, when the objective needs them, ``masks`` ``[B, h, w]``, all
    sharded on ``data``; ``rng`` is the run's base key. Noise, timesteps and the latent sample
    are drawn on device from ``fold_in(rng, state.step)``, which makes the result independent
    of the device count and of interruptions. Only rows ``trainable`` change; the others stay
    bit-identical (no gradient, no weight decay). See :func:`make_forward` for the rest.
    """
    forward = make_forward(
        model, schedule, layouts, objective, min_snr_gamma, resolution, trainable, num_stages, separate_kv, reference_ids,
        remat,
    )
    n_tokens = len(layouts["text_encoder"].tokens)
    a, b = trainable if trainable is not None else (0, n_tokens)
    row_mask = jnp.asarray((np.arange(n_tokens) >= a) & (np.arange(n_tokens) < b))[:, None]

    names = [name for name, _ in concepts or ()]
    concept_keys = jnp.stack([jax.random.PRNGKey(seed) for _, seed in concepts]) if concepts else None

    def loss_fn(learned, frozen, batch, rng):
        outputs = forward(learned, frozen, batch, rng)
        if not concepts:
            return objective(outputs)
        split = {k: jax.tree_util.tree_map(lambda x: x.reshape((len(names), -1) + x.shape[1:]), v)
                 for k, v in outputs.items() if k != "learned"}
        totals, terms = jax.vmap(objective)({**split, "learned": outputs["learned"]})
        metrics = {k: v.mean() for k, v in terms.items()}
        metrics.update({f"concept/{name}": totals[i] for i, name in enumerate(names)})
        return totals.sum(), metrics

    def step(frozen, state: TrainState, batch, rng):
        if concepts:
            step_rng = jax.vmap(lambda key: jax.random.fold_in(key, state.step))(concept_keys)
        else:
            step_rng = jax.random.fold_in(rng, state.step)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.embeddings, frozen, batch, step_rng)
        grads = jax.tree_util.tree_map(lambda g: jnp.where(row_mask, g, 0.0), grads)
        all_finite = lambda tree: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))
        finite = jnp.isfinite(loss) & all_finite(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.embeddings)
        embeddings = optax.apply_updates(state.embeddings, updates)
        embeddings = jax.tree_util.tree_map(lambda new, old: jnp.where(row_mask, new, old), embeddings, state.embeddings)
        finite &= all_finite(embeddings)  # an update can overflow even from finite gradients
        keep = lambda new, old: jnp.where(finite, new, old)
        new_state = state.replace(
            step=state.step + 1,
            embeddings=jax.tree_util.tree_map(keep, embeddings, state.embeddings),
            opt_state=jax.tree_util.tree_map(keep, opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            **{(k if k.startswith("concept/") else f"loss/{k}"): v for k, v in terms.items()},
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": lr_schedule(state.step),
            "embedding_norm": jnp.linalg.norm(embeddings["text_encoder"], axis=-1).mean(),
        }
        if concepts:  # each concept's gradient norm (what its clipping sees)
            norms = jnp.sqrt(sum(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) for g in jax.tree_util.tree_leaves(grads)))
            metrics.update({f"concept/{name}/grad_norm": norms[i] for i, name in enumerate(names)})
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P("data"))
    jitted = jax.jit(
        step,
        in_shardings=(replicated, replicated, sharded, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(1,),
    )
    frozen = jax.device_put(frozen_params(model), replicated)
    return lambda state, batch, rng: jitted(frozen, state, batch, rng)


# ----------------------------------------------------------------------------- the loop


def _check_writable(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise TrainError(f"workdir {workdir} is not writable ({e.strerror}): pass a --workdir you can write to") from None


def _examples(dataset: Dataset, indices: dict, with_masks: bool) -> dict:
    rows = indices["image"] + dataset.num_images * indices["flip"]
    host = {
        "latent_mean": dataset.latent_mean[rows],
        "latent_std": dataset.latent_std[rows],
        "input_ids": {name: ids[indices["prompt"]].astype(np.int32) for name, ids in dataset.input_ids.items()},
    }
    if with_masks:
        host["masks"] = dataset.masks[rows]
    return host


def _as_global(host: dict, size: int, mesh) -> dict:
    sharding = NamedSharding(mesh, P("data"))
    return jax.tree_util.tree_map(lambda v: jax.make_array_from_process_local_data(sharding, v, (size,) + v.shape[1:]), host)


def global_batch(dataset: Dataset, sampler: data_lib.BatchSampler, step: int, mesh, with_masks: bool = False) -> dict:
    """This host's slice of the global batch (``step`` counts within the phase), as globally sharded arrays."""
    indices = sampler.indices(step)
    local = sampler.host_slice(indices, jax.process_index(), jax.process_count())
    return _as_global(_examples(dataset, local, with_masks), len(indices["image"]), mesh)


def concept_batch(datasets: Sequence[Dataset], samplers: Sequence[data_lib.BatchSampler], step: int, mesh,
                  with_masks: bool = False) -> dict:
    """Batch inversion: every concept's batch of ``step``, concept-major, this host's contiguous slice."""
    parts = [_examples(d, s.indices(step), with_masks) for d, s in zip(datasets, samplers)]
    full = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *parts)
    size = len(full["latent_mean"])
    per_host = size // jax.process_count()
    start = jax.process_index() * per_host
    return _as_global(jax.tree_util.tree_map(lambda v: v[start : start + per_host], full), size, mesh)


def run_metadata(config, layouts: dict, model: Pretrained, plan: RunPlan) -> dict:
    """What export, sampling and resume need to read back, stored with every checkpoint."""
    return {
        "model": model.path,
        "layout": layouts["text_encoder"].to_dict(),
        "layouts": {name: layout.to_dict() for name, layout in layouts.items()},
        "placeholder_token": config.data.placeholder_token,
        "num_vectors": config.data.num_vectors,
        "concepts": plan.concepts_metadata(),
        "plan": plan.to_dict(),
        "num_train_timesteps": int(model.scheduler_config.get("num_train_timesteps", 1000)),
        "embedding_dim": int(model.text_encoder.config.hidden_size),
        "embedding_dims": {name: int(module.config.hidden_size) for name, (module, _) in encoders_of(model).items()},
        "config": json.loads(config.to_json_best_effort()),
    }


def input_embedding_table(model: Pretrained, encoder: str) -> np.ndarray:
    """The frozen token-embedding table ``[V, d]`` of ``encoder`` (float32, host)."""
    params = model.text_encoder_params if encoder == "text_encoder" else model.text_encoder_2_params
    return np.asarray(params["text_model"]["embeddings"]["token_embedding"]["embedding"], np.float32)


def initial_rows(config, model: Pretrained, plan: RunPlan) -> dict:
    """``{encoder: rows}`` to start from: ``[n, d]``, or ``[S, K, n, d]`` with timestep stages / K-V parts."""
    initial = {}
    for i, (name, (_, tok)) in enumerate(encoders_of(model).items()):
        table = input_embedding_table(model, name)
        rng = np.random.default_rng([config.seed, 2, i])
        init_ids = []
        for group in plan.groups:
            word_id = tokens_lib.initializer_id(tok, group.initializer) if group.initializer else None
            init_ids += [word_id] * group.num_vectors
        initial[name] = tokens_lib.initial_embeddings(table, init_ids, rng)
    if config.init_from:
        from jax_inversion.export import initial_rows_from_file

        concept = plan.concept
        widths = {name: rows.shape[-1] for name, rows in initial.items()}
        loaded = initial_rows_from_file(config.init_from, widths, concept.num_vectors)
        for name in initial:
            initial[name][concept.start : concept.stop] = loaded[name]
    if plan.num_stages > 1 or plan.separate_kv:
        parts = 2 if plan.separate_kv else 1
        initial = {name: np.tile(rows, (plan.num_stages, parts, 1, 1)) for name, rows in initial.items()}
    return initial


def concept_config(config, concept: ConceptSpec):
    """The config of training ``concept`` alone: its seed and initializer."""
    alone = ml_collections.ConfigDict(config.to_dict())
    alone.seed = concept.seed
    alone.data.initializer_token = concept.initializer
    return alone


def concept_phase(phase: Phase, concept: ConceptSpec) -> Phase:
    """``phase`` on ``concept``'s images (and masks)."""
    return dataclasses.replace(phase, image_dir=concept.image_dir, mask_dir=concept.mask_dir)


def check_phase_data(config, phase: Phase, with_masks: bool) -> None:
    """Fails early (one line), before the workdir is touched, when a phase's images or masks are missing or unreadable."""
    paths = data_lib.list_concept_images(phase.image_dir)
    for path in paths:
        data_lib.open_image(path)
    if with_masks and phase.mask_dir:
        for path in paths:
            data_lib.open_image(data_lib.find_mask(phase.mask_dir, path))
    elif with_masks and not config.data.box:
        raise data_lib.DataError(
            f"the loss needs concept masks for the {phase.name} images: set --config.data.{'subject_' if phase.name == 'subject' else ''}mask_dir "
            "(masks named like the images) or --config.data.box='[x0, y0, x1, y1]'"
        )


def class_word_ids(config, model: Pretrained) -> Optional[dict]:
    """``{encoder: id}`` of the concept's class word (``data.class_word``, else its initializer), or None."""
    word = config.data.class_word or config.data.initializer_token
    if not word:
        return None
    return {name: tokens_lib.initializer_id(tok, word) for name, (_, tok) in encoders_of(model).items()}


def train(config: ml_collections.ConfigDict, workdir: str, devices: Optional[list] = None) -> TrainState:
    """Runs (or resumes) the job described by ``config`` in ``workdir`` over ``devices`` (default all)."""
    _check_writable(workdir)
    if config.train.num_steps < 0:
        raise TrainError("train.num_steps is negative: pass --config.train.num_steps=N with N >= 0")
    devices = devices or jax.devices()
    n_devices = len(devices)
    concepts = read_concept_list(config.concepts, config) if config.get("concepts") else None
    per_step = config.train.batch_size * (len(concepts) if concepts else 1)
    if config.train.batch_size <= 0 or per_step % n_devices:
        what = f"{len(concepts)} concepts x train.batch_size={config.train.batch_size}" if concepts else f"train.batch_size={config.train.batch_size}"
        good = n_devices // math.gcd(len(concepts) if concepts else 1, n_devices)
        raise TrainError(
            f"{what} is not a positive multiple of the {n_devices} devices: pass --config.train.batch_size={good} or a multiple of it"
        )
    from jax_inversion import default_job

    if not concepts:
        config = default_job.fill_defaults(config, workdir)
    plan = plan_run(config)
    if concepts:
        if len(plan.groups) > 1 or plan.num_stages > 1 or plan.separate_kv or config.init_from:
            raise TrainError(
                "batch inversion (config.concepts) learns plain multi-vector tokens: unset data.subject_token, "
                "data.num_stages, data.separate_kv and init_from, or train those concepts one per job"
            )
        if not config.model:
            raise TrainError("batch inversion needs a model: pass --config.model=PATH")
    dtype = jnp.dtype(config.dtype)
    model = load_pretrained(config.model, dtype=dtype)
    encoders = encoders_of(model)
    layouts = {name: tokens_lib.add_placeholder_tokens(tok, plan.tokens) for name, (_, tok) in encoders.items()}

    mesh = make_mesh(devices)
    optimizer, lr_schedule = make_optimizer(config.train, config.train.batch_size, per_concept=bool(concepts))
    if concepts:  # each concept starts where training it alone (its seed, its initializer) starts
        rows = [initial_rows(concept_config(config, c), model, plan) for c in concepts]
        embeddings = {name: jnp.asarray(np.stack([r[name] for r in rows])) for name in encoders}
    else:
        embeddings = {name: jnp.asarray(rows) for name, rows in initial_rows(config, model, plan).items()}
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        embeddings=embeddings,
        opt_state=optimizer.init(embeddings),
        rng=jax.random.PRNGKey(config.seed),
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    resolution = config.data.resolution or model.unet.config.sample_size * vae_factor(model)
    tables = {name: input_embedding_table(model, name) for name in encoders}
    setup = TermSetup(
        options=config.get("loss_options"),
        tokenizers={name: tok for name, (_, tok) in encoders.items()},
        tables=tables,
        concept_rows=(plan.concept.start, plan.concept.stop),
        initializer=config.data.initializer_token,
        class_word=config.data.class_word or config.data.initializer_token,
        attention_layers=cross_attention_layers(model.unet.config, resolution // vae_factor(model)),
    )
    objective = build_objective(dict(config.loss), setup)
    reference_ids = class_word_ids(config, model) if "reference_maps" in objective.needs else None
    with_masks = "masks" in objective.needs
    phase_data = [p for p in plan.phases if p.num_steps > 0]
    if concepts:
        phase_data = [concept_phase(plan.phases[0], c) for c in concepts]
    for phase in phase_data:  # bad data fails here, before the workdir is touched
        check_phase_data(config, phase, with_masks)
    replicated = NamedSharding(mesh, P())
    metadata = run_metadata(config, layouts, model, plan)
    if concepts:
        metadata["concept_batch"] = [{"name": c.name, "index": i, "seed": c.seed, "dir": c.image_dir} for i, c in enumerate(concepts)]
    # Replicated over the mesh before restoring, so a checkpoint is read straight into the run's
    # sharding: several processes cannot spread a restored host-local (committed) array.
    state = jax.device_put(state, replicated)
    manager = checkpoints.CheckpointManager(workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
    restored = manager.restore_latest(state, metadata)
    if restored is not None:
        state = restored
        log.info("resumed from step %d in %s", int(state.step), workdir)

    def prepare_concepts(phase: Phase):
        datasets = [build_dataset(config, model, concept_phase(phase, c), workdir, with_masks) for c in concepts]
        step_fn = make_train_step(
            model, schedule, layouts, optimizer, objective, lr_schedule, config.train.min_snr_gamma, mesh,
            datasets[0].resolution, trainable=phase.trainable, reference_ids=reference_ids,
            concepts=[(c.name, c.seed) for c in concepts], remat=config.train.remat,
        )
        samplers = [
            data_lib.BatchSampler(d.num_images, d.num_prompts, config.train.batch_size, c.seed, config.data.flip_probability)
            for d, c in zip(datasets, concepts)
        ]
        return step_fn, lambda step: concept_batch(datasets, samplers, step - phase.start, mesh, with_masks)

    def prepare_phase(phase: Phase):
        if concepts:
            return prepare_concepts(phase)
        dataset = build_dataset(config, model, phase, workdir, with_masks)
        step_fn = make_train_step(
            model, schedule, layouts, optimizer, objective, lr_schedule, config.train.min_snr_gamma, mesh,
            dataset.resolution, trainable=phase.trainable, num_stages=plan.num_stages, separate_kv=plan.separate_kv,
            reference_ids=reference_ids, remat=config.train.remat,
        )
        index = plan.phases.index(phase)
        sampler = data_lib.BatchSampler(
            dataset.num_images, dataset.num_prompts, config.train.batch_size, config.seed + 1_000_003 * index,
            config.data.flip_probability,
        )
        batch_at = lambda step: global_batch(dataset, sampler, step - phase.start, mesh, with_masks)
        return step_fn, batch_at

    def reset_optimizer(state: TrainState) -> TrainState:
        return jax.device_put(state.replace(opt_state=optimizer.init(state.embeddings)), replicated)

    validate = None
    if config.train.validation_every > 0 and config.train.validation_prompts:
        from jax_inversion.sampling import Validator

        validate = Validator(
            model, workdir, config.train.validation_prompts, config.train.validation_images,
            config.train.validation_steps, config.train.validation_scheduler, seed=config.seed,
        )
    if config.train.compilation_cache and jax.config.jax_compilation_cache_dir is None:
        # Compiled steps survive restarts (preemption, resume): XLA's persistent cache in the workdir.
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    return _loop(config, workdir, state, plan, prepare_phase, reset_optimizer, mesh, manager, metadata, validate)


def _loop(config, workdir, state, plan, prepare_phase, reset_optimizer, mesh, manager, metadata, validate=None) -> TrainState:
    """Runs the plan's phases from ``state.step``; a phase after the first starts with a fresh optimizer.

    ``validate(step, embeddings, metadata, writer)``, if given, runs every ``train.validation_every`` steps.
    """
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    is_main = jax.process_index() == 0
    writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if is_main else None
    metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a") if is_main else None
    first = int(state.step)
    total = plan.num_steps
    progress = tqdm(total=total, initial=first, disable=not is_main, desc="train", dynamic_ncols=True)
    base_rng = jax.device_put(np.asarray(state.rng), NamedSharding(mesh, P()))  # not donated with the state
    try:
        with jax.set_mesh(mesh):
            for index, phase in enumerate(plan.phases):
                if int(state.step) >= phase.stop or _agreed_stop(stop, check=False):
                    continue
                if index > 0 and int(state.step) == phase.start:
                    state = reset_optimizer(state)
                step_fn, batch_at = prepare_phase(phase)
                progress.set_description(f"train ({phase.name})" if len(plan.phases) > 1 else "train")
                state = _run_phase(config, state, phase, step_fn, batch_at, base_rng, manager, metadata, progress,
                                   writer, metrics_file, stop, validate)
            if total == first and manager.latest_step() != total:
                manager.save(total, state, metadata, force=True)
    finally:
        manager.wait()
        progress.close()
        signal.signal(signal.SIGTERM, previous)
        if writer:
            writer.close()
        if metrics_file:
            metrics_file.close()
    return state


def _agreed_stop(stop: dict, check: bool) -> bool:
    """Whether to stop (and save) now. One process: as soon as SIGTERM came (read once: it may land
    at any moment). Several: each sees the signal at its own step, but saving is collective, so
    they agree (a tiny all-gather, only at ``check`` steps, where the host syncs anyway) and all
    stop at the same step, even one that saw no signal."""
    if jax.process_count() == 1:
        return stop["signal"] is not None
    if check and not stop.get("agreed"):
        from jax.experimental import multihost_utils

        seen = multihost_utils.process_allgather(np.int32(stop["signal"] is not None))
        stop["agreed"] = bool(np.asarray(seen).any())
    return bool(stop.get("agreed"))


def _run_phase(config, state, phase, step_fn, batch_at, base_rng, manager, metadata, progress, writer, metrics_file, stop, validate):
    pending, compile_seconds = [], None
    compile_start = last_time = time.perf_counter()
    last_step = int(state.step)
    for step in range(int(state.step), phase.stop):
        state, metrics = step_fn(state, batch_at(step), base_rng)
        if compile_seconds is None:
            jax.block_until_ready(state.step)
            compile_seconds = time.perf_counter() - compile_start
            last_time, last_step = time.perf_counter(), step + 1
        pending.append((step + 1, metrics))
        done = step + 1
        stopping = _agreed_stop(stop, check=done % config.train.log_every == 0)
        must_save = done % max(1, config.train.checkpoint_every) == 0 or done == phase.stop or stopping
        if done % config.train.log_every == 0 or must_save:
            fetched = jax.device_get(pending)
            pending = []
            now = time.perf_counter()
            rate = (done - last_step) / max(now - last_time, 1e-9) if done > last_step else float("nan")
            last_time, last_step = now, done
            if int(state.nonfinite_steps) > 0:
                kept = manager.latest_step()
                raise TrainError(
                    f"loss or gradients became NaN/inf by step {done}: lower --config.train.learning_rate "
                    f"(the last good checkpoint{'' if kept is None else f', step {kept},'} is kept)"
                )
            for s, m in fetched:
                record = {"step": s, "phase": phase.name, **{k: float(v) for k, v in m.items()}}
                if s == done and np.isfinite(rate):
                    record["steps_per_second"] = rate
                    record["compile_seconds"] = round(compile_seconds, 2)
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                if writer:
                    for k, v in record.items():
                        if k not in ("step", "phase"):
                            writer.add_scalar(k, v, s)
            if metrics_file:
                metrics_file.flush()
            progress.set_postfix(loss=f"{float(fetched[-1][1]['loss']):.4f}", steps_per_s=f"{rate:.2f}")
        progress.update(1)
        if must_save:
            manager.save(done, state, metadata, force=done == phase.stop or stopping)
        if validate is not None and done % config.train.validation_every == 0 and jax.process_index() == 0:
            validate(done, jax.device_get(state.embeddings), metadata, writer)
        if stopping:
            log.warning("SIGTERM: saved step %d, stopping", done)
            break
    return state
