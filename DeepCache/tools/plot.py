"""A small scatter plot drawn with Pillow (a dependency already; matplotlib is not): ``deepcache tune``'s Pareto plot.

Series of points in colours and shapes, an optional line through some points (the Pareto front), a dashed horizontal
line (the quality bound), one marked point (the choice), axes with round ticks and a legend. Points with a
non-finite coordinate are left out.

Example::

    >>> from DeepCache.tools.plot import Series, scatter_plot
    >>> image = scatter_plot([Series("uniform", [(1.5, 40.0), (2.5, 31.0)], (31, 119, 180))],
    ...                      x_label="speedup", y_label="PSNR dB", hline=(30.0, "bound"))
    >>> image.size
    (760, 500)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["MARKERS", "PALETTE", "Series", "nice_ticks", "scatter_plot"]

Point = tuple[float, float]
#: Colours for up to six series (matplotlib's first "tab" colours).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
)


#: The shapes a series can be drawn with.
MARKERS: tuple[str, ...] = ("circle", "square", "diamond", "triangle")


@dataclass(frozen=True)
class Series:
    """Points of one kind, drawn as filled ``marker`` shapes (:data:`MARKERS`) of ``colour`` and named in the legend."""

    label: str
    points: Sequence[Point]
    colour: tuple[int, int, int]
    marker: str = "circle"

    def __post_init__(self) -> None:
        if self.marker not in MARKERS:
            raise ValueError(f"marker must be one of {MARKERS}, got {self.marker!r}.")


def _shape(draw: Any, marker: str, cx: float, cy: float, r: float, fill: Any, outline: Any) -> None:
    """One marker of radius ``r`` centred at (cx, cy)."""
    if marker == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    elif marker == "diamond":
        r += 1
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill, outline=outline)
    elif marker == "triangle":
        r += 1
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill, outline=outline)
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 times a power of ten) covering ``[lo, hi]``.

    >>> nice_ticks(1.2, 3.9)
    [1.5, 2.0, 2.5, 3.0, 3.5]
    """
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + 1e-9 * step:
        ticks.append(round(k * step, 10))
        k += 1
    return ticks


def _finite(points: Sequence[Point]) -> list[Point]:
    return [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def _span(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.06 or max(abs(lo) * 0.05, 0.5)
    return lo - pad, hi + pad


def scatter_plot(series: Sequence[Series], *, x_label: str, y_label: str, title: str = "",
                 line: Sequence[Point] = (), hline: tuple[float, str] | None = None,
                 marked: tuple[Point, str] | None = None, size: tuple[int, int] = (760, 500)) -> Any:
    """The plot as a PIL image (``.save(path)`` writes a PNG).

    ``line``: points joined in order of x (the Pareto front); ``hline``: (y, label), dashed; ``marked``:
    (point, label), ringed and named.
    """
    from PIL import Image, ImageDraw, ImageFont

    points = [p for s in series for p in _finite(s.points)] + _finite(list(line))
    if marked is not None:
        points += _finite([marked[0]])
    if not points:
        raise ValueError("nothing to plot: no point has finite coordinates.")
    x_lo, x_hi = _span([x for x, _ in points])
    ys = [y for _, y in points] + ([hline[0]] if hline is not None and math.isfinite(hline[0]) else [])
    y_lo, y_hi = _span(ys)
    width, height = size
    left, right, top, bottom = 70, 16, 34 if title else 14, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    try:
        font: Any = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        font = ImageFont.load_default()

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    def text_size(text: str) -> tuple[int, int]:
        box = draw.textbbox((0, 0), text, font=font)
        return int(box[2] - box[0]), int(box[3] - box[1])

    grey, dark = (225, 225, 225), (40, 40, 40)
    for x in nice_ticks(x_lo, x_hi):
        px, _ = to_px(x, y_lo)
        draw.line([(px, top), (px, height - bottom)], fill=grey)
        label = f"{x:g}"
        draw.text((px - text_size(label)[0] / 2, height - bottom + 5), label, fill=dark, font=font)
    for y in nice_ticks(y_lo, y_hi):
        _, py = to_px(x_lo, y)
        draw.line([(left, py), (width - right, py)], fill=grey)
        label = f"{y:g}"
        w, h = text_size(label)
        draw.text((left - w - 6, py - h / 2 - 1), label, fill=dark, font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline=dark)
    w, _ = text_size(x_label)
    draw.text(((left + width - right - w) / 2, height - 20), x_label, fill=dark, font=font)
    w, h = text_size(y_label)
    rotated = Image.new("RGB", (w + 4, h + 6), "white")
    ImageDraw.Draw(rotated).text((2, 1), y_label, fill=dark, font=font)
    rotated = rotated.rotate(90, expand=True)
    image.paste(rotated, (4, int((top + height - bottom - rotated.height) / 2)))
    if title:
        w, _ = text_size(title)
        draw.text(((width - w) / 2, 10), title, fill=dark, font=font)

    if hline is not None and math.isfinite(hline[0]):
        _, py = to_px(x_lo, hline[0])
        for x0 in range(left, width - right, 12):
            draw.line([(x0, py), (min(x0 + 6, width - right), py)], fill=(200, 0, 0), width=1)
        w, _ = text_size(hline[1])  # right, below: the legend is bottom left
        draw.text((width - right - 6 - w, py + 3), hline[1], fill=(200, 0, 0), font=font)
    front = sorted(_finite(list(line)))
    if len(front) > 1:
        draw.line([to_px(x, y) for x, y in front], fill=(120, 120, 120), width=1)
    spot = to_px(*marked[0]) if marked is not None and _finite([marked[0]]) else None
    if marked is not None and spot is not None:  # the label under the points, the ring over them
        px, py = spot
        w, h = text_size(marked[1])
        tx = max(left + 2, px + 10 if px + 10 + w < width - right else px - 10 - w)  # a long label: from the left
        draw.rectangle([tx - 2, py - h - 10, tx + w + 2, py - 4], fill="white")
        draw.multiline_text((tx, py - h - 8), marked[1], fill=(0, 0, 0), font=font)
    for s in series:
        for x, y in _finite(s.points):
            px, py = to_px(x, y)
            _shape(draw, s.marker, px, py, 4, s.colour, dark)
    if spot is not None:
        px, py = spot
        draw.ellipse([px - 8, py - 8, px + 8, py + 8], outline=(0, 0, 0), width=2)

    entries = [(s.label, s.colour, s.marker) for s in series] + (
        [("Pareto front", None, "")] if len(front) > 1 else [])
    lx, ly = left + 8, height - bottom - 6 - 16 * len(entries)  # bottom left: dominated, usually empty
    for label, colour, marker in entries:
        if colour is None:
            draw.line([(lx, ly + 7), (lx + 10, ly + 7)], fill=(120, 120, 120), width=1)
        else:
            _shape(draw, marker, lx + 5, ly + 7, 4, colour, dark)
        draw.text((lx + 16, ly + 1), label, fill=dark, font=font)
        ly += 16
    return image
