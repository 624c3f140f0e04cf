"""Rebuild this folder from scikit-image's bundled sample photographs (see LICENSE.md for each file's license).

    pip download scikit-image --no-deps -d /tmp/skimage && python -m zipfile -e /tmp/skimage/*.whl /tmp/skimage/x
    python tests/data/photos/make_photos.py /tmp/skimage/x/skimage/data

Every photo is downscaled (Lanczos) to a few dozen pixels and stored in another size and mode, so the folder
holds what a real reference set holds: class subfolders, mixed sizes, gray, RGB, RGBA, a palette, 16-bit gray,
gray stored as RGB, a JPEG, and one truncated file. Only Pillow and numpy are needed; the output is deterministic.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def small(source: Path, size: tuple[int, int], mode: str) -> Image.Image:
    with Image.open(source) as im:
        return im.convert(mode).resize(size, Image.Resampling.LANCZOS)


def main(data: Path) -> None:
    scenes, textures = HERE / "scenes", HERE / "textures"
    scenes.mkdir(exist_ok=True)
    textures.mkdir(exist_ok=True)
    small(data / "astronaut.png", (40, 40), "RGB").save(scenes / "astronaut.png", optimize=True)
    cat = small(data / "chelsea.png", (48, 32), "RGB").convert("RGBA")
    cat.putalpha(Image.linear_gradient("L").resize((48, 32)).point(lambda v: 128 + v // 2))  # half to fully opaque
    cat.save(scenes / "chelsea.png", optimize=True)
    small(data / "coffee.png", (36, 24), "RGB").save(scenes / "coffee.jpg", quality=85)
    rocket = small(data / "rocket.jpg", (32, 21), "RGB").quantize(colors=32, method=Image.Quantize.MEDIANCUT)
    rocket.save(scenes / "rocket.png", optimize=True)  # a palette image
    small(data / "camera.png", (32, 32), "L").convert("RGB").save(scenes / "camera.png")  # gray stored as RGB
    small(data / "clock_motion.png", (32, 24), "L").save(textures / "clock.png", optimize=True)
    small(data / "grass.png", (32, 32), "L").save(textures / "grass.png", optimize=True)
    wide = np.asarray(small(data / "gravel.png", (32, 32), "L"), dtype=np.uint16) * 257  # 16-bit gray
    Image.fromarray(wide).save(textures / "gravel.png")
    small(data / "brick.png", (28, 28), "LA").save(textures / "brick.png", optimize=True)  # gray + alpha
    small(data / "cell.png", (40, 32), "L").save(textures / "broken.png")
    broken = (textures / "broken.png").read_bytes()
    (textures / "broken.png").write_bytes(broken[: len(broken) // 2])  # truncated: its pixels cannot be decoded


if __name__ == "__main__":
    main(Path(sys.argv[1]))
