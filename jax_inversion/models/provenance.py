"""Which base model a run trained on: name, family and hash, recorded with every checkpoint.

Exports copy it into their metadata (modelspec's ``architecture``, A1111's ``sd_checkpoint``), so an
embedding file says which model it belongs to after it leaves the workdir.
"""
from __future__ import annotations

import glob
import hashlib
import os
from typing import Optional

from jax_inversion.models.loading import Pretrained

HASH_CHUNK = 1 << 24  # 16 MiB reads: hashing a 4 GB checkpoint holds one chunk at a time


def file_sha256(paths: list[str]) -> str:
    """sha256 of the files' bytes, read in order as one stream (hex)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def weight_files(path: str) -> list[str]:
    """The files a model's hash is taken over: the single checkpoint file itself, or a diffusers folder's UNet
    weights (``unet/*.safetensors`` or ``*.bin``, shards in name order); ``[]`` when there are none (a
    configs-only model, as ``jax-inversion compile`` plans with)."""
    if os.path.isfile(path):
        return [path]
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(p for p in glob.glob(os.path.join(path, "unet", pattern)) if ".fp16." not in p)
        if files:
            return files
    return []


def architecture(model: Pretrained) -> str:
    """The modelspec architecture id of the base model: ``stable-diffusion-v1``, ``stable-diffusion-v2-512``,
    ``stable-diffusion-v2-768-v``, ``stable-diffusion-xl-v1-base``; ``custom-<width>`` for other text encoders
    (the toy world's)."""
    width = model.text_encoder.config.hidden_size
    if model.text_encoder_2 is not None:
        return "stable-diffusion-xl-v1-base" if (width, model.text_encoder_2.config.hidden_size) == (768, 1280) else f"custom-{width}"
    if width == 768:
        return "stable-diffusion-v1"
    if width == 1024:
        return "stable-diffusion-v2-768-v" if model.prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    return f"custom-{width}"


def base_model_info(model: Pretrained, resolution: int, with_hash: bool = True) -> dict:
    """``{"name", "path", "architecture", "prediction_type", "resolution", "sha256"}`` of ``model``.

    ``sha256`` (see :func:`weight_files`; None without weight files or ``with_hash=False``) gives A1111's
    ``sd_checkpoint`` short hash (its first 10 hex digits, A1111's "AutoV2") for a single-file model.
    """
    path = os.path.abspath(model.path) if os.path.exists(model.path) else model.path
    files = weight_files(path) if with_hash else []
    sha256: Optional[str] = file_sha256(files) if files else None
    name = os.path.splitext(os.path.basename(path.rstrip("/")))[0] if os.path.isfile(path) else os.path.basename(path.rstrip("/"))
    return {
        "name": name,
        "path": path,
        "architecture": architecture(model),
        "prediction_type": model.prediction_type,
        "resolution": int(resolution),
        "sha256": sha256,
    }
