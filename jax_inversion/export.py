"""Learned embeddings <-> the files PyTorch pipelines load.

Formats (``--format``):
- ``diffusers``: ``{token: [n_vectors, d]}`` (``.safetensors``, or ``.bin`` via torch.save), what
  ``StableDiffusionPipeline.load_textual_inversion`` expects, multi-vector included.
- ``a1111``: ``.pt`` with ``string_to_param``/``string_to_token``/``name`` (A1111, ComfyUI, and
  diffusers' loader), or ``.safetensors`` with ``emb_params``.
- ``sdxl``: ``{clip_l: [n, 768], clip_g: [n, 1280]}`` for two-encoder models.
- ``extended``: see :mod:`jax_inversion.extended`.

Export reads Orbax checkpoints and their metadata only (never train-loop objects). Reading
is safe by default: safetensors, and ``.bin``/``.pt`` only through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Optional

import numpy as np
from etils import epath

from jax_inversion.checkpoints import read_run
from jax_inversion.errors import UserError
from jax_inversion.extended import read_extended, write_extended
from jax_inversion.files import atomic_write, is_remote, local_copy

FORMATS = ("diffusers", "a1111", "sdxl", "extended")
_EXTENSIONS = {
    "diffusers": (".safetensors", ".bin"),
    "a1111": (".pt", ".safetensors"),
    "sdxl": (".safetensors",),
    "extended": (".safetensors",),
}


class ExportError(UserError, ValueError):
    """An export or import request that cannot be served; the message says what to do."""


def run_embeddings(state: dict) -> dict[str, np.ndarray]:
    """``{encoder name: rows [n_tokens, d]}`` from a restored train state."""
    return {k: np.asarray(v, np.float32) for k, v in state["embeddings"].items()}


def run_concepts(meta: dict) -> list[dict]:
    """``[{"name": token, "rows": [start, stop]}]``: each concept's tokens within the learned rows."""
    if meta.get("concepts"):
        return meta["concepts"]
    return [{"name": meta["placeholder_token"], "rows": [0, len(meta["layout"]["tokens"])]}]


def _atomic_write(path: str, overwrite: bool, write: Callable[[str], None]) -> None:
    atomic_write(path, write, overwrite=overwrite, exists_error=ExportError)


def _torch():
    try:
        import torch
    except ImportError:
        raise ExportError("this file type needs torch: install torch or use a .safetensors output") from None
    return torch


def write_embedding_file(
    path: str,
    fmt: str,
    token: str,
    rows: dict[str, np.ndarray],
    *,
    step: int = 0,
    overwrite: bool = False,
) -> str:
    """Writes one concept's rows (``{encoder: [n, d]}``) in ``fmt``; the extension picks the container."""
    ext = os.path.splitext(path)[1].lower()
    if fmt not in FORMATS:
        raise ExportError(f"unknown --format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if ext not in _EXTENSIONS[fmt]:
        raise ExportError(f"--format {fmt} writes {' or '.join(_EXTENSIONS[fmt])} files, not {path!r}: change --out")
    two_encoders = "text_encoder_2" in rows
    if fmt == "sdxl" and not two_encoders:
        raise ExportError("--format sdxl needs a model with two text encoders (SDXL); this run has one: use --format diffusers")
    if fmt in ("diffusers", "a1111") and two_encoders:
        raise ExportError(f"--format {fmt} holds one text encoder's rows; this run has two (SDXL): use --format sdxl")
    if fmt == "extended":
        _atomic_write(path, overwrite, lambda tmp: write_extended(tmp, {token: rows}))
        return path
    from safetensors.numpy import save_file

    if fmt == "sdxl":
        tensors = {"clip_l": rows["text_encoder"], "clip_g": rows["text_encoder_2"]}
        write = lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
    elif fmt == "diffusers" and ext == ".safetensors":
        write = lambda tmp: save_file({token: np.ascontiguousarray(rows["text_encoder"])}, tmp)
    elif fmt == "diffusers":
        torch = _torch()
        write = lambda tmp: torch.save({token: torch.from_numpy(rows["text_encoder"].copy())}, tmp)
    elif ext == ".safetensors":  # a1111 safetensors
        write = lambda tmp: save_file({"emb_params": np.ascontiguousarray(rows["text_encoder"])}, tmp)
    else:  # a1111 .pt
        torch = _torch()
        payload = {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.from_numpy(rows["text_encoder"].copy())},
            "name": token,
            "step": int(step),
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        }
        write = lambda tmp: torch.save(payload, tmp)
    _atomic_write(path, overwrite, write)
    return path


def extended_parts(rows: dict) -> dict:
    """A concept's rows as extended-format parts: plain ``[n, d]`` is base only; staged ``[S, K, n, d]``
    gives per-stage key (part 0) and value (part K-1) rows, with their mean as the base."""
    rows = dict(rows)
    r = rows["text_encoder"]
    if r.ndim == 2:
        return rows
    return {"base": r.mean(axis=(0, 1)), "key": r[:, 0], "value": r[:, -1]}


def file_name_for(token: str) -> str:
    """``<my cat>`` -> ``my_cat``: a safe file stem for a token."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", token).strip("_.")
    return stem or "concept"


def split_concepts(rows: dict, meta: dict) -> dict[str, dict]:
    """``{concept name: {encoder: rows}}``: each concept's slice of a run's learned rows."""
    if meta.get("concept_batch"):  # batch inversion: rows [C, n, d], one concept per index
        return {c["name"]: {enc: r[c["index"]] for enc, r in rows.items()} for c in meta["concept_batch"]}
    return {c["name"]: {enc: r[..., c["rows"][0] : c["rows"][1], :] for enc, r in rows.items()} for c in run_concepts(meta)}


def step_file(workdir: str, token: str, step: int, fmt: str) -> str:
    """``WORKDIR/embeddings/<token>_step_000500.safetensors``: where ``train.export_every`` writes a step."""
    return os.path.join(workdir, "embeddings", f"{file_name_for(token)}_step_{step:06d}{_EXTENSIONS[fmt][0]}")


def export_step(workdir: str, step: int, embeddings: dict, meta: dict) -> list[str]:
    """Writes each concept's rows at ``step`` beside the checkpoints (``train.export_every``), in the
    format pipelines load: diffusers (one text encoder), sdxl (two), extended (per-stage rows)."""
    rows = {k: np.asarray(v, np.float32) for k, v in embeddings.items()}
    staged = rows["text_encoder"].ndim == 4 and not meta.get("concept_batch")
    fmt = "extended" if staged else "sdxl" if "text_encoder_2" in rows else "diffusers"
    written = []
    for name, concept in split_concepts(rows, meta).items():
        path = step_file(workdir, name, step, fmt)
        if fmt == "extended":
            steps = int(meta.get("num_train_timesteps", 1000))
            _atomic_write(path, True, lambda tmp: write_extended(tmp, {name: extended_parts(concept)}, steps))
        else:
            write_embedding_file(path, fmt, name, concept, step=step, overwrite=True)
        written.append(path)
    return written


def export_run(
    workdir: str,
    out: str,
    fmt: str,
    *,
    step: Optional[int] = None,
    all_concepts: bool = False,
    overwrite: bool = False,
) -> list[str]:
    """Exports a run's concept (or, with ``all_concepts``, each concept into the folder ``out``)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown --format {fmt!r}: choose one of {', '.join(FORMATS)}")
    step, state, meta = read_run(workdir, step)
    rows = run_embeddings(state)
    concepts = split_concepts(rows, meta)
    staged = rows["text_encoder"].ndim == 4 and not meta.get("concept_batch")
    if staged and fmt != "extended":
        raise ExportError(
            f"this run learned per-stage key/value rows, which --format {fmt} cannot express: use --format extended "
            "(jax_inversion.torch.ExtendedTokens loads it into diffusers)"
        )
    if fmt == "extended":
        concepts = {name: extended_parts(r) for name, r in concepts.items()}
    if fmt == "extended" and not all_concepts:  # one file holds every token of the run (e.g. Lego's <subj> <cpt>)
        if "text_encoder_2" in rows:
            raise ExportError("--format extended holds one text encoder's rows; this run has two (SDXL): use --format sdxl")
        steps = int(meta.get("num_train_timesteps", 1000))
        _atomic_write(out, overwrite, lambda tmp: write_extended(tmp, concepts, steps))
        return [out]
    if not all_concepts and len(concepts) > 1:
        raise ExportError(
            f"the run has {len(concepts)} concepts ({', '.join(concepts)}): pass --all with --out DIR, "
            "or --format extended for one file"
        )
    written = []
    for name, concept_rows in concepts.items():
        path = os.path.join(out, file_name_for(name) + _EXTENSIONS[fmt][0]) if all_concepts else out
        written.append(write_embedding_file(path, fmt, name, concept_rows, step=step, overwrite=overwrite))
    return written


# ----------------------------------------------------------------------------- import


def read_tensors(path: str) -> tuple[dict, dict]:
    """Tensors (numpy) and safetensors metadata of an embedding file."""
    if not epath.Path(path).is_file():
        raise ExportError(f"embedding file {path} does not exist: pass an exported .safetensors/.bin/.pt file")
    if is_remote(path):  # gs://...: read a local copy
        with local_copy(path) as local:
            return read_tensors(local)
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="np") as f:
                metadata = dict(f.metadata() or {})
                if metadata.get("format") == "jax_inversion.extended":  # parsed by read_extended
                    return {}, metadata
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except Exception as e:
            raise ExportError(f"cannot read {path} as safetensors ({type(e).__name__}): re-export it") from None
    torch = _torch()
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"cannot read {path} safely ({type(e).__name__}): only plain tensor files are accepted") from None

    def to_numpy(value: Any):
        if isinstance(value, torch.Tensor):
            return value.detach().float().numpy()
        if isinstance(value, dict):
            return {k: to_numpy(v) for k, v in value.items()}
        return value

    return to_numpy(loaded if isinstance(loaded, dict) else {"": loaded}), {}


def read_embedding_file(path: str) -> dict[str, Any]:
    """Parses any format above into ``{"token": str | None, "rows": {encoder: [n, d]}}``."""
    tensors, metadata = read_tensors(path)
    if metadata.get("format") == "jax_inversion.extended":
        tokens = read_extended(path)
        if len(tokens) != 1:
            raise ExportError(f"{path} holds {len(tokens)} tokens; import takes one concept per file")
        (token, spec), = tokens.items()
        return {"token": token, "rows": {"text_encoder": spec["base"]}}
    if "string_to_param" in tensors:
        return {"token": tensors.get("name"), "rows": {"text_encoder": np.asarray(tensors["string_to_param"]["*"])}}
    if set(tensors) == {"clip_l", "clip_g"}:
        return {"token": None, "rows": {"text_encoder": tensors["clip_l"], "text_encoder_2": tensors["clip_g"]}}
    if set(tensors) == {"emb_params"}:
        return {"token": None, "rows": {"text_encoder": tensors["emb_params"]}}
    if len(tensors) == 1:
        (token, rows), = tensors.items()
        return {"token": token or None, "rows": {"text_encoder": np.asarray(rows)}}
    raise ExportError(f"{path} is not a diffusers, A1111, SDXL or extended embedding file (keys: {sorted(tensors)[:5]})")


def initial_rows_from_file(path: str, widths: dict[str, int], num_vectors: int) -> dict[str, np.ndarray]:
    """Rows to start training from, shape-checked against the model's embedding widths."""
    parsed = read_embedding_file(path)
    rows = {}
    for encoder, width in widths.items():
        if encoder not in parsed["rows"]:
            raise ExportError(f"{path} has no rows for {encoder}: it was made for another model type")
        r = np.asarray(parsed["rows"][encoder], np.float32)
        if r.ndim == 1:
            r = r[None]
        if r.shape[-1] != width:
            raise ExportError(f"{path} has {r.shape[-1]}-wide embeddings but the model's {encoder} is {width} wide: it was trained for another model")
        if r.shape[0] != num_vectors:
            raise ExportError(f"{path} has {r.shape[0]} vectors but --config.data.num_vectors={num_vectors}: set it to {r.shape[0]}")
        rows[encoder] = r
    extra = sorted(set(parsed["rows"]) - set(widths))
    if extra:
        raise ExportError(f"{path} has rows for {extra} which this model lacks: it was made for another model type")
    return rows
