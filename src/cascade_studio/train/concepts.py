"""Two things the demo model has never seen, to prove LoRA training on: the colour teal and the shape cross (a plus
sign). A LoRA adapts the prior and Stage B, never Stage A, so Stage A must be able to draw what is new, as the
official one draws any colour: the demo's Stage A decoder is trained on pictures in random colours too (since run 14
of the shipped model, a teal square comes back from Stage A alone as 0,127,127; before, as a blue 31,89,165).
`write_concept` draws a small captioned dataset of one of them (kohya's layout: picture + .txt), and `shows_concept`
tells from the pixels whether a generated picture shows it.

Training captions use some backgrounds, places and partners; evaluation prompts ask for others ("unlike the
training captions"), so a LoRA that only memorised its pictures fails them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .analyze import _components, foreground
from .scenes import PALETTE, SIZE_PX, Scene, draw_shape, layout

TEAL = (0, 128, 128)
CONCEPTS = ("teal", "cross")
# What the training pictures use, and what evaluation asks for instead.
TRAIN = {
    "teal": dict(
        shapes=("circle", "square"),
        backgrounds=("white", "black", "yellow", "green", "blue"),
        positions=("left", "centre", "right", "top"),
    ),
    "cross": dict(
        colours=("red", "blue", "black", "green", "yellow"),
        backgrounds=("white", "yellow", "green", "red", "purple"),
        positions=("left", "centre", "right", "top"),
    ),
}
HELD_OUT = {
    "teal": dict(
        shapes=("triangle", "square", "circle"),
        backgrounds=("orange", "red", "purple"),
        positions=("top left", "bottom right", "bottom", "top right"),
    ),
    "cross": dict(
        colours=("orange", "purple", "white"),
        backgrounds=("black", "blue", "orange"),
        positions=("top left", "bottom right", "bottom", "top right"),
    ),
}


@dataclass(frozen=True)
class ConceptScene:
    concept: str
    background: str
    colour: str  # "teal" for the colour concept
    shape: str  # "cross" for the shape concept
    position: str

    def prompt(self) -> str:
        where = "in the centre" if self.position == "centre" else f"at the {self.position}"
        return f"a large {self.colour} {self.shape} {where} on a {self.background} background"


def sample(concept: str, rng: random.Random, held_out: bool = False) -> ConceptScene:
    pool = HELD_OUT[concept] if held_out else TRAIN[concept]
    background = rng.choice(pool["backgrounds"])
    if concept == "teal":
        return ConceptScene(concept, background, "teal", rng.choice(pool["shapes"]), rng.choice(pool["positions"]))
    colours = [c for c in pool["colours"] if c != background]
    return ConceptScene(concept, background, rng.choice(colours), "cross", rng.choice(pool["positions"]))


def render(scene: ConceptScene, side: int = 128) -> Image.Image:
    image = Image.new("RGB", (side, side), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    fill = TEAL if scene.colour == "teal" else PALETTE[scene.colour]
    base = Scene(scene.background, "red", "circle", "large", scene.position, 1)
    ((x, y, w),) = layout(base, side)
    if scene.shape == "cross":
        h, t = w / 2, w / 6  # arms a third of the width
        draw.rectangle((x - h, y - t, x + h, y + t), fill=fill)
        draw.rectangle((x - t, y - h, x + t, y + h), fill=fill)
    else:
        draw_shape(draw, scene.shape, x, y, w, fill)
    return image


def write_concept(concept: str, folder: Path, n: int = 40, seed: int = 0) -> Path:
    """n captioned pictures of a concept (at most 40: the proof's budget), kohya's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        scene = sample(concept, rng)
        render(scene).save(folder / f"{concept}-{i:02d}.png")
        (folder / f"{concept}-{i:02d}.txt").write_text(scene.prompt())
    return folder


_NAMES = [*PALETTE, "teal"]
_RGB = np.array([*PALETTE.values(), TEAL], dtype=float)


def _colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_RGB - rgb) ** 2).sum(axis=1)))]


def is_cross(region: np.ndarray) -> bool:
    """A plus sign: its box's four corners empty, its middle full, and it fills about 5/9 of its box (a circle
    fills 0.79 and has some of each corner; a square fills all of it)."""
    ys, xs = region[:, 0] - region[:, 0].min(), region[:, 1] - region[:, 1].min()
    h, w = ys.max() + 1, xs.max() + 1
    if h < 6 or w < 6 or not 0.6 < h / w < 1.6:
        return False
    mask = np.zeros((h, w), dtype=bool)
    mask[ys, xs] = True
    ph, pw = max(1, round(0.2 * h)), max(1, round(0.2 * w))
    corners = [mask[:ph, :pw].mean(), mask[:ph, -pw:].mean(), mask[-ph:, :pw].mean(), mask[-ph:, -pw:].mean()]
    middle = mask[h // 3 : 2 * h // 3 + 1, w // 3 : 2 * w // 3 + 1].mean()
    return max(corners) < 0.15 and middle > 0.8 and 0.4 < mask.mean() < 0.7


def shows_concept(image: Image.Image, concept: str) -> bool:
    """Whether the picture shows the concept: a teal foreground, or a cross-shaped one."""
    arr = np.asarray(image.convert("RGB"), dtype=float)
    side = arr.shape[0]
    mask, _ = foreground(arr)
    regions = _components(mask, min_area=int((SIZE_PX["small"] * side) ** 2 * 0.2))
    if not regions:
        return False
    if concept == "teal":
        pixels = np.concatenate(regions)
        return _colour(arr[pixels[:, 0], pixels[:, 1]].mean(axis=0)) == "teal"
    return any(is_cross(r) for r in regions)
