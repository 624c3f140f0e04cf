"""Small PNG line plots drawn with Pillow (already a torchvision dependency), so fpdm needs no matplotlib.

Pillow is imported inside the functions: command modules import this one on the CLI's start path."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


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
    """Each named series of (x, y) points as a line; non-finite (and, on a log axis, non-positive) y skipped."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 70, 20, 36, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    points = [(x, y) for pts in series.values() for x, y in pts if math.isfinite(y) and (y > 0 or not log_y)]
    if not points:
        raise ValueError("nothing to plot")
    fy = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(fy(p[1]) for p in points), max(fy(p[1]) for p in points)
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
        return px, top + (1 - (fy(y) - y_lo) / (y_hi - y_lo)) * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):  # ticks
        xv = x_lo + (x_hi - x_lo) * i / 4
        yv = y_lo + (y_hi - y_lo) * i / 4
        px, _ = to_px(xv, 10**y_lo if log_y else y_lo)
        py = top + (1 - i / 4) * (height - top - bottom)
        draw.text((px - 12, height - bottom + 6), f"{xv:.4g}", fill="black", font=font)
        draw.text((4, py - 6), f"{10**yv if log_y else yv:.3g}", fill="black", font=font)
    for n, (name, pts) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        xy = [to_px(x, y) for x, y in pts if math.isfinite(y) and (y > 0 or not log_y)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for px, py in xy if len(xy) <= 40 else []:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        draw.text((left + 10, top + 6 + 14 * n), name, fill=color, font=font)
    draw.text((left, 10), title, fill="black", font=font)
    draw.text(((width - left) // 2, height - 18), xlabel, fill="black", font=font)
    draw.text((4, 18), ylabel, fill="black", font=font)
    return img
