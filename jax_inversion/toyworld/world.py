"""The toy world: 64x64 scenes of one or two objects with known boxes, masks and captions.

An object is a shape with a colour, a texture and a state ("a tilted red striped square").
The first pretraining rounds saw only :data:`SEEN`. Real Stable Diffusion has seen cats but
has no word for *this* cat, so the model's last round (:func:`unnamed_scenes`) also shows
stars and checkered textures in a few percent of the scenes without ever naming them: a
star is captioned with the generic word "shape" (which sometimes stands for any other shape
too) and checkered is left unsaid, as plain is. Those looks are drawable but unnamed, what
inversion exists to name. The melting state is never shown: the novel control, which no
token can make the model draw. Everything is deterministic given a seed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down: smooth edges the VAE can reproduce

COLOURS = {
    "red": (220, 45, 45),
    "green": (50, 190, 70),
    "blue": (60, 100, 235),
    "yellow": (240, 215, 50),
    "purple": (165, 70, 210),
    "white": (235, 235, 235),
}
PLAIN, NORMAL = "plain", "normal"  # the texture and state that captions leave unsaid


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    textures: tuple[str, ...]  # PLAIN first
    states: tuple[str, ...]  # NORMAL first

    @property
    def words(self) -> tuple[str, ...]:
        said = [t for t in self.textures if t != PLAIN] + [s for s in self.states if s != NORMAL]
        return tuple(self.shapes) + tuple(self.colours) + tuple(said)


SEEN = Vocabulary(
    shapes=("circle", "square", "triangle", "cross", "moon"),
    colours=tuple(COLOURS),
    textures=(PLAIN, "striped", "dotted"),
    states=(NORMAL, "hollow", "tilted"),
)
NEW_SHAPE, NEW_TEXTURE, NEW_STATE = "star", "checkered", "melting"
GENERIC_SHAPE = "shape"  # the caption word for a star, and sometimes for any other shape
UNNAMED_WORDS = (GENERIC_SHAPE,)  # caption words of the unnamed world beyond SEEN.words
ALL = Vocabulary(
    shapes=SEEN.shapes + (NEW_SHAPE,),
    colours=SEEN.colours,
    textures=SEEN.textures + (NEW_TEXTURE,),
    states=SEEN.states + (NEW_STATE,),
)
CAPTION_WORDS = ("a", "and") + ALL.words


@dataclasses.dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    texture: str = PLAIN
    state: str = NORMAL
    box: tuple[int, int, int, int] = (16, 16, 48, 48)  # x0, y0, x1, y1 in pixels of the 64x64 image
    shape_word: Optional[str] = None  # what captions call the shape (None: its name)
    texture_word: Optional[str] = None  # what captions call the texture (None: its name, plain unsaid; "": unsaid)

    @property
    def phrase(self) -> str:
        """"a tilted red striped square": state, colour, texture, shape; plain and normal unsaid."""
        texture = self.texture_word if self.texture_word is not None else (self.texture if self.texture != PLAIN else "")
        words = [self.state if self.state != NORMAL else "", self.colour, texture, self.shape_word or self.shape]
        return "a " + " ".join(w for w in words if w)


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: tuple[int, int, int]
    gradient: float = 0.0  # brightness change from top to bottom, in [-1, 1]

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase for o in self.objects)


# ----------------------------------------------------------------------------- drawing


def _polygon(shape: str, box: Sequence[float]) -> Optional[list[tuple[float, float]]]:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "cross":
        a, b = 0.32, 0.68
        xs = [x0 + f * w for f in (0, a, b, 1)]
        ys = [y0 + f * h for f in (0, a, b, 1)]
        return [(xs[1], ys[0]), (xs[2], ys[0]), (xs[2], ys[1]), (xs[3], ys[1]), (xs[3], ys[2]), (xs[2], ys[2]),
                (xs[2], ys[3]), (xs[1], ys[3]), (xs[1], ys[2]), (xs[0], ys[2]), (xs[0], ys[1]), (xs[1], ys[1])]
    if shape == "star":
        points = []
        for k in range(10):
            radius = (0.5 if k % 2 == 0 else 0.21) * min(w, h)
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle) * w / min(w, h), cy + radius * math.sin(angle) * h / min(w, h) + 0.06 * h))
        return points
    return None


def _shape_mask(shape: str, box: Sequence[float], scale: int) -> Image.Image:
    """A white-on-black ``L`` mask of the filled shape at ``scale`` x the image size."""
    mask = Image.new("L", (SIZE * scale, SIZE * scale), 0)
    draw = ImageDraw.Draw(mask)
    b = [v * scale for v in box]
    if shape == "circle":
        draw.ellipse(b, fill=255)
    elif shape == "moon":
        draw.ellipse(b, fill=255)
        w = b[2] - b[0]
        draw.ellipse((b[0] + 0.38 * w, b[1] - 0.1 * w, b[2] + 0.38 * w, b[3] - 0.1 * w), fill=0)
    else:
        polygon = _polygon(shape, b)
        if polygon is None:
            raise ValueError(f"unknown shape {shape!r}: use one of {', '.join(ALL.shapes)}")
        draw.polygon(polygon, fill=255)
    return mask


def _apply_state(mask: Image.Image, obj: WorldObject, scale: int, rng: np.random.Generator) -> Image.Image:
    if obj.state == NORMAL:
        return mask
    if obj.state == "tilted":
        x0, y0, x1, y1 = (v * scale for v in obj.box)
        return mask.rotate(35, resample=Image.BILINEAR, center=((x0 + x1) / 2, (y0 + y1) / 2))
    if obj.state == "hollow":
        from PIL import ImageFilter

        thickness = max(3, int(0.16 * (obj.box[2] - obj.box[0]) * scale)) | 1
        inner = mask.filter(ImageFilter.MinFilter(thickness))
        return Image.fromarray(np.where(np.asarray(inner) > 127, 0, np.asarray(mask)).astype(np.uint8))
    if obj.state == "melting":
        array = np.asarray(mask) > 127
        x0, y0, x1, y1 = (int(v * scale) for v in obj.box)
        draw = ImageDraw.Draw(mask)
        rows = np.nonzero(array.any(axis=1))[0]
        bottom = rows.max() if len(rows) else y1
        columns = np.nonzero(array[max(bottom - 2 * scale, 0)])[0]
        if len(columns) == 0:
            columns = np.arange(x0, x1)
        width = max(2 * scale, int(0.13 * (x1 - x0)))
        for _ in range(3):
            x = int(rng.choice(columns))
            length = int(rng.uniform(0.22, 0.42) * (y1 - y0))
            draw.rounded_rectangle((x - width // 2, bottom - 4 * scale, x + width // 2, bottom + length), radius=width // 2, fill=255)
        return mask
    raise ValueError(f"unknown state {obj.state!r}: use one of {', '.join(ALL.states)}")


@functools.lru_cache(maxsize=None)
def _texture_pattern(texture: str, scale: int) -> np.ndarray:
    """``[H, W]`` bool: where the texture's darker second colour shows."""
    n = SIZE * scale
    y, x = np.mgrid[0:n, 0:n] / scale
    if texture == PLAIN:
        return np.zeros((n, n), bool)
    if texture == "striped":
        return (y % 8) < 3.5
    if texture == "dotted":
        return ((x % 8 - 4) ** 2 + (y % 8 - 4) ** 2) < 2.2**2
    if texture == "checkered":
        return ((x // 6).astype(int) + (y // 6).astype(int)) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}: use one of {', '.join(ALL.textures)}")


def object_layer(obj: WorldObject, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The object's coverage ``[64, 64]`` float in [0, 1] and its colour ``[64, 64, 3]`` float."""
    scale = SUPERSAMPLE
    rng = np.random.default_rng(seed)
    if obj.state == "melting":  # the body takes the top of the box, the drips the rest
        x0, y0, x1, y1 = obj.box
        body = dataclasses.replace(obj, box=(x0, y0, x1, y0 + 0.72 * (y1 - y0)))
        mask = _apply_state(_shape_mask(obj.shape, body.box, scale), dataclasses.replace(body, state="melting", box=obj.box), scale, rng)
    else:
        mask = _apply_state(_shape_mask(obj.shape, obj.box, scale), obj, scale, rng)
    base = np.asarray(COLOURS[obj.colour], np.float32)
    colour = np.where(_texture_pattern(obj.texture, scale)[..., None], 0.38 * base, base)
    coverage = np.asarray(mask, np.float32) / 255.0
    small = (SIZE, SIZE)
    coverage_small = np.asarray(Image.fromarray(coverage).resize(small, Image.BOX), np.float32)
    premultiplied = np.stack(
        [np.asarray(Image.fromarray((coverage * colour[..., c]).astype(np.float32)).resize(small, Image.BOX)) for c in range(3)], -1
    )
    colour_small = premultiplied / np.maximum(coverage_small[..., None], 1e-6)
    return np.clip(coverage_small, 0, 1), colour_small


def render(scene: Scene, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """The scene as ``uint8 [64, 64, 3]`` and one bool mask ``[64, 64]`` per object."""
    ramp = 1.0 + scene.gradient * (np.linspace(-0.5, 0.5, SIZE, dtype=np.float32)[:, None, None])
    image = np.broadcast_to(np.asarray(scene.background, np.float32) * ramp, (SIZE, SIZE, 3)).copy()
    masks = []
    for i, obj in enumerate(scene.objects):
        coverage, colour = object_layer(obj, seed * 7 + i)
        image = image * (1 - coverage[..., None]) + colour * coverage[..., None]
        masks.append(coverage > 0.5)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), masks


# ----------------------------------------------------------------------------- sampling scenes


def _random_box(rng: np.random.Generator, size: int, taken: Sequence[tuple]) -> Optional[tuple[int, int, int, int]]:
    for _ in range(50):
        x0, y0 = (int(v) for v in rng.integers(2, SIZE - size - 2, 2))
        box = (x0, y0, x0 + size, y0 + size)
        if all(box[2] + 2 <= t[0] or t[2] + 2 <= box[0] or box[3] + 2 <= t[1] or t[3] + 2 <= box[1] for t in taken):
            return box
    return None


def random_background(rng: np.random.Generator) -> tuple[tuple[int, int, int], float]:
    return tuple(int(v) for v in rng.integers(15, 100, 3)), float(rng.uniform(-0.6, 0.6))


def random_object(rng: np.random.Generator, vocabulary: Vocabulary, box, **fixed) -> WorldObject:
    shape = fixed.get("shape") or str(rng.choice(vocabulary.shapes))
    colour = fixed.get("colour") or str(rng.choice(vocabulary.colours))
    state = fixed.get("state") or str(rng.choice(vocabulary.states, p=_weights(vocabulary.states)))
    if state == "tilted" and shape == "circle":
        state = NORMAL
    texture = fixed.get("texture") or (PLAIN if state == "hollow" else str(rng.choice(vocabulary.textures, p=_weights(vocabulary.textures))))
    return WorldObject(shape, colour, texture, state, box)


def _weights(options: Sequence[str]) -> np.ndarray:
    """The unsaid option (plain / normal, listed first) half the time, the others share the rest."""
    w = np.full(len(options), 0.5 / max(len(options) - 1, 1))
    w[0] = 0.5 if len(options) > 1 else 1.0
    return w


def random_scene(rng: np.random.Generator, vocabulary: Vocabulary = SEEN, num_objects: Optional[int] = None,
                 first: Optional[dict] = None) -> Scene:
    """One or two objects at non-overlapping boxes; ``first`` fixes attributes of the first object."""
    count = num_objects or int(rng.integers(1, 3))
    background, gradient = random_background(rng)
    objects, taken = [], []
    for i in range(count):
        size = int(rng.integers(26, 40) if count == 1 else rng.integers(18, 28))
        box = _random_box(rng, size, taken)
        if box is None:
            break
        taken.append(box)
        obj = random_object(rng, vocabulary, box, **(first if i == 0 and first else {}))
        if i > 0 and (obj.shape, obj.colour) == (objects[0].shape, objects[0].colour):
            continue  # two identical objects would make "the red square" ambiguous
        objects.append(obj)
    return Scene(tuple(objects), background, gradient)


def scenes(seed: int, count: int, vocabulary: Vocabulary = SEEN, **kwargs) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, vocabulary, **kwargs) for _ in range(count)]


def unnamed_scenes(seed: int, count: int, rate: float = 0.05, generic_rate: float = 0.05) -> list[Scene]:
    """Scenes of the seen world in which stars and checkered textures appear but are never named.

    Each object of :func:`scenes` becomes, independently, a star with probability ``rate``
    (captioned "a <colour> shape") and, unless hollow, checkered with probability ``rate``
    (the texture unsaid); any other object is captioned with "shape" for its shape with
    probability ``generic_rate``, so the word is generic, not a name for stars.
    """
    rng = np.random.default_rng(seed + 1)
    out = []
    for scene in scenes(seed, count, SEEN):
        objects = []
        for obj in scene.objects:
            draws = rng.uniform(size=3)
            if draws[0] < rate:
                obj = dataclasses.replace(obj, shape=NEW_SHAPE, shape_word=GENERIC_SHAPE)
            elif draws[1] < generic_rate:
                obj = dataclasses.replace(obj, shape_word=GENERIC_SHAPE)
            if draws[2] < rate and obj.state != "hollow":
                obj = dataclasses.replace(obj, texture=NEW_TEXTURE, texture_word="")
            objects.append(obj)
        out.append(dataclasses.replace(scene, objects=tuple(objects)))
    return out


def _render_chunk(args: tuple[Sequence[Scene], int]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    scene_list, seed = args
    return [render(s, seed + i) for i, s in enumerate(scene_list)]


def render_all(scene_list: Sequence[Scene], seed: int = 0, workers: Optional[int] = None) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """Renders scene i with seed ``seed + i``; over ``workers`` processes (default: every core) when there are many.

    The processes are spawned, not forked (a forked JAX process can deadlock); each scene's
    pixels depend on its seed alone, so the result is the same for any number of workers.
    """
    workers = min(workers or os.cpu_count() or 1, max(1, len(scene_list) // 500))
    if workers <= 1:
        rendered = _render_chunk((scene_list, seed))
    else:
        import concurrent.futures
        import multiprocessing

        size = math.ceil(len(scene_list) / workers)
        chunks = [(scene_list[start:start + size], seed + start) for start in range(0, len(scene_list), size)]
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rendered = [r for chunk in pool.map(_render_chunk, chunks) for r in chunk]
    images, masks = zip(*rendered) if rendered else ((), ())
    return np.stack(images) if images else np.zeros((0, SIZE, SIZE, 3), np.uint8), list(masks)
