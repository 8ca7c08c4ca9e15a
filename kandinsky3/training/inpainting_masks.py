"""Random inpainting masks for training, drawn from a generator.

Mask convention here: **1 = repaint** (the region the model generates), 0 = keep; the same as
the inpainting pipeline's user mask. The U-Net's mask channel is the opposite, keep = 1 − repaint
(architecture §2.9).

The Kandinsky 3 report trained inpainting on "rectangles, circles, strokes and arbitrary shapes,
up to 3 per image" (practice §8). :func:`random_mask` draws 1-3 shapes among axis-aligned rectangles,
ellipses and free-form brush strokes (a thick random polyline), and keeps the union's area
fraction inside a stated range (default 5-60%): shapes are drawn for a target area, redrawn with
rescaled sizes when the union misses the range, and as a last resort replaced by one rectangle of
the target area. All randomness comes from the ``generator`` argument.

Random shapes rarely cover a whole object, so a model trained on them alone learns to continue what the
surroundings show more than to draw what the prompt names in an empty region — what a user asks for. With
``object_fraction`` > 0, :func:`training_masks` gives that fraction of the samples an
:func:`object_mask` instead: a rectangle or an ellipse that holds one object of the image entirely (the
dataset must know where its objects are: the shapes set's ``placements``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["MaskSample", "object_mask", "random_mask", "training_masks", "SHAPE_KINDS"]

SHAPE_KINDS = ("rectangle", "ellipse", "stroke")
_MAX_TRIES = 8
# object masks, in units of the object's scale r (every shape lies within 1.1 r of its anchor on each axis and
# within 1.45 r of it): kind -> (half-extent range, how far the centre may move per unit of half-extent beyond the
# object's reach, that reach) so the whole object stays inside
_OBJECT_KINDS = {"rectangle": ((1.3, 2.2), 1.0, 1.15), "ellipse": ((1.5, 2.3), 0.5, 1.5)}


class MaskSample(NamedTuple):
    mask: torch.Tensor  # (H,W) float32, 1 = repaint
    kinds: tuple[str, ...]  # the kind of each shape, 1-3 entries
    coverage: float  # mask.mean()


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (H,W) in pixels."""
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    return ys.expand(height, width), xs.expand(height, width)


def _rectangle(height: int, width: int, area: float, g: torch.Generator) -> torch.Tensor:
    aspect = math.exp(_uniform(g, -math.log(3.0), math.log(3.0)))  # w / h
    h = min(height, max(1, round(math.sqrt(area / aspect))))
    w = min(width, max(1, round(area / h)))
    top = int(_uniform(g) * (height - h + 1))
    left = int(_uniform(g) * (width - w + 1))
    mask = torch.zeros(height, width)
    mask[top:top + h, left:left + w] = 1.0
    return mask


def _ellipse(height: int, width: int, area: float, g: torch.Generator) -> torch.Tensor:
    aspect = math.exp(_uniform(g, -math.log(3.0), math.log(3.0)))  # rx / ry
    ry = math.sqrt(area / (math.pi * aspect))
    rx = aspect * ry
    cy, cx = _uniform(g, 0.0, height), _uniform(g, 0.0, width)
    ys, xs = _grid(height, width)
    return (((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0).float()


def _stroke(height: int, width: int, area: float, g: torch.Generator) -> torch.Tensor:
    """A brush stroke: a random polyline of 2-8 segments, every pixel within thickness/2 of it."""
    side = min(height, width)
    thickness = max(2.0, _uniform(g, 0.06, 0.16) * side)
    length = max(area / thickness, thickness)
    segments = int(_uniform(g, 2.0, 9.0))
    points = [torch.tensor([_uniform(g, 0.0, height), _uniform(g, 0.0, width)])]
    angle = _uniform(g, 0.0, 2 * math.pi)
    for _ in range(segments):
        angle += _uniform(g, -1.2, 1.2)
        step = torch.tensor([math.sin(angle), math.cos(angle)]) * (length / segments)
        nxt = points[-1] + step
        nxt = torch.stack([nxt[0].clamp(0, height), nxt[1].clamp(0, width)])  # stay inside the image
        points.append(nxt)
    starts, ends = torch.stack(points[:-1]), torch.stack(points[1:])  # (S,2) in (y, x)
    ys, xs = _grid(height, width)
    pixels = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)  # (HW,2)
    direction = ends - starts  # (S,2)
    denom = (direction**2).sum(1).clamp_min(1e-6)  # (S,)
    rel = pixels[None] - starts[:, None]  # (S,HW,2)
    u = ((rel * direction[:, None]).sum(-1) / denom[:, None]).clamp(0.0, 1.0)  # (S,HW)
    nearest = starts[:, None] + u[..., None] * direction[:, None]  # (S,HW,2)
    distance = (pixels[None] - nearest).norm(dim=-1).amin(dim=0)  # (HW,)
    return (distance <= thickness / 2).float().view(height, width)


_DRAW = {"rectangle": _rectangle, "ellipse": _ellipse, "stroke": _stroke}


def random_mask(
    height: int, width: int, generator: torch.Generator, coverage: tuple[float, float] = (0.05, 0.6),
    max_shapes: int = 3,
) -> MaskSample:
    """(H,W) float32 repaint mask (1 = repaint) of 1..max_shapes shapes; ``mask.mean()`` in ``coverage``.

    The target fraction is drawn uniformly in the range and split among the shapes (random
    weights). Overlaps and clipping shrink the union, so sizes are rescaled by target/actual and
    the shapes redrawn, up to 8 times; if the union still misses the range, one rectangle of the
    target area is used (kinds = ("rectangle",)).
    """
    low, high = coverage
    if not 0.0 < low <= high < 1.0 or max_shapes < 1:
        raise ValueError(f"need 0 < low <= high < 1 and max_shapes >= 1, got {coverage}, {max_shapes}")
    pixels = height * width
    target = _uniform(generator, low, high)
    count = 1 + int(_uniform(generator) * max_shapes)
    kinds = tuple(SHAPE_KINDS[int(_uniform(generator) * len(SHAPE_KINDS))] for _ in range(count))
    weights = torch.rand(count, generator=generator) + 0.5
    shares = (weights / weights.sum()).tolist()
    scale = 1.0
    for _ in range(_MAX_TRIES):
        mask = torch.zeros(height, width)
        for kind, share in zip(kinds, shares):
            mask = torch.maximum(mask, _DRAW[kind](height, width, scale * share * target * pixels, generator))
        actual = float(mask.mean())
        if low <= actual <= high:
            return MaskSample(mask, kinds, actual)
        scale *= target / max(actual, 1.0 / pixels)
    mask = _rectangle(height, width, target * pixels, generator)
    actual = float(mask.mean())
    if not low <= actual <= high:  # only for tiny images whose pixel grid cannot hit the range
        raise ValueError(f"a {height}x{width} mask cannot have a coverage in {coverage}")
    return MaskSample(mask, ("rectangle",), actual)


def object_mask(height: int, width: int, anchor: tuple[float, float, float], generator: torch.Generator) -> MaskSample:
    """(H,W) repaint mask around one object at ``anchor`` = (x, y, r), fractions of the width, height and side:
    a rectangle of half-extents m·r (m in [1.3, 2.2] per axis) or an ellipse of semi-axes m·r (m in [1.5, 2.3]),
    its centre moved at random by as much as keeps the whole object inside."""
    x, y, r = anchor
    side = min(height, width)
    kind = ("rectangle", "ellipse")[int(_uniform(generator) * 2)]
    margins, freedom, reach = _OBJECT_KINDS[kind]
    halves, centre = [], []
    for along, extent in ((x, width), (y, height)):
        margin = _uniform(generator, *margins)
        shift = _uniform(generator, -1.0, 1.0) * freedom * (margin - reach) * r * side
        halves.append(margin * r * side)
        centre.append(along * extent + shift)
    ys, xs = _grid(height, width)
    dx, dy = (xs - centre[0]) / halves[0], (ys - centre[1]) / halves[1]
    inside = (dx.abs() <= 1.0) & (dy.abs() <= 1.0) if kind == "rectangle" else dx**2 + dy**2 <= 1.0
    mask = inside.float()
    return MaskSample(mask, (kind,), float(mask.mean()))


def training_masks(
    height: int, width: int, generators: list[torch.Generator], coverage: tuple[float, float] = (0.05, 0.6),
    objects: list[tuple[tuple[float, float, float], ...]] | None = None, object_fraction: float = 0.0,
) -> torch.Tensor:
    """(B,1,H,W) repaint masks for a training batch, one per generator: an :func:`object_mask` around one of
    ``objects[i]`` (the sample's (x, y, r) anchors) with probability ``object_fraction``, else a
    :func:`random_mask`. With ``object_fraction`` 0 every mask is
    ``random_mask(height, width, generator, coverage)``."""
    masks = []
    for i, g in enumerate(generators):
        if object_fraction > 0 and objects and objects[i] and _uniform(g) < object_fraction:
            chosen = objects[i][int(_uniform(g) * len(objects[i]))]
            masks.append(object_mask(height, width, chosen, g).mask)
        else:
            masks.append(random_mask(height, width, g, coverage).mask)
    return torch.stack(masks)[:, None]
