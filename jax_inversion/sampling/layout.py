"""Layout model of Compositional Inversion: two words' input embeddings -> two boxes.

``LayoutMLP(e_i, e_j) -> (box_i, box_j)``, boxes as ``[x0, y0, x1, y1]`` fractions of the
image. It is trained from a JSONL file (``{"words": [a, b], "boxes": [box_a, box_b]}`` a
line), saved as safetensors, and read back as a :class:`LayoutPredictor`. Without a layout
model the sampler uses ``FIXED_BOXES``, the released code's left/right split.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_inversion.core.errors import UserError
from jax_inversion.core.files import atomic_write
from jax_inversion.objectives.terms import COCO_CLASSES
from jax_inversion.text.tokens import word_embedding

FORMAT = "jax_inversion.sampling.layout"
FIXED_BOXES = ([0.1, 0.2, 0.5, 0.8], [0.6, 0.2, 0.95, 0.8])
MIN_SIZE = 0.01
SMOOTH_L1_BETA = 0.05
_EXAMPLE = '{"words": ["cat", "dog"], "boxes": [[0.1, 0.2, 0.5, 0.8], [0.6, 0.2, 0.95, 0.8]]}'


class LayoutError(UserError, ValueError):
    """A layout data file, model file or request that cannot be used; the message says what to do."""


def rms_normalize(x: jax.Array) -> jax.Array:
    """Each embedding scaled to unit RMS, so models with small or learned (large) rows look alike."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-8)


def boxes_from_logits(raw: jax.Array) -> jax.Array:
    """``[..., 4]`` logits -> valid boxes: sizes in ``[MIN_SIZE, 1]``, placed so the box stays inside."""
    size = MIN_SIZE + (1.0 - MIN_SIZE) * nn.sigmoid(raw[..., 2:])
    start = (1.0 - size) * nn.sigmoid(raw[..., :2])
    return jnp.clip(jnp.concatenate([start, start + size], axis=-1), 0.0, 1.0)


class LayoutMLP(nn.Module):
    """``concat(e_i, e_j)`` ``[B, 2d]`` -> boxes ``[B, 2, 4]`` (``[x0, y0, x1, y1]``, x0 < x1, y0 < y1)."""

    hidden: int = 256
    layers: int = 2

    @nn.compact
    def __call__(self, pair: jax.Array) -> jax.Array:
        d = pair.shape[-1] // 2
        x = jnp.concatenate([rms_normalize(pair[..., :d]), rms_normalize(pair[..., d:])], axis=-1)
        for _ in range(self.layers):
            x = nn.gelu(nn.Dense(self.hidden)(x))
        raw = nn.Dense(8)(x).reshape(*pair.shape[:-1], 2, 4)
        return boxes_from_logits(raw)


def _check_box(where: str, index: int, box: Any) -> list[float]:
    if not isinstance(box, list) or len(box) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in box
    ):
        raise LayoutError(f"{where}: box {index} must be 4 numbers [x0, y0, x1, y1], got {json.dumps(box)}: e.g. {_EXAMPLE}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise LayoutError(
            f"{where}: box {index} {json.dumps(box)} has coordinates outside [0, 1]: give fractions of the image size, not pixels"
        )
    if not (x0 < x1 and y0 < y1):
        raise LayoutError(f"{where}: box {index} {json.dumps(box)} needs x0 < x1 and y0 < y1: write boxes as [x0, y0, x1, y1]")
    return [x0, y0, x1, y1]


def parse_layout_record(where: str, line: str) -> dict:
    """One JSONL line -> ``{"words": [a, b], "boxes": [box_a, box_b]}``, or a LayoutError naming ``where``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise LayoutError(f"{where}: not valid JSON ({e.msg}): write one object per line, e.g. {_EXAMPLE}") from None
    if not isinstance(record, dict) or "words" not in record or "boxes" not in record:
        raise LayoutError(f'{where}: expected an object with "words" and "boxes": e.g. {_EXAMPLE}')
    words, boxes = record["words"], record["boxes"]
    if not isinstance(words, list) or len(words) != 2 or not all(isinstance(w, str) and w.strip() for w in words):
        raise LayoutError(f'{where}: "words" must be a list of 2 non-empty strings, got {json.dumps(words)}: one pair per line')
    if not isinstance(boxes, list) or len(boxes) != 2:
        raise LayoutError(f'{where}: "boxes" must be a list of 2 boxes (one per word), got {json.dumps(boxes)}: e.g. {_EXAMPLE}')
    return {"words": list(words), "boxes": [_check_box(where, i, box) for i, box in enumerate(boxes)]}


def read_layout_jsonl(path: str) -> list[dict]:
    """All records of a layout JSONL file (blank lines skipped), each line validated."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise LayoutError(f"{path} is missing: pass --data a JSONL file with lines like {_EXAMPLE}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LayoutError(f"cannot read {path} ({type(e).__name__}): pass a UTF-8 JSONL text file") from None
    records = [parse_layout_record(f"{path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise LayoutError(f"{path} has no records: add lines like {_EXAMPLE}")
    return records


def pair_arrays(records: Sequence[dict], tokenizer, table) -> tuple[np.ndarray, np.ndarray]:
    """Records -> inputs ``[N, 2d]`` (``concat(e_i, e_j)``) and target boxes ``[N, 2, 4]``."""
    cache: dict[str, np.ndarray] = {}

    def embed(word):
        if word not in cache:
            cache[word] = word_embedding(tokenizer, table, word)
        return cache[word]

    x = np.stack([np.concatenate([embed(r["words"][0]), embed(r["words"][1])]) for r in records])
    y = np.asarray([r["boxes"] for r in records], np.float32)
    return x.astype(np.float32), y


def swap_augment(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Adds each pair in the other order (words swapped, boxes swapped): the layout has no first word."""
    d = x.shape[-1] // 2
    swapped = np.concatenate([x[:, d:], x[:, :d]], axis=-1)
    return np.concatenate([x, swapped]), np.concatenate([y, y[:, ::-1]])


def smooth_l1(pred: jax.Array, target: jax.Array, beta: float = SMOOTH_L1_BETA) -> jax.Array:
    """Mean smooth L1 (L1 beyond ``beta``, quadratic within): box units, steady near the target."""
    diff = jnp.abs(pred - target)
    return jnp.mean(jnp.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta))


def train_layout_model(
    records: Sequence[dict],
    tokenizer,
    table,
    steps: int = 2000,
    learning_rate: float = 1e-3,
    seed: int = 0,
    hidden: int = 256,
    batch_size: int = 256,
) -> tuple[Any, np.ndarray]:
    """Fits a LayoutMLP with Adam on smooth L1; returns ``(params, per-step losses)``."""
    import optax

    if steps < 0 or batch_size < 1 or hidden < 1 or not learning_rate > 0:
        raise LayoutError(
            f"steps={steps}, batch_size={batch_size}, hidden={hidden}, learning_rate={learning_rate}: "
            "use steps >= 0 and positive batch_size, hidden and learning_rate"
        )
    x, y = swap_augment(*pair_arrays(records, tokenizer, table))
    x, y = jnp.asarray(x), jnp.asarray(y)
    module = LayoutMLP(hidden=hidden)
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    params = module.init(init_key, x[:1])["params"]
    optimizer = optax.adam(learning_rate)
    full_batch = x.shape[0] <= batch_size

    def loss_fn(p, xb, yb):
        return smooth_l1(module.apply({"params": p}, xb), yb)

    def step(carry, key):
        p, opt_state = carry
        if full_batch:
            xb, yb = x, y
        else:
            idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
            xb, yb = x[idx], y[idx]
        loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    @jax.jit
    def fit(p, keys):
        return jax.lax.scan(step, (p, optimizer.init(p)), keys)

    (params, _), losses = fit(params, jax.random.split(data_key, steps))
    return jax.device_get(params), np.asarray(losses)


def model_config(params) -> dict:
    """``{"hidden", "layers", "embedding_dim"}`` read off a LayoutMLP's param shapes."""
    names = sorted(params, key=lambda n: int(n.rsplit("_", 1)[-1]))
    return {
        "hidden": int(params[names[0]]["kernel"].shape[1]),
        "layers": len(names) - 1,
        "embedding_dim": int(params[names[0]]["kernel"].shape[0]) // 2,
    }


def save_layout_model(path: str, params, meta: Optional[dict] = None, overwrite: bool = False) -> str:
    """Writes params (``Dense_0/kernel``, ...) as safetensors with the config and ``meta`` as JSON metadata."""
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten_dict(params, sep="/").items()}
    metadata = {"format": FORMAT, "config": json.dumps(model_config(params)), "meta": json.dumps(meta or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite, exists_error=LayoutError)
    return path


def _as_vector(e, dim: int, name: str) -> np.ndarray:
    """``[d]`` or ``[n, d]`` (multi-token word, multi-vector placeholder: rows averaged) -> ``[d]``."""
    e = np.asarray(e, np.float32)
    if e.ndim == 2:
        e = e.mean(axis=0)
    if e.shape != (dim,):
        raise LayoutError(
            f"{name} has shape {e.shape} but the layout model expects ({dim},): use a layout model trained on this text encoder"
        )
    if not np.all(np.isfinite(e)):
        raise LayoutError(f"{name} has non-finite values: check the embedding it came from")
    return e


@dataclasses.dataclass
class LayoutPredictor:
    """A loaded layout model: ``boxes(e_i, e_j) -> (box_i, box_j)`` as numpy ``[4]`` arrays."""

    params: Any
    hidden: int
    layers: int
    embedding_dim: int
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        module = LayoutMLP(hidden=self.hidden, layers=self.layers)
        self._apply = jax.jit(lambda p, x: module.apply({"params": p}, x))

    def boxes(self, e_i, e_j) -> tuple[np.ndarray, np.ndarray]:
        pair = np.concatenate([_as_vector(e_i, self.embedding_dim, "e_i"), _as_vector(e_j, self.embedding_dim, "e_j")])
        out = np.asarray(self._apply(self.params, pair[None]))[0]
        return out[0], out[1]


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, d, n = config["hidden"], config["embedding_dim"], config["layers"]
    dims = [2 * d] + [h] * n + [8]
    shapes = {}
    for i in range(n + 1):
        shapes[f"Dense_{i}/kernel"] = (dims[i], dims[i + 1])
        shapes[f"Dense_{i}/bias"] = (dims[i + 1],)
    return shapes


def load_layout_model(path: str) -> LayoutPredictor:
    """Reads a file written by :func:`save_layout_model`; anything else is a LayoutError."""
    from flax.traverse_util import unflatten_dict
    from safetensors import safe_open

    hint = "train one with `jax-inversion train-layout`"
    if not os.path.isfile(path):
        raise LayoutError(f"layout model {path} is missing: {hint}")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise LayoutError(f"cannot read {path} as safetensors ({type(e).__name__}): {hint}") from None
    if metadata.get("format") != FORMAT:
        raise LayoutError(f"{path} is not a layout model (format {metadata.get('format')!r}, expected {FORMAT!r}): {hint}")
    try:
        config = {k: int(v) for k, v in json.loads(metadata["config"]).items()}
        meta = json.loads(metadata.get("meta", "{}"))
        expected = _expected_shapes(config)
    except (KeyError, TypeError, ValueError):
        raise LayoutError(f"{path} has a damaged layout config in its metadata: {hint}") from None
    actual = {k: tuple(v.shape) for k, v in tensors.items()}
    if actual != expected:
        raise LayoutError(f"{path} tensors do not match its config {config}: the file is damaged; {hint}")
    params = unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in tensors.items()}, sep="/")
    return LayoutPredictor(params, config["hidden"], config["layers"], config["embedding_dim"], meta)


def fixed_boxes() -> tuple[np.ndarray, np.ndarray]:
    """The released code's boxes, as numpy arrays."""
    return np.asarray(FIXED_BOXES[0], np.float32), np.asarray(FIXED_BOXES[1], np.float32)


def nearest_word(rows, tokenizer, table, words: Sequence[str]) -> str:
    """The word of ``words`` whose input embedding is nearest (cosine) to ``rows`` (``[d]`` or ``[n, d]``,
    averaged). Compositional Inversion maps a learned token to its nearest noun before predicting boxes."""
    if not words:
        raise LayoutError("no candidate nouns to map the learned token to: give the layout model's words")
    target = np.asarray(rows, np.float32).reshape(-1, np.shape(table)[-1]).mean(axis=0)
    candidates = np.stack([word_embedding(tokenizer, table, w) for w in words]).astype(np.float32)
    cosine = candidates @ target / (np.linalg.norm(candidates, axis=-1) * np.linalg.norm(target) + 1e-12)
    return words[int(np.argmax(cosine))]


def layout_nouns(predictor: Optional["LayoutPredictor"]) -> tuple[str, ...]:
    """The nouns a learned token may map to: the layout model's training words (``meta["words"]``),
    else the 80 COCO classes (Compositional Inversion's anchor vocabulary)."""
    words = (predictor.meta or {}).get("words") if predictor is not None else None
    return tuple(words) if words else COCO_CLASSES


def predict_boxes_from_embeddings(predictor: Optional[LayoutPredictor], e_i, e_j) -> tuple[np.ndarray, np.ndarray]:
    """Boxes for two embeddings (e.g. a placeholder's learned rows); ``FIXED_BOXES`` without a predictor."""
    if predictor is None:
        return fixed_boxes()
    return predictor.boxes(e_i, e_j)


def predict_boxes(
    model: Union[str, LayoutPredictor, None], tokenizer, table, word_i: str, word_j: str
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes for two words from a layout model (path or loaded); ``FIXED_BOXES`` when ``model`` is None."""
    if model is None:
        return fixed_boxes()
    predictor = load_layout_model(model) if isinstance(model, str) else model
    return predictor.boxes(word_embedding(tokenizer, table, word_i), word_embedding(tokenizer, table, word_j))
