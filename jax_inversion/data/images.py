"""Input pipeline for textual-inversion training: concept images, prompts and batch sampling.

Everything here is plain numpy/PIL so that it runs the same on every host; the train loop
caches VAE latents of the loaded images once and draws batches with :class:`BatchSampler`,
whose output depends only on ``(seed, step)`` so that resuming reproduces an uninterrupted run.
"""
from __future__ import annotations

import io
import logging
import os
import re
from typing import Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from jax_inversion.core.errors import UserError
from jax_inversion.core.files import is_remote
from jax_inversion.text.tokens import vector_tokens

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

_TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


class DataError(UserError, ValueError):
    """A problem with the user's training data or data settings; the message names the fix."""


def list_concept_images(directory: str, companions: Sequence[str] = ()) -> list[str]:
    """Sorted paths of the images directly inside ``directory``; other entries are skipped with a
    warning, except files ending in ``companions`` (e.g. the caption extension)."""
    folder = epath.Path(directory)  # a local folder or gs://bucket/...
    if not folder.exists():
        raise DataError(
            f"concept dir {directory} does not exist: pass --config.data.concept_dir=DIR with your images"
        )
    if not folder.is_dir():
        raise DataError(
            f"concept dir {directory} is not a directory: pass --config.data.concept_dir=DIR "
            "naming the folder that holds your images"
        )
    images, skipped = [], []
    for name in sorted(p.name for p in folder.iterdir()):
        if name.startswith("."):
            continue
        path = os.path.join(directory, name)
        is_file = epath.Path(path).is_file()
        if is_file and name.lower().endswith(IMAGE_EXTENSIONS):
            images.append(path)
        elif not (companions and is_file and name.endswith(tuple(companions))):
            skipped.append(name + ("" if is_file else "/"))
    if skipped:
        logger.warning(
            "skipping %d entries in %s that are not %s images (subfolders are not searched): %s",
            len(skipped), directory, "/".join(IMAGE_EXTENSIONS), ", ".join(skipped),
        )
    if not images:
        raise DataError(
            f"concept dir {directory} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
            "put 3-5 images of your concept directly inside it"
        )
    return images


def open_image(path: str) -> Image.Image:
    """Opens ``path`` as an upright RGB image: EXIF rotation applied, transparency flattened onto white."""
    try:
        with Image.open(io.BytesIO(epath.Path(path).read_bytes()) if is_remote(path) else path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        reason = str(e) or type(e).__name__
        raise DataError(f"cannot read image {path} ({reason}): remove or replace it") from e


def load_image(
    path: str,
    resolution: int,
    *,
    center_crop: bool = True,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Loads ``path`` as float32 ``[resolution, resolution, 3]`` in [-1, 1], the VAE's input range.

    The short side is resized to ``resolution`` (bicubic), then the square is cut from the
    centre, or at a position drawn from ``rng`` when ``center_crop`` is False.
    """
    if resolution < 1:
        raise DataError(f"image resolution {resolution} must be positive: set --config.data.resolution")
    if not center_crop and rng is None:
        raise ValueError("load_image(center_crop=False) needs an rng for the random crop")
    img = open_image(path)
    width, height = img.size
    scale = resolution / min(width, height)
    new_w = max(resolution, round(width * scale))
    new_h = max(resolution, round(height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left = int(rng.integers(0, new_w - resolution + 1))
        top = int(rng.integers(0, new_h - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def find_mask(mask_dir: str, image_path: str) -> str:
    """The mask for ``image_path`` in ``mask_dir``: the image file with the same stem."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    if not epath.Path(mask_dir).is_dir():
        raise DataError(f"mask folder {mask_dir} does not exist: set --config.data.mask_dir to a folder of masks named like the images")
    for name in sorted(p.name for p in epath.Path(mask_dir).iterdir()):
        if os.path.splitext(name)[0] == stem and name.lower().endswith(IMAGE_EXTENSIONS):
            return os.path.join(mask_dir, name)
    raise DataError(
        f"no mask for {os.path.basename(image_path)} in {mask_dir}: add {stem}.png (white = concept) or remove the image"
    )


def load_mask(path: str, resolution: int, *, center_crop: bool = True, rng: np.random.Generator | None = None) -> np.ndarray:
    """A mask image as float32 ``[resolution, resolution]`` in [0, 1], cropped exactly as :func:`load_image` crops."""
    return (load_image(path, resolution, center_crop=center_crop, rng=rng).mean(axis=-1) + 1.0) / 2.0


def box_mask(box: Sequence[float], resolution: int) -> np.ndarray:
    """``[x0, y0, x1, y1]`` (fractions of the image) as a float32 ``[resolution, resolution]`` 0/1 mask."""
    if len(box) != 4 or not 0 <= box[0] < box[2] <= 1 or not 0 <= box[1] < box[3] <= 1:
        raise DataError(f"box {list(box)} is not [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1: fix --config.data.box")
    centers = (np.arange(resolution) + 0.5) / resolution
    inside_x = (centers >= box[0]) & (centers < box[2])
    inside_y = (centers >= box[1]) & (centers < box[3])
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float32)


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Block-average ``[..., H, W]`` by ``factor`` (image resolution -> latent resolution)."""
    *lead, h, w = mask.shape
    return mask.reshape(*lead, h // factor, factor, w // factor, factor).mean(axis=(-3, -1))


def templates_for(kind: str, custom: Sequence[str] | None = None) -> list[str]:
    """Prompt templates for ``kind`` ("object" or "style"); a non-empty ``custom`` list replaces them."""
    if custom:
        templates = [custom] if isinstance(custom, str) else list(custom)
    else:
        if kind not in _TEMPLATES:
            raise DataError(
                f"unknown concept kind {kind!r}: set --config.data.learnable_property to 'object' or 'style'"
            )
        templates = list(_TEMPLATES[kind])
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise DataError(
                f"prompt template {template!r} must contain exactly one '{{}}' where the concept "
                "token goes: fix the custom templates"
            )
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise DataError(
                f"prompt template {template!r} has stray braces ({e}): keep only the one '{{}}'"
            ) from e
    return templates


def caption_path(image_path: str, extension: str) -> str:
    """The caption file beside ``image_path``: same stem, ``extension`` (".txt" or "txt")."""
    return os.path.splitext(image_path)[0] + ("" if extension.startswith(".") else ".") + extension


def read_caption(image_path: str, extension: str, markers: Sequence[str], prompt_text: str) -> str | None:
    """The prompt an image's caption file gives (None when the image has no caption file).

    The caption must hold ``{}`` or the placeholder (one of ``markers``); each occurrence becomes
    ``prompt_text``, so a multi-vector placeholder expands as the templates' ``{}`` does
    ("a <cat> on a sofa" -> "a <cat> <cat>_1 on a sofa").
    """
    path = caption_path(image_path, extension)
    if not epath.Path(path).is_file():
        return None
    try:
        caption = " ".join(epath.Path(path).read_bytes().decode("utf-8").split())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read caption {path} ({type(e).__name__}): save it as UTF-8 text or remove it") from None
    for marker in markers:
        if marker and marker in caption:
            pattern = re.escape(marker) + (r"(?!_\d)" if marker != "{}" else "")  # not <cat>_1 of a spelled-out token
            return re.sub(pattern, lambda _: prompt_text, caption)
    shown = " or ".join(repr(m) for m in markers if m)
    raise DataError(f"caption {path} does not mention the concept: put {shown} where it goes, e.g. 'a photo of {{}} on a table'")


def placeholder_string(token: str, num_vectors: int) -> str:
    """The prompt text for a concept of ``num_vectors`` tokens: ``<cat> <cat>_1 <cat>_2`` (diffusers' convention)."""
    if not token or any(c.isspace() for c in token):
        raise DataError(
            f"placeholder token {token!r} must be a non-empty word without spaces: "
            "set --config.data.placeholder_token, e.g. '<my-concept>'"
        )
    if num_vectors < 1:
        raise DataError(f"num_vectors {num_vectors} must be at least 1: set --config.data.num_vectors")
    return " ".join(vector_tokens(token, num_vectors))


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Token ids int32 ``[N, max_length]``, padded and truncated to the text encoder's length as SD pipelines do."""
    if max_length is None:
        max_length = tokenizer.model_max_length
    prompts = list(prompts)
    if not prompts:
        return np.zeros((0, max_length), np.int32)
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids
    return np.asarray(ids, dtype=np.int32)


def overlong_prompts(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> list[tuple[str, int]]:
    """``[(prompt, tokens)]`` of the prompts longer than the text encoder reads (``model_max_length``, 77 for
    CLIP, start and end tokens included): :func:`tokenize_prompts` would cut their ends."""
    limit = max_length or tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False, verbose=False).input_ids] if prompts else []
    return [(p, n) for p, n in zip(prompts, lengths) if n > limit]


class BatchSampler:
    """Stateless sampler of training examples: ``indices(step)`` depends only on ``(seed, step)``.

    Images follow seeded per-epoch permutations over the flattened example stream, so every
    image is seen evenly; prompts and flips are drawn from ``default_rng([seed, step])``.
    Resuming at any step therefore replays nothing and skips nothing, on any host count.
    """

    def __init__(
        self,
        num_images: int,
        num_prompts: int,
        global_batch_size: int,
        seed: int,
        flip_probability: float = 0.5,
    ):
        if num_images < 1:
            raise DataError("no training images: put images in --config.data.concept_dir")
        if num_prompts < 1:
            raise DataError("no training prompts: give at least one prompt template")
        if global_batch_size < 1:
            raise DataError(f"batch size {global_batch_size} must be at least 1: set --config.train.batch_size")
        if seed < 0:
            raise DataError(f"seed {seed} must be non-negative: set --config.seed")
        if not 0.0 <= flip_probability <= 1.0:
            raise DataError(
                f"flip probability {flip_probability} must be in [0, 1]: set --config.data.flip_probability"
            )
        self.num_images = int(num_images)
        self.num_prompts = int(num_prompts)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.flip_probability = float(flip_probability)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 7]).permutation(self.num_images)

    def indices(self, step: int) -> dict[str, np.ndarray]:
        """The global batch of ``step``: int32 ``image``, ``prompt`` and ``flip`` (0/1) arrays of length B."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        b, n = self.global_batch_size, self.num_images
        positions = np.arange(step * b, (step + 1) * b, dtype=np.int64)
        epochs, offsets = np.divmod(positions, n)
        image = np.empty(b, np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            image[mask] = self._permutation(int(epoch))[offsets[mask]]
        rng = np.random.default_rng([self.seed, int(step)])
        prompt = rng.integers(0, self.num_prompts, size=b)
        flip = rng.random(b) < self.flip_probability
        return {
            "image": image.astype(np.int32),
            "prompt": prompt.astype(np.int32),
            "flip": flip.astype(np.int32),
        }

    def host_slice(self, indices: dict[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
        """This host's contiguous share of a global batch from :meth:`indices`."""
        b = self.global_batch_size
        if process_count < 1 or b % process_count:
            raise DataError(
                f"global batch size {b} is not divisible by {process_count} hosts: "
                "set --config.train.batch_size to a multiple of the host count"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        per_host = b // process_count
        start = process_index * per_host
        return {k: v[start:start + per_host] for k, v in indices.items()}
