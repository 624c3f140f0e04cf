"""Small PNG line plots drawn with Pillow (already a torchvision dependency), so fpdm needs no matplotlib.

Readable at any length: one logged point shows as a marker inside a padded range, a flat series gets a range
around its value, and tick labels carry enough digits to differ. `axis` computes a range and its ticks (a pure
function, what the tests check); `draw_plot` only draws them. Pillow is imported inside the functions: command
modules import this one on the CLI's start path."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
MARKERS_UP_TO = 40  # points per series drawn as markers; longer series are lines only


@dataclasses.dataclass(frozen=True)
class Axis:
    """A plotted range lo < hi and its ticks, in axis units: the value, or log10 of it on a log axis."""

    lo: float
    hi: float
    ticks: tuple[float, ...]
    labels: tuple[str, ...]
    log: bool = False

    def unit(self, value: float) -> float:
        """Where `value` sits along the axis: 0 at lo, 1 at hi."""
        return ((math.log10(value) if self.log else value) - self.lo) / (self.hi - self.lo)


def axis(values: Sequence[float], *, log: bool = False, integer: bool = False) -> Axis:
    """The range and ticks for `values` (finite, and > 0 on a log axis; none at all gives [0, 1]).

    The range is padded by 5% of the data's span each side, so no point sits on the frame; a single value (or a
    flat series) gets a span of its own: +-10% of it (+-1 at zero, +-1 on an `integer` axis such as steps, a
    quarter decade each way on a log axis). Ticks are 1-2-2.5-5 multiples in the range (whole numbers on an
    integer axis; decades, or 1-2-3-5 per decade, on a log axis) and at least two."""
    units = [math.log10(v) for v in values] if log else list(values)
    if not units:
        lo, hi = (-1.0, 0.0) if log else (0.0, 1.0)
    else:
        lo, hi = min(units), max(units)
        if hi - lo <= 1e-9 * max(1.0, abs(hi)):
            half = 0.25 if log else (1.0 if integer or lo == 0 else 0.1 * abs(lo))
            lo, hi = lo - half, hi + half
        else:
            pad = 0.05 * (hi - lo)
            lo, hi = lo - pad, hi + pad
    ticks = _log_ticks(lo, hi) if log else _linear_ticks(lo, hi, integer=integer)
    return Axis(lo, hi, tuple(math.log10(t) if log else t for t in ticks), _labels(ticks), log)


def _nice_step(span: float, *, integer: bool) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k at least span / 5 (at least 1 on an integer axis): under twice that,
    so at least two ticks fit."""
    raw = span / 5
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-12))
    return max(1.0, round(step)) if integer else step


def _linear_ticks(lo: float, hi: float, *, integer: bool) -> list[float]:
    step = _nice_step(hi - lo, integer=integer)
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks]  # no "-0" label


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis over [lo, hi] decades: every decade (or every k-th) over two or more, 1-2-3-5
    per decade over less, plain linear ticks within a factor of 5."""
    if hi - lo >= 2:
        every = math.ceil((hi - lo) / 6)
        return [10.0**k for k in range(math.ceil(lo), math.floor(hi) + 1) if k % every == 0]
    if hi - lo >= 0.7:  # 1, 2, 3, 5, 10 are at most 0.3 decades apart: two or more fall inside
        candidates = (m * 10.0**k for k in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 3, 5))
        return [t for t in candidates if lo - 1e-9 <= math.log10(t) <= hi + 1e-9]
    return [t for t in _linear_ticks(10.0**lo, 10.0**hi, integer=False) if t > 0]


def _labels(ticks: Sequence[float]) -> tuple[str, ...]:
    """Whole numbers as they are; others with the fewest significant digits (3 or more) that tell them apart."""
    if all(float(t).is_integer() and abs(t) < 1e7 for t in ticks):
        return tuple(str(int(t)) for t in ticks)
    for digits in range(3, 13):
        labels = tuple(f"{t:.{digits}g}" for t in ticks)
        if len(set(labels)) == len(labels):
            return labels
    return labels


def plottable(series: dict[str, Sequence[tuple[float, float]]], *, log_y: bool) -> dict[str, list[tuple[float, float]]]:
    """The points that can be drawn: finite x and y, and y > 0 on a log axis."""
    return {
        name: [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)]
        for name, pts in series.items()
    }


def plot_axes(series: dict[str, Sequence[tuple[float, float]]], *, log_y: bool = False) -> tuple[Axis, Axis]:
    """The x and y axes `draw_plot` uses for these series; x is an integer axis when every x is whole (steps)."""
    points = [p for pts in plottable(series, log_y=log_y).values() for p in pts]
    xs, ys = [x for x, _ in points], [y for _, y in points]
    return axis(xs, integer=all(float(x).is_integer() for x in xs)), axis(ys, log=log_y)


def line_plot(series: dict[str, Sequence[tuple[float, float]]], path: str | Path, **options: Any) -> Path:
    """draw_plot, saved to `path` (a temporary name, then renamed into place)."""
    return save_png(draw_plot(series, **options), path)  # draw_plot's keywords, checked by its signature


def save_png(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def stack_images(images: Sequence[Image.Image]) -> Image.Image:
    """Panels one above the other."""
    from PIL import Image

    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for img in images:
        out.paste(img, (0, y))
        y += img.height
    return out


def draw_plot(
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    size: tuple[int, int] = (720, 440),
) -> Image.Image:
    """Each named series of (x, y) points as a line, with markers up to MARKERS_UP_TO points (so a single point
    shows); non-finite (and, on a log axis, non-positive) points are skipped, and a plot left with none says so."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 70, 20, 36, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    shown = plottable(series, log_y=log_y)
    x_axis, y_axis = plot_axes(series, log_y=log_y)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            left + x_axis.unit(x) * (width - left - right),
            top + (1 - y_axis.unit(y)) * (height - top - bottom),
        )

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tick, label in zip(x_axis.ticks, x_axis.labels):
        px = left + (tick - x_axis.lo) / (x_axis.hi - x_axis.lo) * (width - left - right)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 3 * len(label), height - bottom + 6), label, fill="black", font=font)
    for tick, label in zip(y_axis.ticks, y_axis.labels):
        py = top + (1 - (tick - y_axis.lo) / (y_axis.hi - y_axis.lo)) * (height - top - bottom)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), label, fill="black", font=font)
    for n, (name, pts) in enumerate(shown.items()):
        color = COLORS[n % len(COLORS)]
        xy = [to_px(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for px, py in xy if len(xy) <= MARKERS_UP_TO else []:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.text((left + 10, top + 6 + 14 * n), name, fill=color, font=font)
    if not any(shown.values()):
        draw.text((width // 2 - 60, height // 2), "no finite values to plot", fill="black", font=font)
    draw.text((left, 10), title, fill="black", font=font)
    draw.text(((width - left) // 2, height - 18), xlabel, fill="black", font=font)
    draw.text((4, 18), ylabel, fill="black", font=font)
    return img
