"""Procedural shapes data set for the embedded demo model (no downloads).

Every image is a single shape (circle, square or triangle) of one colour and size, drawn on a
plain background of another colour in one of four quadrants. The caption states all five
attributes exactly, so whether a generated image follows its prompt can be checked by a
classifier trained on the same data.

Example::

    >>> import numpy as np
    >>> from DeepCache.tools.demo_model.data import Attributes, caption, parse_caption, render
    >>> attrs = Attributes(shape="circle", colour="red", background="blue", position="top left", size="small")
    >>> caption(attrs)
    'a small red circle on a blue background, top left'
    >>> parse_caption(caption(attrs)) == attrs
    True
    >>> image = render(attrs, np.random.default_rng(0))
    >>> image.shape, image.dtype
    ((32, 32, 3), dtype('uint8'))
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "black")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
SIZES: tuple[str, ...] = ("small", "large")

#: RGB values (0-255) of each colour word.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

#: Attribute name -> the ordered class names a classifier head predicts.
ATTRIBUTE_CLASSES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "background": COLOURS,
    "position": POSITIONS,
    "size": SIZES,
}

IMAGE_SIZE = 32
_RADIUS = {"small": 4.5, "large": 7.5}
_JITTER = 2.0  # pixels of random offset around the quadrant centre
_CAPTION_RE = re.compile(
    r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) on an? (?P<background>\w+) background, (?P<position>\w+ \w+)$"
)


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What one image shows; every field is one of the names in :data:`ATTRIBUTE_CLASSES`."""

    shape: str
    colour: str
    background: str
    position: str
    size: str

    def __post_init__(self) -> None:
        for name, classes in ATTRIBUTE_CLASSES.items():
            value = getattr(self, name)
            if value not in classes:
                raise ValueError(f"{name}={value!r} is not one of {classes}; pick one of those names.")
        if self.colour == self.background:
            raise ValueError(
                f"colour and background are both {self.colour!r}; the shape would be invisible. "
                "Pick two different colours."
            )

    def labels(self) -> dict[str, int]:
        """Class index of every attribute, in :data:`ATTRIBUTE_CLASSES` order."""
        return {name: classes.index(getattr(self, name)) for name, classes in ATTRIBUTE_CLASSES.items()}


def caption(attrs: Attributes) -> str:
    """The exact caption of an image, e.g. ``'a large green square on a black background, bottom right'``."""
    return f"a {attrs.size} {attrs.colour} {attrs.shape} on a {attrs.background} background, {attrs.position}"


def parse_caption(text: str) -> Attributes:
    """Inverse of :func:`caption`; raises ``ValueError`` naming the expected form on other text."""
    match = _CAPTION_RE.match(" ".join(text.lower().split()))
    if match is None:
        raise ValueError(
            f"cannot parse {text!r}; expected 'a <size> <colour> <shape> on a <colour> background, <position>', "
            "e.g. 'a small red circle on a blue background, top left'."
        )
    return Attributes(**match.groupdict())


def all_attributes() -> list[Attributes]:
    """Every valid combination (3 shapes x 6 colours x 5 backgrounds x 4 positions x 2 sizes = 720)."""
    return [
        Attributes(shape, colour, background, position, size)
        for shape in SHAPES
        for colour in COLOURS
        for background in COLOURS
        if background != colour
        for position in POSITIONS
        for size in SIZES
    ]


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """Draw attributes uniformly (background uniform among the colours other than the shape's)."""
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    others = [c for c in COLOURS if c != colour]
    return Attributes(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        colour=colour,
        background=others[int(rng.integers(len(others)))],
        position=POSITIONS[int(rng.integers(len(POSITIONS)))],
        size=SIZES[int(rng.integers(len(SIZES)))],
    )


def shape_mask(
    shape: str, centre: tuple[float, float], radius: float, size: int = IMAGE_SIZE, supersample: int = 4
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape on a ``size`` x ``size`` grid (``centre`` is (x, y) in pixels)."""
    n = size * supersample
    coords = (np.arange(n, dtype=np.float64) + 0.5) / supersample
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - centre[0], y - centre[1]
    if shape == "circle":
        inside = dx**2 + dy**2 <= radius**2
    elif shape == "square":
        half = radius * 0.886  # same area as the circle
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":
        r = radius * 1.3  # circumradius of an upward equilateral triangle of similar area
        # Inside when below the two slanted edges and above the base.
        base = dy <= r / 2
        left = np.sqrt(3.0) * dx - dy <= r
        right = -np.sqrt(3.0) * dx - dy <= r
        inside = base & left & right
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}.")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(attrs: Attributes, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one image as ``uint8`` (size, size, 3); ``rng`` only jitters the position by up to 2 px."""
    column = 0 if attrs.position.endswith("left") else 1
    row = 0 if attrs.position.startswith("top") else 1
    quarter = size / 4
    jitter = rng.uniform(-_JITTER, _JITTER, size=2)
    centre = (quarter * (1 + 2 * column) + jitter[0], quarter * (1 + 2 * row) + jitter[1])
    mask = shape_mask(attrs.shape, centre, _RADIUS[attrs.size] * size / IMAGE_SIZE, size)[..., None]
    fg = np.asarray(PALETTE[attrs.colour], dtype=np.float64)
    bg = np.asarray(PALETTE[attrs.background], dtype=np.float64)
    return np.round(mask * fg + (1.0 - mask) * bg).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ShapesBatch:
    """Images as uint8 (N, H, W, 3), their captions and per-attribute integer labels (N,)."""

    images: np.ndarray
    captions: list[str]
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.captions)


def make_dataset(count: int, seed: int) -> ShapesBatch:
    """``count`` random images with exact captions; the same seed always gives the same batch.

    >>> a, b = make_dataset(4, seed=1), make_dataset(4, seed=1)
    >>> bool((a.images == b.images).all()) and a.captions == b.captions
    True
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng) for _ in range(count)]
    images = np.stack([render(a, rng) for a in attrs])
    labels = {name: np.array([a.labels()[name] for a in attrs], dtype=np.int64) for name in ATTRIBUTE_CLASSES}
    return ShapesBatch(images=images, captions=[caption(a) for a in attrs], labels=labels)


def caption_words() -> list[str]:
    """Every word (and the comma) that captions use, in a fixed order; the tokenizer's vocabulary."""
    words: list[str] = ["a", "an", "on", "background", ","]
    for group in (SIZES, COLOURS, SHAPES):
        words.extend(group)
    for position in POSITIONS:
        for word in position.split():
            if word not in words:
                words.append(word)
    return words


def iter_batches(batch_size: int, seed: int) -> Iterator[ShapesBatch]:
    """An endless stream of fresh random batches (seeded: the stream is reproducible).

    >>> batches = iter_batches(2, seed=5)
    >>> next(batches).captions == make_dataset(2, seed=5 * 1_000_003).captions
    True
    """
    index = 0
    while True:
        yield make_dataset(batch_size, seed=seed * 1_000_003 + index)
        index += 1


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] (what the autoencoder and the classifier take)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
