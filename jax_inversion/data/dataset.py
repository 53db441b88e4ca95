"""Training data on the host: images -> cached VAE latents (and masks), prompts, global batches.

Latents of every image (and its flip) are computed once and cached in the workdir, keyed by
the images, the crop settings and the VAE encoder's weights. A batch is drawn by index from
the cache (``data.BatchSampler``) and sharded over the mesh's ``data`` axis.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import io
import json
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jax_inversion.core.sharding import as_global
from jax_inversion.data import images as data_lib
from jax_inversion.data.phases import ConceptSpec, Phase
from jax_inversion.models.loading import Pretrained
from jax_inversion.text.conditioning import encoders_of, vae_factor


@functools.lru_cache(maxsize=8)
def _vae_encoder(vae) -> Callable:
    """``(params, images) -> (posterior mean, std)``, jitted once per VAE module (modules compare by config), so
    every dataset of a process (each concept of a batch inversion, each phase) reuses one compiled program."""

    def encode(params, x):
        mean, logvar = vae.apply({"params": params}, x, method="encode")
        return mean.astype(jnp.float32), jnp.exp(0.5 * logvar).astype(jnp.float32)

    return jax.jit(encode)


def encode_latents(model: Pretrained, images: np.ndarray, chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """VAE posterior mean and std of every image, computed once (never per step).

    In chunks of ``chunk`` images, the last one padded with copies of its first image so that every call
    has one shape (one compile for any number of images); the padding's outputs are dropped.
    """
    encode = _vae_encoder(model.vae)
    means, stds = [], []
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk]
        padded = np.concatenate([part, np.repeat(part[:1], chunk - len(part), axis=0)]) if len(part) < chunk else part
        mean, std = encode(model.vae_params, jnp.asarray(padded, model.vae.dtype))
        means.append(np.asarray(mean)[: len(part)])
        stds.append(np.asarray(std)[: len(part)])
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
    caption_prompts: Optional[np.ndarray] = None  # [num_images] row of input_ids of the image's caption, -1 = templates
    num_templates: int = 0  # template prompts come first in input_ids (0 = all of them)

    @property
    def num_prompts(self) -> int:
        """The template prompts the sampler draws from (captions are tied to their images)."""
        return self.num_templates or len(next(iter(self.input_ids.values())))


def caption_markers(config) -> tuple[str, ...]:
    """What a caption may write for the concept: ``{}`` or a placeholder token."""
    return ("{}", config.data.placeholder_token) + ((config.data.subject_token,) if config.data.get("subject_token") else ())


def caption_companions(config) -> tuple[str, ...]:
    """Files beside the images that are captions, not stray entries."""
    extension = config.data.get("caption_extension", "")
    return (("" if extension.startswith(".") else ".") + extension,) if extension else ()


def phase_captions(config, phase: Phase, paths: Sequence[str]) -> list:
    """Each image's caption prompt (``data.caption_extension``), or None where it has no caption file."""
    extension = config.data.get("caption_extension", "")
    if not extension:
        return [None] * len(paths)
    return [data_lib.read_caption(p, extension, caption_markers(config), phase.prompt_text) for p in paths]


def check_phase_images(config, phase: Phase) -> None:
    """Fails (one line) when a phase's images are missing or unreadable or a caption lacks the placeholder:
    needs no model, so a train job runs it before loading one."""
    paths = data_lib.list_concept_images(phase.image_dir, caption_companions(config))
    for path in paths:
        data_lib.open_image(path)
    phase_captions(config, phase, paths)


def check_phase_masks(config, phase: Phase) -> None:
    """Fails (one line) when the loss needs masks and a phase's are missing or unreadable (no ``data.box`` either)."""
    if phase.mask_dir:
        for path in data_lib.list_concept_images(phase.image_dir, caption_companions(config)):
            data_lib.open_image(data_lib.find_mask(phase.mask_dir, path))
    elif not config.data.box:
        raise data_lib.DataError(
            f"the loss needs concept masks for the {phase.name} images: set --config.data.{'subject_' if phase.name == 'subject' else ''}mask_dir "
            "(masks named like the images) or --config.data.box='[x0, y0, x1, y1]'"
        )


def check_prompt_lengths(config, phase: Phase, model: Pretrained) -> None:
    """Fails early (one line) when a template or caption of ``phase``, with its tokens expanded, is longer than a
    text encoder reads: the cut would drop words (or the placeholder) silently."""
    paths = data_lib.list_concept_images(phase.image_dir, caption_companions(config))
    templates = data_lib.templates_for(config.data.learnable_property, config.data.templates)
    captions = phase_captions(config, phase, paths)
    prompts = [(t.format(phase.prompt_text), "data.templates") for t in templates]
    prompts += [(c, f"the caption of {p}") for c, p in zip(captions, paths) if c is not None]
    for _, (_, tok) in encoders_of(model).items():
        texts = [p for p, _ in prompts]
        for prompt, length in data_lib.overlong_prompts(tok, texts):
            source = prompts[texts.index(prompt)][1]
            shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
            raise data_lib.DataError(
                f"prompt {shown!r} ({source}) is {length} tokens but the text encoder reads {tok.model_max_length} "
                f"(start and end included): shorten it, or use fewer data.num_vectors"
            )


def concept_phase(phase: Phase, concept: ConceptSpec) -> Phase:
    """``phase`` on ``concept``'s images (and masks)."""
    return dataclasses.replace(phase, image_dir=concept.image_dir, mask_dir=concept.mask_dir)


def build_dataset(config, model: Pretrained, phase: Phase, workdir: str, with_masks: bool = False) -> Dataset:
    """Loads a phase's images (and masks) and caches their (and their flips') VAE latents on disk."""
    paths = data_lib.list_concept_images(phase.image_dir, caption_companions(config))
    factor = vae_factor(model)
    resolution = config.data.resolution or model.unet.config.sample_size * factor
    rng = np.random.default_rng([config.seed, 1])
    crops = 1 if config.data.center_crop else max(1, config.data.random_crops_per_image)
    images, masks = [], []
    box = None
    if with_masks and not phase.mask_dir:
        check_phase_masks(config, phase)  # without a box: the one-line "needs masks" error
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
    cache = epath.Path(workdir) / "latents" / (key.hexdigest()[:16] + ".npz")  # a local path or gs://
    if cache.exists():
        with np.load(io.BytesIO(cache.read_bytes())) as f:
            mean, std = f["mean"], f["std"]
    else:
        mean, std = encode_latents(model, images)
        cache.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, mean=mean, std=std)
        tmp = cache.parent / f"{cache.name}.{jax.process_index()}.{os.getpid()}.tmp.npz"  # processes sharing a workdir each write their own
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(cache)  # another process may have written it meanwhile: same bytes
    templates = data_lib.templates_for(config.data.learnable_property, config.data.templates)
    prompts = [t.format(phase.prompt_text) for t in templates]
    # An image with a caption file always uses its caption; the others draw from the templates.
    captions = phase_captions(config, phase, paths)
    caption_prompts, num_templates = None, 0
    if any(c is not None for c in captions):
        rows = [-1 if c is None else len(prompts) + i for i, c in enumerate(captions)]
        caption_prompts = np.repeat(np.asarray(rows, np.int64), crops)  # crops of one image are consecutive
        num_templates = len(prompts)
        prompts = prompts + [c or "" for c in captions]
    input_ids = {name: data_lib.tokenize_prompts(tok, prompts) for name, (_, tok) in encoders_of(model).items()}
    return Dataset(mean, std, input_ids, num_images=len(paths) * crops, resolution=resolution, masks=mask_array,
                   caption_prompts=caption_prompts, num_templates=num_templates)


def _examples(dataset: Dataset, indices: dict, with_masks: bool) -> dict:
    """The host arrays of the examples ``indices`` picks (image, flip, prompt)."""
    rows = indices["image"] + dataset.num_images * indices["flip"]
    prompt = indices["prompt"]
    if dataset.caption_prompts is not None:  # captioned images say their caption
        own = dataset.caption_prompts[indices["image"]]
        prompt = np.where(own >= 0, own, prompt)
    host = {
        "latent_mean": dataset.latent_mean[rows],
        "latent_std": dataset.latent_std[rows],
        "input_ids": {name: ids[prompt].astype(np.int32) for name, ids in dataset.input_ids.items()},
    }
    if with_masks:
        host["masks"] = dataset.masks[rows]
    return host


def global_batch(dataset: Dataset, sampler: data_lib.BatchSampler, step: int, mesh, with_masks: bool = False) -> dict:
    """This host's slice of the global batch (``step`` counts within the phase), as globally sharded arrays."""
    indices = sampler.indices(step)
    local = sampler.host_slice(indices, jax.process_index(), jax.process_count())
    return as_global(_examples(dataset, local, with_masks), len(indices["image"]), mesh)


def concept_batch(datasets: Sequence[Dataset], samplers: Sequence[data_lib.BatchSampler], step: int, mesh,
                  with_masks: bool = False) -> dict:
    """Batch inversion: every concept's batch of ``step``, concept-major, this host's contiguous slice."""
    parts = [_examples(d, s.indices(step), with_masks) for d, s in zip(datasets, samplers)]
    full = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *parts)
    size = len(full["latent_mean"])
    per_host = size // jax.process_count()
    start = jax.process_index() * per_host
    return as_global(jax.tree_util.tree_map(lambda v: v[start : start + per_host], full), size, mesh)
