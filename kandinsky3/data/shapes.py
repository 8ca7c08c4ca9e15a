"""Procedural captioned shapes: a synthetic text-to-image dataset for training a small Kandinsky 3.

Each image is ``image_size`` × ``image_size`` RGB (default 64; any multiple of 16 from 32) showing one
or two flat-coloured objects (circle, square, triangle) on a uniform background. Edges are
anti-aliased: each shape's coverage is drawn with PIL at ``SUPERSAMPLE``× and box-filtered down.
Every example is a pure function of (seed, split, index), so all workers and ranks see the same item.

Geometry (all in fractions of the image side, x to the right, y down):

* An object's *anchor* is the centre of its bounding box. Its scale ``r`` is drawn from
  ``SIZE_RANGES[size]``; a circle has radius r, a square half-side ``SQUARE_HALF * r`` (same area
  as the circle), an upward equilateral triangle side ``2 * TRIANGLE_HALF * r``. No object extends
  more than ``TRIANGLE_HALF * r`` from its anchor.
* ``position`` puts the anchor ``REGION_OFFSET`` away from the image centre along its axis
  (left/right: x, top/bottom: y) with ``REGION_JITTER`` across it, or within ``CENTER_JITTER`` of
  the centre. :func:`region_of` is the matching classifier (used by the evaluator).
* Two-object scenes use a left/right or top/bottom pair; the ranges guarantee a gap of at least
  ``0.04`` between the two objects and ``0.02`` to the border.

Held-out pairs (``HELD_OUT_PAIRS``) never appear in ``split="train"``; ``split="heldout"`` scenes
contain at least one; ``split="seen"`` draws from the training distribution with its own seed
stream. The caption grammar is documented in ``docs/captions.md``.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS", "COLOURS", "HELD_OUT_PAIRS", "OBJECT_COLOURS", "POSITIONS", "RELATIONS", "SHAPES",
    "SIZES", "SPLITS", "Placement", "Scene", "ShapeSpec", "ShapesDataset", "caption",
    "caption_with_spec", "check_image_size", "check_scene", "eval_prompts", "image_to_tensor",
    "layout", "parse_caption", "region_of", "render", "render_array", "sample_scene", "tensor_to_image",
    "word_objects",
]

# ------------------------------------------------------------------------------------------- vocabulary

#: Exact sRGB values of every named colour (objects and backgrounds are disjoint sets).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 140, 20),
    "yellow": (245, 215, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "beige": (235, 225, 200),
    "pink": (250, 205, 215),
}
OBJECT_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUNDS = ("white", "black", "gray", "beige", "pink")
BACKGROUND_WEIGHTS = (0.4, 0.15, 0.15, 0.15, 0.15)  # white is the most common background
_BACKGROUND_CUMULATIVE = tuple(itertools.accumulate(BACKGROUND_WEIGHTS))
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
RELATIONS = ("and", "above", "below", "to the left of", "to the right of")
SPLITS = ("train", "seen", "heldout")

#: (colour, shape) pairs never rendered in ``split="train"``; every colour and shape still appears
#: in training with other partners, so these test compositional generalisation.
HELD_OUT_PAIRS = (("red", "triangle"), ("blue", "circle"), ("green", "square"), ("yellow", "triangle"))
SEEN_PAIRS = tuple((c, s) for c in OBJECT_COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS)
ALL_PAIRS = tuple((c, s) for c in OBJECT_COLOURS for s in SHAPES)

# Relation of a two-object scene → positions of (first, second) object.
RELATION_POSITIONS = {
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
    "to the left of": ("left", "right"),
    "to the right of": ("right", "left"),
}
POSITION_PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))

# ------------------------------------------------------------------------------------------- geometry

SUPERSAMPLE = 4  # draw at 4x, box-filter down: 17 coverage levels per edge pixel
SIZE_RANGES = {"small": (0.07, 0.10), "large": (0.14, 0.17)}  # scale r, fraction of the side
SIZE_THRESHOLD = 0.12  # r below → "small" (between the two ranges)
SQUARE_HALF = 0.5 * np.pi ** 0.5  # half-side / r: a square with the circle's area
TRIANGLE_HALF = 1.1  # half-side / r of the upward equilateral triangle
REACH = TRIANGLE_HALF  # no shape reaches further than REACH·r from its anchor along either axis
SHAPE_AREA = {  # area / r**2 for each shape
    "circle": np.pi,
    "square": 4 * SQUARE_HALF**2,
    "triangle": 3**0.5 * TRIANGLE_HALF**2,
}
REGION_OFFSET = (0.21, 0.29)  # |anchor - 0.5| along the position's axis
REGION_JITTER = 0.06  # |anchor - 0.5| across it
CENTER_JITTER = 0.05  # |anchor - 0.5| on both axes for "center"
CENTER_THRESHOLD = 0.13  # max(|dx|, |dy|) below → "center"

# ------------------------------------------------------------------------------------------- caption grammar

P_SIZE, P_POSITION, P_BACKGROUND, P_AND = 0.5, 0.6, 0.4, 0.4
#: object order of an "X and Y" caption that states no positions: "any" (the scene's order, so either object may
#: be on either side) or "reading" (the left or top object first)
AND_ORDERS = ("any", "reading")
PREFIXES = ("", "a picture of", "an image of", "a drawing of")
PREFIX_WEIGHTS = (0.55, 0.15, 0.15, 0.15)
_PREFIX_CUMULATIVE = tuple(itertools.accumulate(PREFIX_WEIGHTS))
POSITION_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
BACKGROUND_PHRASES = ("on a {} background", "against a {} background")


@dataclass(frozen=True)
class ShapeSpec:
    """One object. Any field may be None in a parsed caption (attribute not stated)."""

    shape: str | None
    colour: str | None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Scene:
    """One or two objects on a background; ``relation`` is None for one object, else in ``RELATIONS``."""

    objects: tuple[ShapeSpec, ...]
    background: str | None = None
    relation: str | None = None


@dataclass(frozen=True)
class Placement:
    """Rendered geometry of one object: anchor (x, y) and scale r, fractions of the image side."""

    x: float
    y: float
    r: float


# ------------------------------------------------------------------------------------------- validation


def check_image_size(image_size: int) -> None:
    """Raise ValueError unless ``image_size`` is an int, a multiple of 16 and at least 32."""
    if not isinstance(image_size, int) or isinstance(image_size, bool):
        raise ValueError(f"image_size must be an int, got {image_size!r}")
    if image_size < 32 or image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16 and at least 32, got {image_size}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _check_choice(name: str, value, allowed, complete: bool) -> None:
    if value is None and not complete:
        return
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_scene(scene: Scene, complete: bool = True) -> None:
    """Raise ValueError if ``scene`` breaks the dataset's rules; ``complete=False`` allows None fields."""
    if not isinstance(scene, Scene) or not 1 <= len(scene.objects) <= 2:
        raise ValueError(f"expected a Scene with 1 or 2 objects, got {scene!r}")
    for obj in scene.objects:
        _check_choice("shape", obj.shape, SHAPES, complete)
        _check_choice("colour", obj.colour, OBJECT_COLOURS, complete)
        _check_choice("size", obj.size, SIZES, complete)
        _check_choice("position", obj.position, POSITIONS, complete)
    _check_choice("background", scene.background, BACKGROUNDS, complete)
    if len(scene.objects) == 1:
        if scene.relation is not None:
            raise ValueError(f"a one-object scene has no relation, got {scene.relation!r}")
        return
    _check_choice("relation", scene.relation, RELATIONS, complete=True)
    positions = tuple(obj.position for obj in scene.objects)
    if None in positions:
        return
    if positions not in POSITION_PAIRS:
        raise ValueError(f"two objects need a left/right or top/bottom pair of positions, got {positions}")
    if scene.relation in RELATION_POSITIONS and RELATION_POSITIONS[scene.relation] != positions:
        raise ValueError(f"relation {scene.relation!r} contradicts positions {positions}")


# ------------------------------------------------------------------------------------------- sampling


def _item_rng(stream: int, seed: int, split: str, index: int) -> np.random.Generator:
    """Independent generator for one item; ``stream`` 0 = dataset, 1 = evaluation prompts."""
    return np.random.default_rng([stream, seed, SPLITS.index(split), index])


def _pick(rng: np.random.Generator, options, cumulative=None):
    """One element of ``options``: uniform, or by ``cumulative`` probabilities (faster than ``rng.choice``)."""
    if cumulative is None:
        return options[int(rng.integers(len(options)))]
    return options[min(bisect.bisect_right(cumulative, rng.random()), len(options) - 1)]


def sample_scene(rng: np.random.Generator, split: str = "train", p_and: float = P_AND) -> Scene:
    """Draw a complete random scene (1 or 2 objects, each equally likely) for ``split``; a two-object scene's
    relation is "and" with probability ``p_and``, else the spatial relation of its positions. The draws do not
    depend on ``p_and``: only the relation does, never what is rendered."""
    _check_split(split)
    n = 1 + int(rng.integers(2))
    held = int(rng.integers(n)) if split == "heldout" else -1
    pairs: list[tuple[str, str]] = []
    for k in range(n):
        pool = HELD_OUT_PAIRS if k == held else (ALL_PAIRS if split == "heldout" else SEEN_PAIRS)
        pool = [p for p in pool if p not in pairs]  # the two objects differ in colour or shape
        pairs.append(_pick(rng, pool))
    if n == 1:
        positions, relation = (_pick(rng, POSITIONS),), None
    else:
        positions = _pick(rng, POSITION_PAIRS)
        spatial = next(rel for rel, pos in RELATION_POSITIONS.items() if pos == positions)
        relation = "and" if rng.random() < p_and else spatial
    objects = tuple(
        ShapeSpec(shape=s, colour=c, size=_pick(rng, SIZES), position=pos) for (c, s), pos in zip(pairs, positions)
    )
    background = _pick(rng, BACKGROUNDS, _BACKGROUND_CUMULATIVE)
    return Scene(objects=objects, background=background, relation=relation)


# ------------------------------------------------------------------------------------------- rendering


def region_of(x: float, y: float) -> str:
    """Position name of an anchor (x, y) in fractions of the side; the inverse of :func:`layout`."""
    dx, dy = x - 0.5, y - 0.5
    if max(abs(dx), abs(dy)) < CENTER_THRESHOLD:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _uniform(rng: np.random.Generator | None, low: float, high: float) -> float:
    return 0.5 * (low + high) if rng is None else float(rng.uniform(low, high))


def _anchor(position: str, rng: np.random.Generator | None) -> tuple[float, float]:
    if position == "center":
        return 0.5 + _uniform(rng, -CENTER_JITTER, CENTER_JITTER), 0.5 + _uniform(rng, -CENTER_JITTER, CENTER_JITTER)
    along = _uniform(rng, *REGION_OFFSET) * (-1 if position in ("left", "top") else 1)
    across = _uniform(rng, -REGION_JITTER, REGION_JITTER)
    if position in ("left", "right"):
        return 0.5 + along, 0.5 + across
    return 0.5 + across, 0.5 + along


def layout(scene: Scene, rng: np.random.Generator | None = None) -> tuple[Placement, ...]:
    """Anchor and scale of each object; jitter drawn from ``rng`` (None → the middle of every range)."""
    check_scene(scene)
    placements = []
    for obj in scene.objects:
        r = _uniform(rng, *SIZE_RANGES[obj.size])
        x, y = _anchor(obj.position, rng)
        placements.append(Placement(x=x, y=y, r=r))
    return tuple(placements)


def _coverage(shape: str, x: float, y: float, r: float, image_size: int) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage in [0, 1] of one shape, as (patch, top, left) in output pixels.

    The shape (anchor x, y and scale r in output pixels) is drawn with PIL at ``SUPERSAMPLE``x on a
    patch around its bounding box and box-filtered down. PIL rounds vertices to whole supersampled
    pixels: positions are exact to 1/8 output pixel, areas come out 1-4% large at 64 px.
    """
    extent = REACH * r + 1
    left, top = max(int(x - extent), 0), max(int(y - extent), 0)
    right, bottom = min(int(x + extent) + 1, image_size), min(int(y + extent) + 1, image_size)
    ss = SUPERSAMPLE
    mask = Image.new("L", ((right - left) * ss, (bottom - top) * ss), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = (x - left) * ss, (y - top) * ss, r * ss
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        h = SQUARE_HALF * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    else:
        h = TRIANGLE_HALF * r
        half_height = h * 3**0.5 / 2
        draw.polygon([(cx, cy - half_height), (cx + h, cy + half_height), (cx - h, cy + half_height)], fill=255)
    patch = np.asarray(mask.reduce(ss), dtype=np.float32) / 255.0  # (bottom-top, right-left)
    return patch, top, left


def render_array(scene: Scene, image_size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """(image_size, image_size, 3) uint8 rendering of a complete ``scene``; jitter from ``rng``."""
    check_image_size(image_size)
    placements = layout(scene, rng)
    background = np.array(COLOURS[scene.background], dtype=np.float32)
    image = np.empty((image_size, image_size, 3), dtype=np.float32)
    image[:] = background
    for obj, p in zip(scene.objects, placements):
        patch, top, left = _coverage(obj.shape, p.x * image_size, p.y * image_size, p.r * image_size, image_size)
        delta = np.array(COLOURS[obj.colour], dtype=np.float32) - background
        h, w = patch.shape
        image[top : top + h, left : left + w] += patch[:, :, None] * delta  # objects never overlap
    return (image + 0.5).astype(np.uint8)  # round half up; values lie in [0, 255]


def render(scene: Scene, image_size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """RGB ``image_size``² PIL image of a complete ``scene``; placement jitter from ``rng`` (None → none)."""
    return Image.fromarray(render_array(scene, image_size, rng))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 (3, H, W) tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return _array_to_tensor(array)


def _array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → float32 (3, H, W) in [-1, 1]."""
    # In numpy: torch's intra-op threads only add overhead on tensors this small.
    chw = array.transpose(2, 0, 1).astype(np.float32, order="C")  # (H,W,3) → (3,H,W)
    chw *= np.float32(1 / 127.5)
    chw -= np.float32(1.0)
    return torch.from_numpy(chw)


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] → RGB PIL image (values clipped, rounded)."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    array = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())  # (3,H,W) → (H,W,3)


# ------------------------------------------------------------------------------------------- captions


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _object_phrase(obj: ShapeSpec, size: str | None) -> str:
    words = ([size] if size else []) + [obj.colour, obj.shape]
    return " ".join([_article(words[0])] + words)


def caption_with_spec(scene: Scene, rng: np.random.Generator, and_order: str = "any") -> tuple[str, Scene]:
    """Random caption of a complete ``scene`` and the spec it states (unstated attributes None).

    ``parse_caption(text) == spec`` holds for every output. Relation captions ("X above Y") state the
    relation, not per-object positions; an "and" caption states both positions or neither. With
    ``and_order="reading"`` an "and" caption that states neither names the left or top object first; the draws
    are the same either way.
    """
    check_scene(scene)
    _check_choice("and_order", and_order, AND_ORDERS, complete=True)
    say_positions = rng.random() < P_POSITION and scene.relation in (None, "and")
    objects = scene.objects
    if and_order == "reading" and scene.relation == "and" and not say_positions:
        objects = tuple(sorted(objects, key=lambda obj: obj.position not in ("left", "top")))
    parts, stated = [], []
    for obj in objects:
        size = obj.size if rng.random() < P_SIZE else None
        position = obj.position if say_positions else None
        phrase = _object_phrase(obj, size)
        if position:
            phrase += " " + _pick(rng, POSITION_PHRASES[position])
        parts.append(phrase)
        stated.append(ShapeSpec(shape=obj.shape, colour=obj.colour, size=size, position=position))
    text = parts[0] if len(parts) == 1 else f"{parts[0]} {scene.relation} {parts[1]}"
    prefix = _pick(rng, PREFIXES, _PREFIX_CUMULATIVE)
    if prefix:
        text = f"{prefix} {text}"
    background = scene.background if rng.random() < P_BACKGROUND else None
    if background:
        text += " " + _pick(rng, BACKGROUND_PHRASES).format(background)
    return text, Scene(objects=tuple(stated), background=background, relation=scene.relation)


def caption(scene: Scene, rng: np.random.Generator, and_order: str = "any") -> str:
    """Random caption of a complete ``scene``; see :func:`caption_with_spec` and ``docs/captions.md``."""
    return caption_with_spec(scene, rng, and_order)[0]


def _phrase_table() -> dict[str, list[tuple[tuple[str, ...], str]]]:
    """Word-tuple → meaning tables for the parser, longest phrases first."""
    table = {
        "prefix": [(tuple(p.split()), p) for p in PREFIXES if p],
        "size": [((s,), s) for s in SIZES],
        "colour": [((c,), c) for c in OBJECT_COLOURS],
        "shape": [((s,), s) for s in SHAPES],
        "position": [(tuple(ph.split()), pos) for pos, phs in POSITION_PHRASES.items() for ph in phs],
        "relation": [(tuple(r.split()), r) for r in RELATIONS],
        "background": [
            (tuple(ph.format(bg).split()), bg) for bg in BACKGROUNDS for ph in BACKGROUND_PHRASES
        ],
        "article": [(("a",), "a"), (("an",), "an")],
    }
    return {k: sorted(v, key=lambda item: -len(item[0])) for k, v in table.items()}


_PHRASES = _phrase_table()


def _match(words: list[str], i: int, kind: str) -> tuple[str | None, int]:
    for phrase, meaning in _PHRASES[kind]:
        if tuple(words[i : i + len(phrase)]) == phrase:
            return meaning, i + len(phrase)
    return None, i


def _parse_object(words: list[str], i: int, text: str) -> tuple[ShapeSpec, int]:
    """Parse ``article [size] colour shape [position]`` starting at word ``i``."""
    article, i = _match(words, i, "article")
    size, i = _match(words, i, "size")
    colour, i = _match(words, i, "colour")
    shape, i = _match(words, i, "shape")
    if article is None or colour is None or shape is None:
        raise ValueError(
            f"cannot parse caption {text!r}: expected 'a [small|large] <colour> <shape>' at "
            f"{' '.join(words[i:])!r}; colours {OBJECT_COLOURS}, shapes {SHAPES}"
        )
    position, i = _match(words, i, "position")
    return ShapeSpec(shape=shape, colour=colour, size=size, position=position), i


def parse_caption(text: str) -> Scene:
    """Caption → Scene spec with unstated attributes None; raises ValueError outside the grammar.

    Case and punctuation are ignored. A relation caption ("X above Y") sets ``relation`` and leaves
    positions None (the positions it implies are ``RELATION_POSITIONS[relation]``). The parser is a
    little more permissive than the generator: a position may follow any object.
    """
    return _parse(text)[0]


def word_objects(text: str) -> tuple[list[str], list[ShapeSpec | None]]:
    """The words of a caption and, for each, the object whose phrase it is in (``article [size] colour shape
    [position]``) with every attribute the caption states, a relation's implied positions included; None for the
    words outside object phrases (prefix, relation, background). Raises ValueError outside the grammar."""
    scene, words, owners = _parse(text)
    objects = list(scene.objects)
    if scene.relation in RELATION_POSITIONS:
        objects = [dataclasses.replace(obj, position=pos)
                   for obj, pos in zip(objects, RELATION_POSITIONS[scene.relation])]
    return words, [objects[k] if k >= 0 else None for k in owners]


def _parse(text: str) -> tuple[Scene, list[str], list[int]]:
    """(spec, words, owners): ``owners[i]`` is the index of the object whose phrase word i is in, or -1."""
    words = re.findall(r"[a-z]+", text.lower())
    owners: list[int] = []

    def advance(start: int, end: int, owner: int) -> int:
        owners.extend([owner] * (end - start))
        return end

    _, i = _match(words, 0, "prefix")
    advance(0, i, -1)
    first, end = _parse_object(words, i, text)
    i = advance(i, end, 0)
    objects = [first]
    relation, end = _match(words, i, "relation")
    i = advance(i, end, -1)
    if relation is not None:
        second, end = _parse_object(words, i, text)
        i = advance(i, end, 1)
        objects.append(second)
    background, end = _match(words, i, "background")
    i = advance(i, end, -1)
    if i != len(words):
        raise ValueError(f"cannot parse caption {text!r}: unexpected words {' '.join(words[i:])!r}")
    return Scene(objects=tuple(objects), background=background, relation=relation), words, owners


# ------------------------------------------------------------------------------------------- dataset


class ShapesDataset(torch.utils.data.Dataset):
    """``num_samples`` captioned shape images generated on the fly.

    ``dataset[i]`` is ``(image, caption)``: a float32 (3, image_size, image_size) tensor in [-1, 1]
    and a str. Item i depends only on (seed, split, i). ``and_captions`` is the share of two-object scenes
    captioned "X and Y" rather than by their relation ("X above Y"): a training-only caption mix, which changes
    captions and never images (:func:`sample_scene`), so cached latents stay valid; so is ``and_order``, the
    object order of the "X and Y" captions that state no positions (:func:`caption_with_spec`).
    """

    def __init__(self, num_samples: int, image_size: int = 64, seed: int = 0, split: str = "train",
                 and_captions: float = P_AND, and_order: str = "any"):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        check_image_size(image_size)
        _check_split(split)
        if not isinstance(and_captions, (int, float)) or not 0.0 <= and_captions <= 1.0:
            raise ValueError(f"and_captions must be a share in [0, 1], got {and_captions!r}")
        _check_choice("and_order", and_order, AND_ORDERS, complete=True)
        self.num_samples, self.image_size, self.seed, self.split = num_samples, image_size, seed, split
        self.and_captions, self.and_order = float(and_captions), and_order

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples}")
        return _item_rng(0, self.seed, self.split, int(index))

    def scene(self, index: int) -> Scene:
        """Ground-truth scene of item ``index``."""
        return sample_scene(self._rng(index), self.split, self.and_captions)

    def caption(self, index: int) -> str:
        """Caption of item ``index``, without rendering it (the placement draws are replayed, not drawn on)."""
        rng = self._rng(index)
        scene = sample_scene(rng, self.split, self.and_captions)
        layout(scene, rng)  # the same draws render_array makes before the caption's
        return caption(scene, rng, self.and_order)

    def placements(self, index: int) -> tuple[Placement, ...]:
        """Where item ``index``'s objects are drawn (anchor and scale, fractions of the side), without rendering."""
        rng = self._rng(index)
        return layout(sample_scene(rng, self.split, self.and_captions), rng)

    def _generate(self, index: int) -> tuple[np.ndarray, str, Scene]:
        rng = self._rng(index)
        scene = sample_scene(rng, self.split, self.and_captions)
        array = render_array(scene, self.image_size, rng)
        return array, caption(scene, rng, self.and_order), scene

    def example(self, index: int) -> tuple[Image.Image, str, Scene]:
        """Item ``index`` as (PIL image, caption, ground-truth scene)."""
        array, text, scene = self._generate(index)
        return Image.fromarray(array), text, scene

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        array, text, _ = self._generate(index)
        return _array_to_tensor(array), text


def eval_prompts(n: int, split: str = "seen", seed: int = 1234) -> list[tuple[str, Scene]]:
    """``n`` evaluation (caption, ground-truth scene) pairs; a seed stream disjoint from training."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _check_split(split)
    prompts = []
    for i in range(n):
        rng = _item_rng(1, seed, split, i)
        scene = sample_scene(rng, split)
        prompts.append((caption(scene, rng), scene))
    return prompts
