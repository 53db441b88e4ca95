"""Sampling with learned tokens: one jit-compiled loop, classifier-free guidance, layout guidance.

Learned tokens come from a run's checkpoint (:func:`tokens_from_run`) or an exported file
(:func:`tokens_from_file`), never from train-loop objects. Every token layout the project
trains works: multi-vector tokens, several concepts (Lego's ``<subj> <cpt>``), and
per-timestep-stage key/value rows (SeFi-IDE), whose stage follows the current timestep.

Layout guidance (Compositional Inversion's spatial inversion, after Chen et al.'s
layout guidance, as their released ``layout_control.py``): during the first
``guidance_steps`` steps, up to ``max_iterations`` gradient steps on the latent lower
:func:`losses.layout_guidance_loss` (per head, per token ``(1 - inside/total)^2``, averaged)
of the guided tokens' cross-attention maps in the mid block and the first up block at 16x16,
stopping for good (no guidance at any later step) once that loss is at most ``threshold`` (0.2):
the code computes it once before its step loop (:func:`layout_guide`). With one learned token in
a prompt of two objects and no layout words, the token goes in the code's left box and the
other object's words in its right box (:func:`default_layout`). The code steps ``latents -= grad *
sigma^2`` under LMS (sigma-space latents): the same here for Euler (and Euler a), and the equivalent
``x -= grad * sigma^2 / (1 + sigma^2)`` (= ``1 - alpha_bar``) for DDIM and DPM-Solver, whose
latents are ``x = z / sqrt(1 + sigma^2)``. ``LayoutGuidance(loss="location", layers="all")``
is the earlier variant: unsquared, heads averaged, every 16x16 layer (down blocks too).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from jax_inversion.artifacts.checkpoints import read_run
from jax_inversion.artifacts.export import ExportError, read_embedding_file, read_tensors, run_concepts, trained_clip_skip
from jax_inversion.artifacts.extended import read_extended, stage_of
from jax_inversion.core.errors import UserError
from jax_inversion.core.files import atomic_write
from jax_inversion.core.sharding import make_mesh
from jax_inversion.data import images as data_lib
from jax_inversion.diffusion.samplers import Sampler, make_sampler, sample_loop
from jax_inversion.models.loading import Pretrained
from jax_inversion.models.unet import Conditioning, cross_attention_layers
from jax_inversion.models.vae import unscale_latents
from jax_inversion.objectives import losses
from jax_inversion.sampling import layout as layout_lib
from jax_inversion.text import tokens as tokens_lib
from jax_inversion.text.conditioning import encoders_of, frozen_params, input_embedding_table, run_unet, text_conditioning, vae_factor

log = logging.getLogger("jax_inversion")


class SamplingError(UserError, ValueError):
    """A sampling request that cannot be served; the message says what to do."""


@dataclasses.dataclass
class LearnedTokens:
    """Learned rows and the strings they belong to, however they were stored."""

    placeholders: dict  # {placeholder: [vector token strings]} in row order
    rows: dict  # {encoder: [n, d]} or {encoder: [S, K, n, d]} (per-stage key/value rows)
    num_train_timesteps: int = 1000
    clip_skip: int = 1  # the text-encoder layer they were trained with (conditioning.with_clip_skip)

    @property
    def tokens(self) -> list[str]:
        return [t for vectors in self.placeholders.values() for t in vectors]

    @property
    def num_stages(self) -> int:
        r = self.rows["text_encoder"]
        return int(r.shape[0]) if r.ndim == 4 else 1


def tokens_from_checkpoint(embeddings: Mapping, meta: Mapping) -> LearnedTokens:
    """Learned tokens of a checkpoint's rows and metadata (batch-inversion concepts by their names)."""
    rows = {k: np.asarray(v, np.float32) for k, v in embeddings.items()}
    steps = int(meta.get("num_train_timesteps", 1000))
    clip_skip = int((meta.get("config") or {}).get("clip_skip", 1))
    if meta.get("concept_batch"):  # [C, n, d]: each concept becomes its own token strings
        n = rows["text_encoder"].shape[-2]
        order = sorted(meta["concept_batch"], key=lambda c: c["index"])
        placeholders = {c["name"]: tokens_lib.vector_tokens(c["name"], n) for c in order}
        return LearnedTokens(placeholders, {k: v.reshape(-1, v.shape[-1]) for k, v in rows.items()}, steps, clip_skip)
    tokens = meta["layout"]["tokens"]
    placeholders = {c["name"]: tokens[c["rows"][0] : c["rows"][1]] for c in run_concepts(meta)}
    return LearnedTokens(placeholders, rows, steps, clip_skip)


def tokens_from_run(workdir: str, step: Optional[int] = None) -> tuple[str, LearnedTokens]:
    """``(model path, tokens)`` of a run's checkpoint (latest or ``step``)."""
    model, _, learned = run_source(workdir, step)
    return model, learned


def run_source(workdir: str, step: Optional[int] = None) -> tuple[str, str, LearnedTokens]:
    """``(model path, its config.model_tokenizer ("" = the model's own), tokens)`` of a run's checkpoint."""
    _, state, meta = read_run(workdir, step)
    tokenizer = str((meta.get("config") or {}).get("model_tokenizer") or "")
    return meta["model"], tokenizer, tokens_from_checkpoint(state["embeddings"], meta)


def tokens_from_file(path: str, token: Optional[str] = None) -> LearnedTokens:
    """Tokens of an exported file (diffusers, A1111, SDXL or extended); ``token`` names a file without one."""
    _, metadata = read_tensors(path)
    if metadata.get("format") == "jax_inversion.artifacts.extended":
        parts = read_extended(path)
        placeholders, staged, plain = {}, [], []
        for name, p in parts.items():
            placeholders[name] = tokens_lib.vector_tokens(name, p["base"].shape[0])
            if p["stages"]:
                staged.append(np.stack([p["key"], p["value"]], axis=1))  # [S, 2, n, d]
            plain.append(p["base"])
            if p["layers"]:
                raise SamplingError(f"{path}: per-layer tokens are not supported by the sampler yet; export without them")
        if staged and len(staged) != len(parts):
            raise SamplingError(f"{path} mixes per-stage and plain tokens: sample them from separate files")
        rows = np.concatenate(staged, axis=2) if staged else np.concatenate(plain)
        steps = next(iter(parts.values()))["num_train_timesteps"]
        return LearnedTokens(placeholders, {"text_encoder": rows}, steps, trained_clip_skip(metadata))
    parsed = read_embedding_file(path)
    name = token or parsed["token"]
    if not name:
        raise ExportError(f"{path} does not name its token: pass --token '<name>'")
    rows = {k: np.asarray(v, np.float32).reshape(-1, np.asarray(v).shape[-1]) for k, v in parsed["rows"].items()}
    n = rows["text_encoder"].shape[0]
    return LearnedTokens({name: tokens_lib.vector_tokens(name, n)}, rows, clip_skip=trained_clip_skip(metadata))


def expand_prompt(prompt: str, learned: LearnedTokens) -> str:
    """``<cat>`` -> ``<cat> <cat>_1 ...`` for multi-vector tokens, as diffusers' loader does."""
    for placeholder, vectors in learned.placeholders.items():
        if len(vectors) > 1:
            prompt = re.sub(rf"(?<!\S){re.escape(placeholder)}(?!\S)", " ".join(vectors), prompt)
    return prompt


def add_tokens(model: Pretrained, learned: LearnedTokens) -> dict:
    """Adds the learned strings to the model's tokenizer(s); ``{encoder: PlaceholderIds}``."""
    encoders = encoders_of(model)
    missing = sorted(set(encoders) - set(learned.rows))
    if missing:
        raise SamplingError(f"the learned rows have no {missing} rows: they were made for a model with fewer text encoders")
    for name, (module, _) in encoders.items():
        width = learned.rows[name].shape[-1]
        if width != module.config.hidden_size:
            raise SamplingError(
                f"the learned {name} rows are {width} wide but the model's are {module.config.hidden_size}: use the model they were trained on"
            )
    placeholder_ids = {}
    for name, (_, tok) in encoders.items():
        vocab = tok.get_vocab()
        if all(t in vocab for t in learned.tokens):  # already added (e.g. validation inside a training run)
            first = vocab[learned.tokens[0]]
            if [vocab[t] for t in learned.tokens] != list(range(first, first + len(learned.tokens))):
                raise SamplingError(f"the tokenizer already holds {learned.tokens} at other ids: load a fresh model")
            placeholder_ids[name] = tokens_lib.PlaceholderIds(tuple(learned.tokens), first)
        else:
            placeholder_ids[name] = tokens_lib.add_placeholder_tokens(tok, learned.tokens)
    return placeholder_ids


@dataclasses.dataclass
class PromptStates:
    """Per-stage key and value states ``[S, B, L, D]`` and SDXL's added embedding, for one batch of prompts."""

    keys: jax.Array
    values: jax.Array
    added: Optional[dict]
    input_ids: jax.Array  # [B, L] of the first encoder


def text_encoder_fn(model: Pretrained, placeholder_ids: dict, resolution: int):
    """``encode(frozen, ids, rows) -> (states, added)``: :func:`conditioning.text_conditioning` compiled as one program
    (run eagerly it dispatches every op of the text encoder(s) one by one)."""
    return jax.jit(lambda frozen, ids, rows: text_conditioning(model, frozen, ids, rows, placeholder_ids, resolution))


def prompt_states(model: Pretrained, placeholder_ids: dict, learned: LearnedTokens, prompts: Sequence[str], resolution: int,
                  encode=None) -> PromptStates:
    """Text states of ``prompts`` (placeholders expanded) for every stage's key and value rows; ``encode`` is a
    :func:`text_encoder_fn` of the same model, tokens and resolution to reuse (default: a new one)."""
    encode = encode or text_encoder_fn(model, placeholder_ids, resolution)
    prompts = [expand_prompt(p, learned) for p in prompts]
    warned = set()
    for _, tok in encoders_of(model).values():
        for prompt, length in data_lib.overlong_prompts(tok, prompts):
            if prompt not in warned:
                warned.add(prompt)
                log.warning("prompt %r is %d tokens but the text encoder reads %d (start and end included): its end is cut",
                            prompt, length, tok.model_max_length)
    ids = {name: jnp.asarray(data_lib.tokenize_prompts(tok, prompts)) for name, (_, tok) in encoders_of(model).items()}
    frozen = frozen_params(model)
    keys, values, added = [], [], None
    for stage in range(learned.num_stages):
        for part, out in ((0, keys), (1, values)):
            rows = {e: jnp.asarray(r[stage, min(part, r.shape[1] - 1)] if r.ndim == 4 else r) for e, r in learned.rows.items()}
            states, stage_added = encode(frozen, ids, rows)
            out.append(states)
            added = added or stage_added
    return PromptStates(jnp.stack(keys), jnp.stack(values), added, ids["text_encoder"])


def zeros_for_empty_prompt(model: Pretrained) -> bool:
    """Whether guidance with no negative prompt uses zero states (diffusers' SDXL ``force_zeros_for_empty_prompt``,
    on unless the model index turns it off) rather than the encoded empty prompt (SD 1/2)."""
    return model.text_encoder_2 is not None and bool(model.model_index.get("force_zeros_for_empty_prompt", True))


def zero_states(states: PromptStates) -> PromptStates:
    """The unconditional branch of :func:`zeros_for_empty_prompt`: zero encoder states and pooled embedding, the
    same time ids."""
    added = None if states.added is None else {**states.added, "text_embeds": jnp.zeros_like(states.added["text_embeds"])}
    return PromptStates(jnp.zeros_like(states.keys), jnp.zeros_like(states.values), added, states.input_ids)


def token_positions(tokenizer, input_ids: np.ndarray, text: str, learned: LearnedTokens) -> np.ndarray:
    """``[B, L]`` bool: where ``text`` (a word or a placeholder, expanded) sits in each prompt."""
    pieces = tokenizer.encode(expand_prompt(text, learned), add_special_tokens=False)
    if not pieces:
        raise SamplingError(f"{text!r} has no tokens: pass words that appear in the prompt")
    ids = np.asarray(input_ids)
    found = np.zeros(ids.shape, bool)
    n = len(pieces)
    for b in range(ids.shape[0]):
        for start in range(ids.shape[1] - n + 1):
            if list(ids[b, start : start + n]) == pieces:
                found[b, start : start + n] = True
    if not found.any(axis=1).all():
        raise SamplingError(f"{text!r} is not in the prompt: --layout-words must name words of the prompt")
    return found


@dataclasses.dataclass(frozen=True)
class LayoutGuidance:
    """Boxes ``[x0, y0, x1, y1]`` for prompt positions; the defaults are the released code's."""

    positions: tuple  # per guided word: [B, L] bool
    boxes: tuple  # per guided word: [4] fractions
    guidance_steps: int = 10
    max_iterations: int = 5
    loss_scale: float = 30.0
    threshold: float = 0.2  # on the unscaled loss
    resolution: int = 16
    loss: str = "squared"  # "squared": the code's per-head (1 - inside/total)^2; "location": the training term
    layers: str = "code"  # "code": mid block + first up block at `resolution`; "all": every layer at it + mid
    # True: the code's rule, once the loss is at most `threshold` no later step is guided; False: ours before,
    # every one of the first `guidance_steps` steps checks the loss afresh (at least one iteration each)
    stop_for_good: bool = True
    words: tuple = ()  # the guided words, for messages only


GUIDANCE_LOSSES = {"squared": losses.layout_guidance_loss, "location": losses.location_loss}


def guidance_layers(model: Pretrained, latent_size: int, resolution: int, which: str = "code") -> tuple[str, ...]:
    """The cross-attention layers layout guidance reads: the mid block's and, with ``which="code"``,
    the first up block's at ``resolution`` (the released code's), with ``"all"`` every one at it."""
    layers = cross_attention_layers(model.unet.config, latent_size)
    mid = tuple(n for n in layers if n.startswith("mid_block"))
    if which == "all":
        at = tuple(n for n, side in layers.items() if side == resolution)
    elif which == "code":
        up = [n for n, side in layers.items() if side == resolution and n.startswith("up_blocks.")]
        first = up[0].split(".attentions.")[0] + ".attentions." if up else None
        at = tuple(n for n in up if n.startswith(first)) if up else ()
    else:
        raise SamplingError(f"layout guidance layers {which!r}: use 'code' (mid + first up block) or 'all'")
    if not at or not mid:
        where = "up block" if which == "code" else "layer"
        raise SamplingError(
            f"layout guidance reads the mid block and a cross-attention {where} at {resolution}x{resolution}, but this "
            f"UNet has {'no mid-block cross-attention' if not mid else f'none at that side (it has {sorted(set(layers.values()))})'}: "
            "sample without --layout-guidance or use a model with those layers"
        )
    return tuple(n for n in layers if n in at or n in mid)


def guided_latents(x: jax.Array, loss_and_grad, max_iterations: int, threshold: float, step_scale, done=False):
    """The code's ``while loss / scale > threshold and iteration < max_iter``: each iteration takes the loss
    and gradient at ``x`` and steps ``x -= step_scale * grad`` (the step is taken even when that loss is
    already at most ``threshold``: the code checks it before the next iteration); nothing runs when
    ``done``. ``loss_and_grad(x) -> (loss, grad)`` returns the unscaled loss and the gradient to step along.
    Returns ``(x, done, iterations)``, ``done`` whether the last loss taken is at most ``threshold``.
    A ``lax.while_loop``: iterations not run cost nothing."""

    def more(carry):
        _, finished, k = carry
        return ~finished & (k < max_iterations)

    def body(carry):
        z, _, k = carry
        loss, grad = loss_and_grad(z)
        return z - (step_scale * grad).astype(z.dtype), loss <= threshold, k + 1

    return jax.lax.while_loop(more, body, (x, jnp.asarray(done), jnp.asarray(0, jnp.int32)))


def layout_guide(layout: LayoutGuidance, loss_and_grad, step_scale):
    """``guide(x, i, (done, iterations)) -> (x, (done, iterations))`` for :func:`samplers.sample_loop`
    (initial state :func:`layout_guide_state`): at each of the first ``layout.guidance_steps`` steps,
    :func:`guided_latents` with ``loss_and_grad(x, i)`` and step ``step_scale(i)``. ``done`` is carried
    from step to step (the code's loss is set once before its step loop): once a loss is at most the
    threshold, later steps run no iteration; ``layout.stop_for_good=False`` (ours before) clears it
    at each step. ``iterations`` counts the gradient steps taken so far."""

    def guide(x, i, state):
        done, count = state
        if not layout.stop_for_good:
            done = jnp.zeros_like(done)
        run = lambda z: guided_latents(z, lambda w: loss_and_grad(w, i), layout.max_iterations, layout.threshold,
                                       step_scale(i), done)
        skip = lambda z: (z, done, jnp.asarray(0, jnp.int32))
        x, done, k = jax.lax.cond(i < layout.guidance_steps, run, skip, x)
        return x, (done, count + k)

    return guide


def layout_guide_state():
    """The initial ``(done, iterations)`` of :func:`layout_guide`: the code's ``loss = 10000``."""
    return jnp.asarray(False), jnp.asarray(0, jnp.int32)


def make_sample_fn(
    model: Pretrained,
    sampler: Sampler,
    guidance_scale: float,
    num_train_timesteps: int,
    num_stages: int,
    layout: Optional[LayoutGuidance] = None,
    capture: tuple = (),
):
    """``sample(noise, cond, uncond, key) -> (latents, maps)``: the whole denoising loop, jit-compiled.

    ``key`` draws the per-step noise of ancestral samplers (``euler_a``); the others ignore it.

    ``cond``/``uncond`` are ``{"keys", "values", "added"}`` of :class:`PromptStates`. ``maps`` is
    the conditional branch's cross-attention ``[B, HW, L]`` averaged over the ``capture`` layers
    (one resolution), heads and steps; a scalar 0 when nothing is captured.
    """
    params = model.unet_params
    stages = np.asarray(stage_of(np.asarray(sampler.timesteps).astype(np.int64), num_stages, num_train_timesteps), np.int32)
    sigma_space = sampler.sigma_space  # latents carry sigma (Euler, Euler a): guidance steps scale by sigma^2
    sides = cross_attention_layers(model.unet.config, model.unet.config.sample_size)
    guided_layers = guidance_layers(model, model.unet.config.sample_size, layout.resolution, layout.layers) if layout else ()
    if layout is not None and layout.loss not in GUIDANCE_LOSSES:
        raise SamplingError(f"layout guidance loss {layout.loss!r}: use one of {sorted(GUIDANCE_LOSSES)}")
    if capture and len({sides[name] for name in capture}) != 1:
        raise SamplingError("captured attention layers must share one resolution")
    map_side = sides[capture[0]] if capture else 0

    def states_at(states, i):
        stage = jnp.asarray(stages)[i]
        return states["keys"][stage], states["values"][stage]

    def denoise(x_in, t, i, cond, uncond):
        batch = x_in.shape[0]
        (ck, cv), (uk, uv) = states_at(cond, i), states_at(uncond, i)
        conditioning = Conditioning(jnp.concatenate([uk, ck]), value_states=jnp.concatenate([uv, cv]), capture_maps=capture)
        added = None
        if cond["added"] is not None:
            added = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c]), uncond["added"], cond["added"])
        out, maps = run_unet(model, params, jnp.concatenate([x_in, x_in]), jnp.full((2 * batch,), t), conditioning, added)
        out = out.astype(jnp.float32)
        guided = out[:batch] + guidance_scale * (out[batch:] - out[:batch])
        if not capture:
            return guided
        return guided, sum(m[batch:].astype(jnp.float32).mean(axis=1) for m in maps.values()) / len(maps)

    def layout_loss(x, i, cond):
        ck, cv = states_at(cond, i)
        conditioning = Conditioning(ck, value_states=cv, capture_maps=guided_layers)
        timesteps = jnp.full((x.shape[0],), sampler.timestep(i))
        _, maps = run_unet(model, params, sampler.scale_model_input(x, i), timesteps, conditioning, cond["added"])
        values = []
        for positions, box in zip(layout.positions, layout.boxes):
            mask = jnp.broadcast_to(jnp.asarray(data_lib.box_mask(box, x.shape[1])), x.shape[:3])
            values.append(GUIDANCE_LOSSES[layout.loss](maps, jnp.asarray(positions), mask))
        return sum(values) / len(values)

    def step_scale(i):
        sigma2 = sampler.sigma(i) ** 2
        return sigma2 if sigma_space else sigma2 / (1.0 + sigma2)  # LMS's sigma^2, in x = z / sqrt(1 + sigma^2)

    def sample(noise, cond, uncond, key):
        guide, guide_state = None, None
        if layout is not None:
            def loss_and_grad(x, i):
                scaled = jax.value_and_grad(lambda z: layout.loss_scale * layout_loss(z, i, cond))
                value, grad = scaled(x)
                return value / layout.loss_scale, grad

            guide, guide_state = layout_guide(layout, loss_and_grad, step_scale), layout_guide_state()
        maps = jnp.zeros((noise.shape[0], map_side * map_side, cond["keys"].shape[2])) if capture else None
        step = lambda x_in, t, i: denoise(x_in, t, i, cond, uncond)
        result = sample_loop(sampler, step, sampler.initial_latents(noise), guide=guide, extra=maps, key=key,
                             guide_state=guide_state)
        return result if capture else (result, jnp.zeros(()))

    return jax.jit(sample)


@functools.partial(jax.jit, static_argnums=0)
def _decode(vae, params, latents: jax.Array) -> jax.Array:
    """The VAE decoder, compiled once per (module, latent shape): Flax modules hash by their fields."""
    return vae.apply({"params": params}, unscale_latents(vae.config, latents), method="decode")


def decode_images(model: Pretrained, latents: jax.Array) -> np.ndarray:
    """VAE decode -> uint8 ``[B, H, W, 3]``."""
    images = np.asarray(_decode(model.vae, model.vae_params, latents.astype(model.vae.dtype)), np.float32)
    return np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: Optional[int] = None) -> np.ndarray:
    """``[B, H, W, 3]`` -> one ``[rows*H, cols*W, 3]`` grid (near-square by default)."""
    b, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / columns))
    grid = np.zeros((rows * h, columns * w, c), images.dtype)
    for k in range(b):
        r, col = divmod(k, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = images[k]
    return grid


def save_png(path: str, image: np.ndarray, info: Mapping[str, str]) -> str:
    """Writes ``image`` with ``info`` as PNG text chunks (prompt, seed, ...), via a temp file."""
    meta = PngInfo()
    for key, value in info.items():
        meta.add_text(key, str(value))
    return atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG", pnginfo=meta), overwrite=True)


def prompt_file_name(prompt: str, seed: int) -> str:
    """``a photo of <cat>`` -> ``a_photo_of_cat_seed0.png``."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:80] or "sample"
    return f"{stem}_seed{seed}.png"


@dataclasses.dataclass
class SampleRequest:
    prompt: str
    negative_prompt: str = ""
    num_images: int = 4
    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "ddim"
    seed: int = 0
    layout_guidance: bool = False
    layout_words: tuple = ()  # words/placeholders of the prompt to place; default: default_layout_words, else the placeholders
    boxes: tuple = ()  # one [x0, y0, x1, y1] per layout word; default: layout model or fixed boxes
    layout_model: str = ""
    attention_resolution: int = 0  # > 0: also return the mean cross-attention maps at this side
    attention_layers: tuple = ()  # with attention_resolution: only layers whose names start with one of these


@dataclasses.dataclass
class SampleResult:
    images: np.ndarray  # uint8 [B, H, W, 3]
    latents: np.ndarray
    attention: Optional[np.ndarray]  # [B, side*side, L] mean maps of the conditional branch
    input_ids: np.ndarray  # [B, L]
    boxes: tuple


# The released code's prompt templates join the learned concept and a COCO object with " and " (concept first)
# or " in front of " (a background concept last); " with " is ours.
LAYOUT_CONJUNCTIONS = (" and ", " in front of ", " with ")
_ARTICLES = frozenset({"a", "an", "the"})
_PHRASE_ENDS = frozenset({"and", "with", "of", "on", "in", "at", "near", "under", "by", "behind", "beside", "next",
                          "inside", "over", "above", "below", "from", "to", "for", "while", "holding", "wearing"})


def default_layout_words(prompt: str, placeholders: Sequence[str]) -> list[str]:
    """``[placeholder, *other object's words]`` when ``prompt`` has exactly one of ``placeholders`` and another
    object joined by one of :data:`LAYOUT_CONJUNCTIONS`; else ``[]``.

    The released code (``get_constant_layout``) places the learned concept and each word of the other object of
    its "<concept> and <object>" / "<object> in front of <concept>" prompts (COCO names such as "traffic
    light", no articles). Ours: the side of the conjunction without the placeholder is the other object;
    of it, the words next to the conjunction, up to punctuation or a preposition ("a dog on the grass" ->
    "dog"), articles dropped ("a <ball> and a dog" -> ``["<ball>", "dog"]``).
    """
    present = [p for p in placeholders if p in prompt]
    if len(present) != 1:
        return []
    (placeholder,) = present
    for conjunction in LAYOUT_CONJUNCTIONS:
        parts = prompt.split(conjunction)
        if len(parts) < 2:
            continue
        if placeholder in parts[0] and placeholder not in parts[-1]:
            pieces = re.findall(r"[\w'-]+|[^\w\s]", parts[-1])  # the code: prompt.split(" and ")[-1]
        elif placeholder in parts[-1] and placeholder not in parts[0]:
            pieces = re.findall(r"[\w'-]+|[^\w\s]", parts[0])[::-1]  # the code: prompt.split(" in front of ")[0]
        else:
            continue
        words = []
        for piece in pieces:
            if not re.match(r"[\w'-]", piece) or piece.lower() in _PHRASE_ENDS:
                break
            if piece.lower() not in _ARTICLES:
                words.append(piece)
        if words:
            return [placeholder] + (words if placeholder in parts[0] else words[::-1])
    return []


def _layout(model: Pretrained, learned: LearnedTokens, request: SampleRequest, input_ids) -> LayoutGuidance:
    words = list(request.layout_words)
    boxes = [list(b) for b in request.boxes]
    companion = []  # the other object's words: one box for all of them (the code's)
    if not words:
        found = default_layout_words(request.prompt, list(learned.placeholders))
        if found and len(boxes) in (0, 2):
            words, companion = found[:1], found[1:]
        else:
            words = list(learned.placeholders)
    if len(words) + bool(companion) > 2 and not boxes:
        raise SamplingError("layout guidance without --boxes places two words: pass --layout-words 'A,B' or --boxes")
    if not boxes:
        table = input_embedding_table(model, "text_encoder") if request.layout_model else None
        if len(words) == 1 and not companion:
            boxes = [list(layout_lib.FIXED_BOXES[0])]
        elif not request.layout_model:
            boxes = [list(b) for b in layout_lib.FIXED_BOXES]  # the code's left and right boxes
        else:
            predictor = layout_lib.load_layout_model(request.layout_model)
            nouns = layout_lib.layout_nouns(predictor)

            def embed(word):  # a learned token is placed as its nearest noun (the paper's mapping)
                rows = _word_rows(model, learned, table, word)
                if word in learned.placeholders:
                    rows = tokens_lib.word_embedding(model.tokenizer, table, layout_lib.nearest_word(rows, model.tokenizer, table, nouns))
                return rows

            second = " ".join(companion) if companion else words[1]
            boxes = [b.tolist() for b in layout_lib.predict_boxes_from_embeddings(predictor, embed(words[0]), embed(second))]
    if companion:
        boxes = boxes[:1] + boxes[1:] * len(companion)
        words = words + companion
        log.info("layout guidance places %s in %s and %s in %s", words[0], boxes[0], " ".join(companion), boxes[1])
    if len(boxes) != len(words):
        raise SamplingError(f"{len(boxes)} boxes for {len(words)} layout words: give one box per word")
    for box in boxes:
        data_lib.box_mask(box, 4)  # validates
    positions = tuple(token_positions(model.tokenizer, input_ids, w, learned) for w in words)
    return LayoutGuidance(positions, tuple(tuple(float(v) for v in b) for b in boxes), words=tuple(words))


def _word_rows(model, learned: LearnedTokens, table, word: str) -> np.ndarray:
    """A word's input embedding, or a placeholder's learned rows (base / mean over stages)."""
    if word in learned.placeholders:
        rows = learned.rows["text_encoder"]
        rows = rows.mean(axis=(0, 1)) if rows.ndim == 4 else rows
        start = learned.tokens.index(learned.placeholders[word][0])
        return rows[start : start + len(learned.placeholders[word])]
    return tokens_lib.word_embedding(model.tokenizer, table, word)


def generate(
    model: Pretrained, learned: LearnedTokens, request: SampleRequest, devices=None, cache: Optional[dict] = None
) -> SampleResult:
    """Images for ``request`` (batch sharded over ``devices`` when it divides evenly).

    ``cache`` (a dict kept by the caller) reuses the compiled text encoder and loop (without layout guidance)
    across calls, e.g. validation during training; the VAE decoder is compiled once per shape anyway.
    """
    if request.num_images < 1 or request.steps < 1:
        raise SamplingError("--num-images and --steps must be at least 1")
    try:
        sampler = make_sampler(request.scheduler, model.scheduler_config, request.steps)
    except ValueError as e:
        raise SamplingError(f"cannot build the {request.scheduler} sampler for this model: {e}") from None
    placeholder_ids = add_tokens(model, learned)
    resolution = model.unet.config.sample_size * vae_factor(model)
    cache = {} if cache is None else cache
    encoder_key = ("encode", resolution, tuple(ids.first_id for ids in placeholder_ids.values()), model.clip_skip)
    if encoder_key not in cache:
        cache[encoder_key] = text_encoder_fn(model, placeholder_ids, resolution)
    encode = cache[encoder_key]
    cond = prompt_states(model, placeholder_ids, learned, [request.prompt] * request.num_images, resolution, encode)
    if not request.negative_prompt and zeros_for_empty_prompt(model):
        uncond = zero_states(cond)
    else:
        uncond = prompt_states(model, placeholder_ids, learned, [request.negative_prompt] * request.num_images, resolution, encode)
    layout = _layout(model, learned, request, np.asarray(cond.input_ids)) if request.layout_guidance else None
    capture = ()
    if request.attention_resolution:
        layers = cross_attention_layers(model.unet.config, model.unet.config.sample_size)
        capture = tuple(n for n, side in layers.items() if side == request.attention_resolution
                        and (not request.attention_layers or n.startswith(tuple(request.attention_layers))))
        if not capture:
            raise SamplingError(f"no cross-attention layer at {request.attention_resolution}x{request.attention_resolution} (the UNet has {sorted(set(layers.values()))})")
    key = (request.scheduler, request.steps, request.guidance, learned.num_train_timesteps, learned.num_stages, capture)
    if layout is None and key in cache:
        sample = cache[key]
    else:
        sample = make_sample_fn(model, sampler, request.guidance, learned.num_train_timesteps, learned.num_stages, layout, capture)
        if layout is None:
            cache[key] = sample
    side = model.unet.config.sample_size
    noise = jax.random.normal(jax.random.PRNGKey(request.seed), (request.num_images, side, side, model.unet.config.in_channels))
    step_key = jax.random.fold_in(jax.random.PRNGKey(request.seed), 1)  # euler_a's per-step noise, folded with the step
    as_dict = lambda s: {"keys": s.keys, "values": s.values, "added": s.added}
    devices = devices or jax.devices()
    if request.num_images % len(devices) == 0:
        mesh = make_mesh(devices)
        shard = lambda tree, axis: jax.tree_util.tree_map(
            lambda v: jax.device_put(v, NamedSharding(mesh, P(*([None] * axis + ["data"])))), tree
        )
        noise = shard(noise, 0)
        cond_d, uncond_d = as_dict(cond), as_dict(uncond)
        for d in (cond_d, uncond_d):
            d["keys"], d["values"] = shard(d["keys"], 1), shard(d["values"], 1)
            d["added"] = shard(d["added"], 0) if d["added"] is not None else None
        with jax.set_mesh(mesh):
            latents, maps = sample(noise, cond_d, uncond_d, step_key)
    else:
        latents, maps = sample(noise, as_dict(cond), as_dict(uncond), step_key)
    images = decode_images(model, jax.device_get(latents))
    return SampleResult(
        images, np.asarray(latents), np.asarray(maps) if capture else None, np.asarray(cond.input_ids),
        layout.boxes if layout is not None else (),
    )


def _heat_colors(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB float32 (black-red-yellow-white), a colormap without matplotlib."""
    v = np.clip(values, 0, 1)[..., None]
    return np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)


def attention_figure(tokenizer, result: SampleResult, image_index: int = 0, columns: int = 8) -> np.ndarray:
    """The image, then each prompt token's mean cross-attention map over it, labelled with the token."""
    image = result.images[image_index]
    if image.shape[0] < 128:  # small models: enlarge so labels fit
        factor = -(-128 // image.shape[0])
        image = image.repeat(factor, axis=0).repeat(factor, axis=1)
    size = image.shape[0]
    maps = result.attention[image_index]  # [HW, L]
    side = int(round(np.sqrt(maps.shape[0])))
    ids = result.input_ids[image_index]
    eos = int(np.argmax(ids == tokenizer.eos_token_id)) if (ids == tokenizer.eos_token_id).any() else len(ids)
    label_height = 14
    panels = [("image", image)]
    for position in range(1, eos):
        heat = maps[:, position].reshape(side, side)
        heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-8)
        up = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255
        blended = 0.4 * image.astype(np.float32) / 255 + 0.6 * _heat_colors(up)
        token = tokenizer.convert_ids_to_tokens(int(ids[position])).replace("</w>", "")
        panels.append((token, (blended * 255).astype(np.uint8)))
    labelled = []
    for text, panel in panels:
        canvas = Image.new("RGB", (size, size + label_height), (255, 255, 255))
        canvas.paste(Image.fromarray(panel), (0, label_height))
        ImageDraw.Draw(canvas).text((2, 1), text[:24], fill=(0, 0, 0))
        labelled.append(np.asarray(canvas))
    return image_grid(np.stack(labelled), columns=min(columns, len(labelled)))


class Validator:
    """Grids of ``prompts`` from in-training rows, written to ``workdir/validation`` and TensorBoard.

    Each prompt is drawn by :func:`generate`, as the ``sample`` command draws it: ``negative_prompt``
    is the unconditional branch of guidance ("" = the empty prompt).
    """

    def __init__(self, model: Pretrained, workdir: str, prompts: Sequence[str], num_images: int = 2, steps: int = 25,
                 scheduler: str = "ddim", guidance: float = 7.5, seed: int = 0, negative_prompt: str = ""):
        self.model, self.directory = model, os.path.join(workdir, "validation")
        self.requests = [SampleRequest(p, negative_prompt=negative_prompt, num_images=num_images, steps=steps,
                                       scheduler=scheduler, guidance=guidance, seed=seed)
                         for p in prompts]
        self.cache: dict = {}

    def __call__(self, step: int, embeddings: Mapping, meta: Mapping, writer=None) -> str:
        learned = tokens_from_checkpoint(embeddings, meta)
        grids = [image_grid(generate(self.model, learned, r, devices=jax.local_devices(), cache=self.cache).images, columns=r.num_images) for r in self.requests]
        grid = np.concatenate(grids, axis=0)
        first = self.requests[0]
        path = save_png(os.path.join(self.directory, f"step_{step:06d}.png"), grid,
                        {"step": step, "prompts": " | ".join(r.prompt for r in self.requests),
                         "negative_prompt": first.negative_prompt, "scheduler": first.scheduler, "steps": first.steps,
                         "guidance": first.guidance, "seed": first.seed})
        if writer is not None:
            writer.add_image("validation", grid, step, dataformats="HWC")
        return path
