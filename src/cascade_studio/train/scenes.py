"""Deterministic captioned scenes: 1-3 identical shapes of one colour and size, at one place, on a plain background.

The data of the demo model. Every scene is drawn from a seeded `random.Random`, so a seed fixes the whole data
stream. Some colour-shape pairs are held out of training entirely, to measure whether the model composes words
it saw apart ("red" and "triangle") into a picture it never saw ("a red triangle").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# 3x3 grid cells (column, row) of a scene; the names a caption uses for them.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "centre": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
COUNTS = {1: "a", 2: "two", 3: "three"}
# Never drawn in training; evaluation asks for exactly these.
HELD_OUT = frozenset(
    {
        ("red", "triangle"),
        ("blue", "circle"),
        ("green", "square"),
        ("yellow", "circle"),
        ("purple", "square"),
        ("white", "triangle"),
    }
)
SIZE_PX = {"small": 0.14, "large": 0.28}  # shape width as a fraction of the image side


@dataclass(frozen=True)
class Scene:
    background: str
    colour: str
    shape: str
    size: str
    position: str
    count: int

    def prompt(self) -> str:
        """The plain, fully specified caption used for evaluation."""
        noun = self.shape + ("s" if self.count > 1 else "")
        where = position_phrase(self.position, 0)
        return f"{COUNTS[self.count]} {self.size} {self.colour} {noun} {where} on a {self.background} background"


def sample_scene(rng: random.Random, *, held_out: bool = False) -> Scene:
    """A random scene; `held_out` picks only from the held-out colour-shape pairs, otherwise never from them."""
    while True:
        colour, shape = rng.choice(list(PALETTE)), rng.choice(SHAPES)
        if ((colour, shape) in HELD_OUT) == held_out:
            break
    background = rng.choice([c for c in PALETTE if c != colour])
    count = rng.choice((1, 1, 2, 3))
    size = "small" if count > 1 else rng.choice(SIZES)
    return Scene(background, colour, shape, size, rng.choice(list(POSITIONS)), count)


def position_phrase(position: str, variant: int) -> str:
    if position == "centre":
        return ("in the centre", "in the center", "in the middle")[variant % 3]
    if " " in position:
        return (f"at the {position}", f"in the {position} corner", f"at the {position}")[variant % 3]
    if position in ("top", "bottom"):
        return (f"at the {position}", f"at the {position}", f"near the {position}")[variant % 3]
    return (f"on the {position}", f"at the {position}", f"on the {position} side")[variant % 3]


# Other words people use for a shape or a colour: captions use them now and then, so the text encoder learns them.
SHAPE_WORDS = {"circle": ("circle", "ball", "dot"), "square": ("square", "box"), "triangle": ("triangle",)}
COLOUR_WORDS = {"purple": ("purple", "violet")}


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("x") else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: random.Random) -> str:
    """One of several plain-English phrasings, as people write them: some leave out size, count, place or background
    (the scene then shows some, never the background in the shape's colour), some put the background first or after
    a comma; now and then another word for the shape ("ball", "box") or colour ("violet"), "an" or "one" for a
    single shape, a capital and a full stop. `mentioned` says which attributes a caption states."""
    word = rng.choice(SHAPE_WORDS[scene.shape]) if rng.random() < 0.2 else scene.shape
    noun = plural(word) if scene.count > 1 else word
    colour, bg = (rng.choice(COLOUR_WORDS.get(c, (c,))) for c in (scene.colour, scene.background))
    size = {"small": rng.choice(("small", "small", "little")), "large": rng.choice(("large", "large", "big"))}[
        scene.size
    ]
    if scene.count == 1:
        count = "one" if rng.random() < 0.15 else "a"
        sized, bare = f"{count} {size} {colour} {noun}", f"{count} {colour} {noun}"
        if count == "a":  # "an orange circle", "a large orange circle"
            sized, bare = f"{article(size)} {size} {colour} {noun}", f"{article(colour)} {colour} {noun}"
    else:
        count = COUNTS[scene.count]
        sized, bare = f"{count} {size} {colour} {noun}", f"{count} {colour} {noun}"
    where = position_phrase(scene.position, rng.randrange(3))
    on_bg = f"on {article(bg)} {bg} background"
    templates = [
        f"{sized} {where} {on_bg}",
        f"{bare} {where} {on_bg}",
        f"{article(bg)} {bg} background with {sized} {where}",
        f"{sized} {on_bg}, {where}",
        f"{sized} {where}",
        f"{on_bg}, {sized} {where}",
        f"{colour} {noun}, {bg} background",  # no count: a plural leaves it to the scene
        f"{bare}",
    ]
    if scene.count == 1:
        templates.append(f"{bare} {on_bg}")
    text = rng.choice(templates)
    if rng.random() < 0.2:
        text = text[0].upper() + text[1:]
    return text + "." if rng.random() < 0.2 else text


def mentioned(scene: Scene, text: str) -> dict[str, bool]:
    """Which attributes a caption states (an unstated one is the model's free choice)."""
    words = f" {text.lower().rstrip('.')} "
    return {
        "background": any(f" {c} background" in words for c in COLOUR_WORDS.get(scene.background, (scene.background,))),
        "size": any(f" {w} " in words for w in ("small", "little", "large", "big")),
        "position": any(k in words for k in (" left", " right", " top", " bottom", " centre", " center", " middle")),
        "count": scene.count == 1 or any(f" {w} " in words for w in ("two", "three")),
    }


def layout(scene: Scene, side: int, rng: random.Random | None = None) -> list[tuple[float, float, float]]:
    """Centres (x, y) and width of each shape: a small cluster around the centre of the scene's grid cell."""
    rng = rng or random.Random(0)
    col, row = POSITIONS[scene.position]
    cell = side / 3
    w = SIZE_PX[scene.size] * side
    cx = (col + 0.5) * cell + rng.uniform(-0.06, 0.06) * cell
    cy = (row + 0.5) * cell + rng.uniform(-0.06, 0.06) * cell
    # Centres 1.8 widths apart, so shapes of a group stand 0.8 of a width apart (14 px for small shapes at 128 px,
    # 3.6 Stage A latent positions). At 1.25 widths three squares stood 2 px apart: they merged in any
    # reconstruction, and the decoder drew every group as one blob.
    gap = w * 1.8
    offsets = {
        1: [(0, 0)],
        2: [(-gap / 2, 0), (gap / 2, 0)],
        3: [(-gap / 2, gap / 2), (gap / 2, gap / 2), (0, -gap / 2)],
    }
    # Keep the whole cluster inside the frame, with a margin, so no shape is clipped.
    ext_x = max(abs(dx) for dx, _ in offsets[scene.count]) + w / 2 + 2
    ext_y = max(abs(dy) for _, dy in offsets[scene.count]) + w / 2 + 2
    cx, cy = min(max(cx, ext_x), side - ext_x), min(max(cy, ext_y), side - ext_y)
    return [(cx + dx, cy + dy, w) for dx, dy in offsets[scene.count]]


def render(scene: Scene, side: int = 256, rng: random.Random | None = None) -> Image.Image:
    image = Image.new("RGB", (side, side), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    fill = PALETTE[scene.colour]
    for x, y, w in layout(scene, side, rng):
        draw_shape(draw, scene.shape, x, y, w, fill)
    return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, w: float, fill) -> None:
    """A circle, square or (upward) triangle of width w centred on (x, y)."""
    h = w / 2
    if shape == "circle":
        draw.ellipse((x - h, y - h, x + h, y + h), fill=fill)
    elif shape == "square":
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    else:
        draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill)
