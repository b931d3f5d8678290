"""Score prompt adherence from pixels alone: background, shape colour, position, count and shape identity.

No learned judge: the background is the colour of the frame, shapes are the connected regions that differ from
it, a shape's identity is how much of its bounding box it fills (square 1.0, circle pi/4, triangle 1/2), and its
position is the 3x3 grid cell of the shapes' joint centroid. On the data's own renders it scores 100%.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .scenes import PALETTE, POSITIONS, Scene

ATTRIBUTES = ("background", "colour", "position", "count", "shape")
_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=float)
_CELLS = {cell: name for name, cell in POSITIONS.items()}


@dataclass(frozen=True)
class Detected:
    background: str
    colour: str | None
    position: str | None
    count: int
    shape: str | None


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_RGB - rgb) ** 2).sum(axis=1)))]


def _components(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    """4-connected regions of `mask` with at least `min_area` pixels, each as an (N, 2) array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(pixels) >= min_area:
            regions.append(np.array(pixels))
    return regions


def _shape_of(region: np.ndarray) -> str:
    ys, xs = region[:, 0], region[:, 1]
    fill = len(region) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"


def analyze(image: Image.Image) -> Detected:
    arr = np.asarray(image.convert("RGB"), dtype=float)
    side = arr.shape[0]
    frame = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3), arr[:, :2].reshape(-1, 3),
                            arr[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(frame, axis=0)
    mask = np.sqrt(((arr - bg_rgb) ** 2).sum(axis=-1)) > 60
    # A small shape covers about (0.14 * side)^2 / 2 pixels as a triangle; ignore specks far below that.
    regions = _components(mask, min_area=int((0.14 * side) ** 2 * 0.2))
    background = nearest_colour(bg_rgb)
    if not regions:
        return Detected(background, None, None, 0, None)
    pixels = np.concatenate(regions)
    colour = nearest_colour(arr[pixels[:, 0], pixels[:, 1]].mean(axis=0))
    cy, cx = pixels.mean(axis=0)
    cell = (min(int(cx // (side / 3)), 2), min(int(cy // (side / 3)), 2))
    shapes = [_shape_of(r) for r in regions]
    shape = max(set(shapes), key=shapes.count)
    return Detected(background, colour, _CELLS[cell], len(regions), shape)


def score(scene: Scene, detected: Detected) -> dict[str, bool]:
    """Per attribute: did the image show what the prompt asked for?"""
    asked = asdict(scene)
    return {a: asked[a] == getattr(detected, a) for a in ATTRIBUTES}
