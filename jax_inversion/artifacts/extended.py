"""The ``extended`` embedding format: tokens plain loaders cannot express.

One safetensors file; per token ``T``:
- ``T::base`` ``[n, d]``: rows for plain use (what diffusers' loader would take);
- ``T::key`` / ``T::value`` ``[S, n, d]``: per-timestep-stage rows whose text-encoder states
  feed cross-attention keys and values separately (SeFi-IDE). Stage ``s`` covers timesteps
  ``[s*T/S, (s+1)*T/S)`` of the ``num_train_timesteps`` schedule;
- ``T::layer::<name>`` ``[n, d]``: rows whose states feed the named cross-attention layer
  (keys and values), other layers use ``base``.
The header metadata ``spec`` (JSON) lists tokens, vector counts, stages and layers.
``jax_inversion.artifacts.torch`` installs these into a PyTorch diffusers UNet; here are the readers
and the writer.
"""
from __future__ import annotations

import json
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_inversion.core.files import tensors_sha256

FORMAT = "jax_inversion.artifacts.extended"
VERSION = "1"


def stage_of(timesteps, num_stages: int, num_train_timesteps: int):
    """Stage index of each timestep: ``floor(t * S / T)`` clipped to ``[0, S)`` (numpy or jax)."""
    xp = jnp if isinstance(timesteps, jax.Array) else np
    return xp.clip((xp.asarray(timesteps) * num_stages) // num_train_timesteps, 0, num_stages - 1)


def stage_sources(num_stages: int, num_train_timesteps: int, low: int, high: int) -> tuple[int, ...]:
    """For each stage, the stage whose rows it should carry when training draws timesteps from ``[low, high)`` only:
    itself where some trained timestep falls in it, else the nearest stage that one does (the lower on a tie).

    Sampling runs every stage (DDIM's last steps are below 200), so a stage no trained timestep reaches
    (stage 0 of 5 with ``train.min_timestep=200``) would keep its initial rows there.
    """
    reached = sorted({int(s) for s in stage_of(np.arange(low, high), num_stages, num_train_timesteps)})
    return tuple(min(reached, key=lambda r: (abs(r - s), r)) for s in range(num_stages))


def write_extended(path: str, tokens: Mapping[str, Mapping], num_train_timesteps: int = 1000,
                   metadata: Optional[Mapping[str, str]] = None) -> None:
    """``tokens``: ``{token: {"text_encoder": base [n, d], optional "key"/"value" [S, n, d], "layers": {name: [n, d]}}}``.

    A plain ``{token: {"text_encoder": rows}}`` (what training stores) writes base rows only. ``metadata``
    (strings, e.g. ``export.embedding_metadata``) joins the header beside the format's own keys.
    """
    from safetensors.numpy import save_file

    tensors, spec = {}, {"tokens": {}, "num_train_timesteps": int(num_train_timesteps)}
    for token, parts in tokens.items():
        base = np.asarray(parts.get("base", parts.get("text_encoder")), np.float32)
        tensors[f"{token}::base"] = base
        entry = {"num_vectors": int(base.shape[0]), "stages": 0, "layers": []}
        if "key" in parts or "value" in parts:
            key, value = np.asarray(parts["key"], np.float32), np.asarray(parts["value"], np.float32)
            if key.shape != value.shape or key.shape[1:] != base.shape:
                raise ValueError(f"{token}: key/value rows must both be [stages, {base.shape[0]}, {base.shape[1]}]")
            tensors[f"{token}::key"], tensors[f"{token}::value"] = key, value
            entry["stages"] = int(key.shape[0])
        for name, rows in (parts.get("layers") or {}).items():
            tensors[f"{token}::layer::{name}"] = np.asarray(rows, np.float32)
            entry["layers"].append(name)
        if entry["stages"] and entry["layers"]:
            raise ValueError(f"{token}: per-stage K/V rows and per-layer rows cannot be combined")
        spec["tokens"][token] = entry
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    header = dict(metadata or {})
    if metadata is not None:
        header["modelspec.hash_sha256"] = tensors_sha256(tensors)
    header.update(format=FORMAT, version=VERSION, spec=json.dumps(spec))
    save_file(tensors, path, metadata=header)


def read_extended(path: str) -> dict[str, dict]:
    """``{token: {"base", ["key", "value", "stages"], "layers": {name: rows}}}`` plus ``num_train_timesteps``."""
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file")
        spec = json.loads(metadata["spec"])
        out = {}
        for token, entry in spec["tokens"].items():
            parts = {"base": f.get_tensor(f"{token}::base"), "stages": entry["stages"], "layers": {},
                     "num_train_timesteps": spec["num_train_timesteps"]}
            if entry["stages"]:
                parts["key"], parts["value"] = f.get_tensor(f"{token}::key"), f.get_tensor(f"{token}::value")
            for name in entry["layers"]:
                parts["layers"][name] = f.get_tensor(f"{token}::layer::{name}")
            out[token] = parts
    return out
