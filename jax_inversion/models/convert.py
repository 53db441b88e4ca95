"""PyTorch state dicts <-> Flax param trees, by name.

Our Flax modules mirror the diffusers/transformers module tree: the PyTorch key
``down_blocks.1.attentions.0.proj_in.weight`` lives at the Flax path
``down_blocks_1/attentions_0/proj_in/kernel``. Conversion is therefore mechanical
and checked against the shapes of a freshly initialised (abstract) param tree, so a
missing, unexpected or mis-shaped weight is reported by its PyTorch key.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

# Old diffusers checkpoints name the VAE mid-block attention like this.
_DEPRECATED_RENAMES = (
    (re.compile(r"\.query\.(weight|bias)$"), r".to_q.\1"),
    (re.compile(r"\.key\.(weight|bias)$"), r".to_k.\1"),
    (re.compile(r"\.value\.(weight|bias)$"), r".to_v.\1"),
    (re.compile(r"\.proj_attn\.(weight|bias)$"), r".to_out.0.\1"),
)
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
# PyTorch ModuleList/Sequential containers: ``resnets.0`` <-> ``resnets_0``. Other names
# with a trailing ``_<digit>`` (``linear_1``) are plain attribute names.
_CONTAINERS = (
    "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
    "downsamplers", "upsamplers", "layers", "to_out", "net",
)
_CONTAINER_INDEX = re.compile(r"^(" + "|".join(_CONTAINERS) + r")_(\d+)$")


class WeightMismatchError(ValueError):
    """A checkpoint does not fit the model built from its config."""


def torch_key_to_flax_path(key: str) -> tuple[str, ...]:
    """``a.b.0.c.weight`` -> ``('a', 'b_0', 'c', 'weight')`` (leaf resolved later)."""
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def module_path_to_torch_name(path) -> str:
    """Flax module path -> PyTorch module name (``down_blocks_1`` -> ``down_blocks.1``)."""
    return ".".join(_CONTAINER_INDEX.sub(r"\1.\2", m) for m in path)


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    """Inverse of :func:`torch_key_to_flax_path`, leaf mapped back to ``weight``/``bias``."""
    *modules, leaf = path
    leaf = "weight" if leaf in _WEIGHT_LEAVES else leaf
    return module_path_to_torch_name(modules) + "." + leaf


def _to_flax_layout(value: np.ndarray, leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4 and len(target_shape) == 4:  # conv OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0)
        else:
            if value.ndim == 4 and value.shape[2:] == (1, 1):  # 1x1 conv stored for a linear layer
                value = value[:, :, 0, 0]
            value = value.T
    elif value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
    return value


def convert_state_dict(
    state_dict: Mapping[str, Any],
    abstract_params: Mapping[str, Any],
    *,
    prefix: str = "",
    ignore: tuple[str, ...] = (),
    dtype: Any = np.float32,
) -> dict:
    """Maps a PyTorch ``state_dict`` (numpy arrays) onto the structure of ``abstract_params``.

    ``abstract_params`` is the ``params`` tree of the Flax module (shapes only suffice, e.g.
    from ``jax.eval_shape``). ``prefix`` is stripped from keys (e.g. ``"text_model."`` lives
    at the root of some checkpoints only). Keys matching a regex in ``ignore`` are skipped
    (buffers such as ``position_ids``). Raises :class:`WeightMismatchError` naming every
    missing, unexpected or mis-shaped key.
    """
    flat_target = traverse_util.flatten_dict(abstract_params)
    by_module: dict[tuple[str, ...], set[str]] = {}
    for path in flat_target:
        by_module.setdefault(path[:-1], set()).add(path[-1])

    converted: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, misshaped = [], []
    for raw_key, value in state_dict.items():
        key = raw_key[len(prefix):] if prefix and raw_key.startswith(prefix) else raw_key
        if any(re.search(pattern, key) for pattern in ignore):
            continue
        for pattern, replacement in _DEPRECATED_RENAMES:
            key = pattern.sub(replacement, key)
        *module, torch_leaf = torch_key_to_flax_path(key)
        module = tuple(module)
        leaves = by_module.get(module, set())
        if torch_leaf == "weight":
            candidates = [leaf for leaf in _WEIGHT_LEAVES if leaf in leaves]
        else:
            candidates = [torch_leaf] if torch_leaf in leaves else []
        if not candidates:
            unexpected.append(raw_key)
            continue
        leaf = candidates[0]
        target_shape = tuple(flat_target[module + (leaf,)].shape)
        array = _to_flax_layout(np.asarray(value), leaf, target_shape)
        if tuple(array.shape) != target_shape:
            misshaped.append(f"{raw_key}: checkpoint {tuple(np.shape(value))}, model expects {target_shape}")
            continue
        converted[module + (leaf,)] = array.astype(dtype)

    missing = [flax_path_to_torch_key(p) for p in flat_target if p not in converted]
    problems = []
    if missing:
        problems.append("missing " + ", ".join(sorted(missing)))
    if unexpected:
        problems.append("unexpected " + ", ".join(sorted(unexpected)))
    if misshaped:
        problems.append("mis-shaped " + "; ".join(misshaped))
    if problems:
        raise WeightMismatchError("checkpoint does not match the model config: " + " | ".join(problems))
    return traverse_util.unflatten_dict(converted)


def flax_params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params -> PyTorch-layout numpy state dict (for tests and export)."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[flax_path_to_torch_key(path)] = value
    return out
