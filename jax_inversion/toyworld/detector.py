"""The world's detector: a small CNN giving, per image, the presence of every attribute and object.

Trained on scenes of the whole world (stars, checkered, melting included: the ground truth is
known for every scene), with blur and noise so it also reads the smoother images a
diffusion model decodes; with ``config.detector.vae_from`` half of each batch is the scenes
as that model's VAE reconstructs them, the very decoder every generated image comes from.
Its pooled features serve as the image-alignment space (the toy analogue of CLIP/DINO
image features).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from jax_inversion.models.loading import load_pretrained
from jax_inversion.toyworld import world

FEATURES = 128


def label_names() -> list[str]:
    """shape:*, colour:*, texture:* (not plain), state:* (not normal), object:<colour> <shape>."""
    names = [f"shape:{s}" for s in world.ALL.shapes] + [f"colour:{c}" for c in world.ALL.colours]
    names += [f"texture:{t}" for t in world.ALL.textures if t != world.PLAIN]
    names += [f"state:{s}" for s in world.ALL.states if s != world.NORMAL]
    names += [f"object:{c} {s}" for c in world.ALL.colours for s in world.ALL.shapes]
    return names


LABELS = label_names()
LABEL_INDEX = {name: i for i, name in enumerate(LABELS)}


def labels_of(scene: world.Scene) -> np.ndarray:
    """Multi-hot ``[len(LABELS)]`` ground truth of a scene."""
    y = np.zeros(len(LABELS), np.float32)
    for o in scene.objects:
        for name in (f"shape:{o.shape}", f"colour:{o.colour}", f"texture:{o.texture}", f"state:{o.state}", f"object:{o.colour} {o.shape}"):
            if name in LABEL_INDEX:
                y[LABEL_INDEX[name]] = 1.0
    return y


class DetectorNet(nn.Module):
    """Four stride-2 conv stages, features max-pooled over positions (presence anywhere), an MLP head."""

    num_labels: int

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images ``[B, 64, 64, 3]`` in [0, 1] -> (logits ``[B, L]``, features ``[B, FEATURES]``)."""
        x = images
        for channels in (32, 64, 128, 128):
            x = nn.Conv(channels, (3, 3), strides=2)(x)
            x = nn.GroupNorm(num_groups=8)(x)
            x = nn.gelu(x)
            x = nn.Conv(channels, (3, 3))(x)
            x = nn.gelu(x)
        features = jnp.max(x, axis=(1, 2))
        hidden = nn.gelu(nn.Dense(FEATURES)(features))
        return nn.Dense(self.num_labels)(hidden), features


@dataclasses.dataclass
class Detector:
    net: DetectorNet
    params: dict
    labels: list[str]

    def __post_init__(self):
        self._apply = jax.jit(lambda p, x: self.net.apply({"params": p}, x))

    def __call__(self, images: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images ``[N, 64, 64, 3]`` -> (probabilities ``[N, L]``, features ``[N, F]``)."""
        probs, feats = [], []
        for start in range(0, len(images), chunk):
            logits, features = self._apply(self.params, jnp.asarray(images[start:start + chunk], jnp.float32) / 255.0)
            probs.append(np.asarray(jax.nn.sigmoid(logits)))
            feats.append(np.asarray(features))
        return np.concatenate(probs), np.concatenate(feats)

    def index(self, name: str) -> int:
        return self.labels.index(name)


def _augment(images: jax.Array, rng: jax.Array) -> jax.Array:
    """Random blur (3x3 box, half the batch) and pixel noise: generated images are smoother and noisier."""
    rng_blur, rng_noise, rng_scale = jax.random.split(rng, 3)
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, dy:dy + images.shape[1], dx:dx + images.shape[2]] for dy in range(3) for dx in range(3)) / 9.0
    use_blur = jax.random.uniform(rng_blur, (images.shape[0], 1, 1, 1)) < 0.5
    x = jnp.where(use_blur, blurred, images)
    scale = jax.random.uniform(rng_scale, (images.shape[0], 1, 1, 1), maxval=0.06)
    return jnp.clip(x + scale * jax.random.normal(rng_noise, x.shape), 0.0, 1.0)


def vae_roundtrip(model_dir: str) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images -> the same images encoded (posterior mean) and decoded by ``model_dir``'s VAE."""
    model = load_pretrained(model_dir, components=("vae",))
    roundtrip = jax.jit(lambda x: model.vae.apply({"params": model.vae_params}, model.vae.apply(
        {"params": model.vae_params}, x.astype(jnp.float32) / 127.5 - 1.0, method="encode")[0], method="decode"))

    def apply(images: np.ndarray, chunk: int = 500) -> np.ndarray:
        out = [np.asarray(roundtrip(jnp.asarray(images[i:i + chunk]))) for i in range(0, len(images), chunk)]
        return np.clip(np.round((np.concatenate(out) + 1.0) * 127.5), 0, 255).astype(np.uint8)

    return apply


def train_detector(config, directory: str, log: Callable) -> str:
    """Trains on ``config.detector.num_scenes`` scenes of the whole world; writes ``directory``."""
    cfg = config.detector
    roundtrip = vae_roundtrip(cfg.vae_from) if cfg.vae_from else None  # a bad path fails before minutes of rendering
    scene_list = world.scenes(config.seed + 100, cfg.num_scenes, world.ALL)
    images, _ = world.render_all(scene_list, seed=config.seed + 100)
    targets = jnp.asarray(np.stack([labels_of(s) for s in scene_list]))
    data = jnp.asarray(images)
    reconstructed = jnp.asarray(roundtrip(images)) if roundtrip else data
    net = DetectorNet(len(LABELS))
    rng = jax.random.PRNGKey(config.seed + 2)
    params = jax.jit(net.init)(rng, jnp.zeros((1, world.SIZE, world.SIZE, 3)))["params"]  # one compile, not one per op
    optimizer = optax.adamw(optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps, alpha=0.05), weight_decay=1e-4)
    opt_state = jax.jit(optimizer.init)(params)

    @jax.jit
    def step(params, opt_state, rng):
        rng_index, rng_aug, rng_source = jax.random.split(rng, 3)
        index = jax.random.randint(rng_index, (cfg.batch_size,), 0, data.shape[0])
        through_vae = jax.random.uniform(rng_source, (cfg.batch_size, 1, 1, 1)) < 0.5
        x = _augment(jnp.where(through_vae, reconstructed[index], data[index]).astype(jnp.float32) / 255.0, rng_aug)

        def loss_fn(params):
            logits, _ = net.apply({"params": params}, x)
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets[index]))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss}

    for i in range(cfg.steps):
        params, opt_state, metrics = step(params, opt_state, jax.random.fold_in(rng, i))
        if (i + 1) % config.log_every == 0 or i + 1 == cfg.steps:
            log("detector", i + 1, metrics)
    save_detector(directory, params)
    held_out = world.scenes(config.seed + 200, cfg.eval_scenes, world.ALL)
    trained = Detector(net, params, LABELS)
    log("detector_eval", cfg.steps, detector_accuracy(trained, held_out))
    if roundtrip:
        log("detector_eval_through_vae", cfg.steps, detector_accuracy(trained, held_out, roundtrip))
    return directory


def detector_accuracy(detector: Detector, scene_list: Sequence[world.Scene],
                      transform: Callable[[np.ndarray], np.ndarray] = None) -> dict:
    """On fresh scenes (optionally passed through ``transform``, e.g. a VAE): the rate of scenes
    with every label right, and per label group its precision, recall and rate of scenes with
    the whole group right."""
    images, _ = world.render_all(scene_list, seed=7)
    probs, _ = detector(transform(images) if transform else images)
    truth = np.stack([labels_of(s) for s in scene_list]) > 0.5
    predicted = probs > 0.5
    out = {"all_labels": float((predicted == truth).all(axis=1).mean())}
    for group in ("shape", "colour", "texture", "state", "object"):
        columns = [i for i, n in enumerate(detector.labels) if n.startswith(group + ":")]
        p, t = predicted[:, columns], truth[:, columns]
        out[group] = float((p == t).all(axis=1).mean())
        out[f"{group}_precision"] = float((p & t).sum() / max(p.sum(), 1))
        out[f"{group}_recall"] = float((p & t).sum() / max(t.sum(), 1))
    return out


def save_detector(directory: str, params) -> None:
    os.makedirs(directory, exist_ok=True)
    flat = {".".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
    save_file(flat, os.path.join(directory, "detector.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"labels": LABELS, "features": FEATURES}, f, indent=2)


def load_detector(directory: str) -> Detector:
    with open(os.path.join(directory, "config.json")) as f:
        labels = json.load(f)["labels"]
    flat = load_file(os.path.join(directory, "detector.safetensors"))
    params = traverse_util.unflatten_dict({tuple(k.split(".")): jnp.asarray(v) for k, v in flat.items()})
    return Detector(DetectorNet(len(labels)), params, labels)
