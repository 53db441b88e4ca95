"""Learned embeddings <-> the files PyTorch pipelines load.

Formats (``--format``):
- ``diffusers``: ``{token: [n_vectors, d]}`` (``.safetensors``, or ``.bin`` via torch.save), what
  ``StableDiffusionPipeline.load_textual_inversion`` expects, multi-vector included.
- ``a1111``: ``.pt`` with ``string_to_param``/``string_to_token``/``name`` (A1111, ComfyUI, and
  diffusers' loader), or ``.safetensors`` with ``emb_params``.
- ``sdxl``: ``{clip_l: [n, 768], clip_g: [n, 1280]}`` for two-encoder models.
- ``extended``: see :mod:`jax_inversion.artifacts.extended`.

Export reads Orbax checkpoints and their metadata only (never train-loop objects). Reading
is safe by default: safetensors, and ``.bin``/``.pt`` only through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import datetime
import os
import re
from typing import Any, Callable, Mapping, Optional

import numpy as np
from etils import epath

from jax_inversion.artifacts.checkpoints import read_run
from jax_inversion.artifacts.extended import read_extended, write_extended
from jax_inversion.core.errors import UserError
from jax_inversion.core.files import atomic_write, is_remote, local_copy, tensors_sha256

FORMATS = ("diffusers", "a1111", "sdxl", "extended")
_EXTENSIONS = {
    "diffusers": (".safetensors", ".bin"),
    "a1111": (".pt", ".safetensors"),
    "sdxl": (".safetensors",),
    "extended": (".safetensors",),
}


class ExportError(UserError, ValueError):
    """An export or import request that cannot be served; the message says what to do."""


MODELSPEC_VERSION = "1.0.0"
_IMPLEMENTATIONS = {  # modelspec.implementation: whose loader the tensor names follow
    "diffusers": "diffusers",
    "a1111": "https://github.com/AUTOMATIC1111/stable-diffusion-webui",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "extended": "jax_inversion",
}


def describe_method(config: Mapping) -> str:
    """A run's method in words, from its config: ``textual inversion``, or its weighted terms and phases
    (``diffusion 1 + anchor 0.95``, ``...; subject phase <subj>``, ``...; 4 timestep stages, K/V``)."""
    terms = {k: v for k, v in (config.get("loss") or {}).items() if v}
    data = config.get("data") or {}
    extras = []
    if data.get("subject_token"):
        extras.append(f"subject phase {data['subject_token']}")
    if int(data.get("num_stages") or 1) > 1:
        extras.append(f"{data['num_stages']} timestep stages" + (", K/V" if data.get("separate_kv") else ""))
    if terms in ({}, {"diffusion": 1.0}) and not extras:
        return "textual inversion"
    return "; ".join([" + ".join(f"{k} {v:g}" for k, v in terms.items())] + extras)


def trained_clip_skip(metadata: Mapping) -> int:
    """The clip skip an embedding file records (``jax_inversion.clip_skip``); 1 when it records none."""
    try:
        return max(1, int(metadata.get("jax_inversion.clip_skip", 1)))
    except (TypeError, ValueError):
        return 1


def embedding_metadata(meta: Mapping, step: int, token: str, num_vectors: int, fmt: str, trigger: str) -> dict[str, str]:
    """Header metadata of an exported file (strings): modelspec's keys (an ``architecture`` ending in
    ``textual-inversion``, title, trigger phrase, date, resolution, prediction type; the tensors' hash is added
    by the writer) and ours (``jax_inversion.*``: base model name and sha256, steps, vectors, method, clip skip).

    ``meta`` is a checkpoint's metadata; a run saved before base models were recorded says ``unknown``."""
    config = meta.get("config") or {}
    base = meta.get("base_model") or {}
    family = base.get("architecture") or ("stable-diffusion-xl-v1-base" if len(meta.get("embedding_dims") or {}) > 1
                                          else f"custom-{meta.get('embedding_dim', 'unknown')}")
    resolution = base.get("resolution") or (config.get("data") or {}).get("resolution") or 0
    prediction = base.get("prediction_type", "epsilon")
    method = describe_method(config)
    out = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{family}/textual-inversion",
        "modelspec.implementation": _IMPLEMENTATIONS[fmt],
        "modelspec.title": trigger,
        "modelspec.description": f"{method} of {token} ({num_vectors} vectors) on {base.get('name', 'an unrecorded base model')}, "
                                 f"{step} steps, with jax_inversion",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "modelspec.trigger_phrase": trigger,
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else prediction,
        "jax_inversion.token": token,
        "jax_inversion.base_model": base.get("name", "unknown"),
        "jax_inversion.base_model_sha256": base.get("sha256") or "unknown",
        "jax_inversion.steps": str(int(step)),
        "jax_inversion.vectors": str(int(num_vectors)),
        "jax_inversion.method": method,
        "jax_inversion.clip_skip": str(int(config.get("clip_skip", 1))),
    }
    if resolution:
        out["modelspec.resolution"] = f"{resolution}x{resolution}"
    return out


def a1111_checkpoint_fields(meta: Mapping) -> tuple[Optional[str], Optional[str]]:
    """A1111's ``(sd_checkpoint, sd_checkpoint_name)``: the base file's short hash (first 10 hex digits of its
    sha256, A1111's "AutoV2") and name. A diffusers folder has no such file: its hash stays None."""
    base = meta.get("base_model") or {}
    single_file = str(base.get("path", "")).lower().endswith((".safetensors", ".ckpt"))
    sha = base.get("sha256")
    return (sha[:10] if single_file and sha else None), base.get("name")


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
    meta: Optional[Mapping] = None,
) -> str:
    """Writes one concept's rows (``{encoder: [n, d]}``) in ``fmt``; the extension picks the container.

    ``meta`` (the run's checkpoint metadata) adds :func:`embedding_metadata` to the file: the safetensors
    header, or the ``.pt``'s A1111 fields (``sd_checkpoint``, ``sd_checkpoint_name``) and a ``metadata`` dict;
    the trigger phrase is ``token`` for diffusers' loader, the file name for A1111's."""
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
    trigger = token if fmt in ("diffusers", "sdxl", "extended") else os.path.splitext(os.path.basename(path))[0]
    num_vectors = int(np.shape(rows.get("base", rows.get("text_encoder")))[-2])
    metadata = embedding_metadata(meta, step, token, num_vectors, fmt, trigger) if meta is not None else None
    if fmt == "extended":
        _atomic_write(path, overwrite, lambda tmp: write_extended(tmp, {token: rows}, metadata=metadata))
        return path
    from safetensors.numpy import save_file

    if fmt == "sdxl":
        tensors = {"clip_l": rows["text_encoder"], "clip_g": rows["text_encoder_2"]}
    elif fmt == "diffusers":
        tensors = {token: rows["text_encoder"]}
    else:  # a1111
        tensors = {"emb_params": rows["text_encoder"]}
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if metadata is not None:
        metadata["modelspec.hash_sha256"] = tensors_sha256(tensors)
    if ext == ".safetensors":
        write = lambda tmp: save_file(tensors, tmp, metadata=metadata)
    elif fmt == "diffusers":
        torch = _torch()
        write = lambda tmp: torch.save({token: torch.from_numpy(rows["text_encoder"].copy())}, tmp)
    else:  # a1111 .pt: the fields A1111 reads (its sd_checkpoint is the base file's short hash)
        torch = _torch()
        sd_checkpoint, sd_checkpoint_name = a1111_checkpoint_fields(meta or {})
        payload = {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.from_numpy(rows["text_encoder"].copy())},
            "name": token,  # diffusers' loader registers this token; A1111 triggers by the file name
            "step": int(step),
            "sd_checkpoint": sd_checkpoint,
            "sd_checkpoint_name": sd_checkpoint_name,
        }
        if metadata is not None:
            payload["metadata"] = metadata
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


def trigger_file_name(token: str) -> str:
    """The file stem ``--all`` gives a concept, which A1111 then uses as its trigger word: the token itself when
    it is already a plain word (``sks``), else its safe stem marked ``-ti`` (``<cat>`` -> ``cat-ti``), so that
    the ordinary word ``cat`` in a prompt is never replaced by the embedding."""
    stem = file_name_for(token)
    return stem if stem == token else f"{stem}-ti"


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
            metadata = embedding_metadata(meta, step, name, int(concept["text_encoder"].shape[-2]), fmt, name)
            _atomic_write(path, True, lambda tmp: write_extended(tmp, {name: extended_parts(concept)}, steps, metadata))
        else:
            write_embedding_file(path, fmt, name, concept, step=step, overwrite=True, meta=meta)
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
            "(jax_inversion.artifacts.torch.ExtendedTokens loads it into diffusers)"
        )
    if fmt == "extended":
        concepts = {name: extended_parts(r) for name, r in concepts.items()}
    if fmt == "extended" and not all_concepts:  # one file holds every token of the run (e.g. Lego's <subj> <cpt>)
        if "text_encoder_2" in rows:
            raise ExportError("--format extended holds one text encoder's rows; this run has two (SDXL): use --format sdxl")
        steps = int(meta.get("num_train_timesteps", 1000))
        names = ", ".join(concepts)
        vectors = sum(int(np.shape(r["base"] if "base" in r else r["text_encoder"])[-2]) for r in concepts.values())
        metadata = embedding_metadata(meta, step, names, vectors, fmt, names)
        _atomic_write(out, overwrite, lambda tmp: write_extended(tmp, concepts, steps, metadata))
        return [out]
    if not all_concepts and len(concepts) > 1:
        raise ExportError(
            f"the run has {len(concepts)} concepts ({', '.join(concepts)}): pass --all with --out DIR, "
            "or --format extended for one file"
        )
    written = []
    for name, concept_rows in concepts.items():
        path = os.path.join(out, trigger_file_name(name) + _EXTENSIONS[fmt][0]) if all_concepts else out
        written.append(write_embedding_file(path, fmt, name, concept_rows, step=step, overwrite=overwrite, meta=meta))
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
                if metadata.get("format") == "jax_inversion.artifacts.extended":  # parsed by read_extended
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
    if metadata.get("format") == "jax_inversion.artifacts.extended":
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


_FAMILIES = {(768,): "SD 1.x", (1024,): "SD 2.x", (768, 1280): "SDXL"}


def describe_file(path: str) -> dict[str, Any]:
    """What an embedding file holds, ours or another tool's: ``{"file", "format", "tokens": {token: "n x d"},
    "model family", A1111's fields, header metadata}`` (for ``jax-inversion export --info``)."""
    tensors, metadata = read_tensors(path)
    info: dict[str, Any] = {"file": path}
    if metadata.get("format") == "jax_inversion.artifacts.extended":
        parts = read_extended(path)
        info["format"] = "jax_inversion extended"
        info["tokens"] = {t: f"{p['base'].shape[0]} x {p['base'].shape[1]}" + (f", {p['stages']} stages" if p["stages"] else "")
                          for t, p in parts.items()}
        widths = tuple(sorted({int(p["base"].shape[-1]) for p in parts.values()}))
    else:
        parsed = read_embedding_file(path)
        rows = {k: np.asarray(v) for k, v in parsed["rows"].items()}
        if "string_to_param" in tensors:
            info["format"] = "A1111 .pt"
            for key in ("name", "step", "sd_checkpoint", "sd_checkpoint_name"):
                info[key] = tensors.get(key)
            metadata = {k: str(v) for k, v in (tensors.get("metadata") or {}).items()}
        elif "text_encoder_2" in rows:
            info["format"] = "SDXL (clip_l/clip_g)"
        elif set(tensors) == {"emb_params"}:
            info["format"] = "A1111/kohya safetensors (emb_params)"
        else:
            info["format"] = "diffusers"
        shapes = {enc: r.reshape(-1, r.shape[-1]).shape for enc, r in rows.items()}
        token = parsed["token"] or "(unnamed: A1111 uses the file name)"
        info["tokens"] = {token: ", ".join(f"{n} x {d}" for n, d in shapes.values())}
        widths = tuple(d for _, d in shapes.values())
    info["model family"] = _FAMILIES.get(widths, f"unknown (embedding widths {', '.join(map(str, widths))})")
    spec_keys = {k: v for k, v in metadata.items() if k not in ("format", "version", "spec")}
    if spec_keys:
        info["metadata"] = spec_keys
    return info


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
