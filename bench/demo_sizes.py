"""The demo model at the sizes clients ask for. It was trained on 128x128 pictures only; the engine has it draw its
128x128 scene, carry the plain background out to the shape asked for and enlarge it (engine.drawing_size). Before,
it ran at the size asked for, on a latent larger than it ever saw. Both ways, on the same prompts and seeds:

    python bench/demo_sizes.py            # 12 training prompts a size, both ways (about 10 min on 2 threads)
    python bench/demo_sizes.py --n 4 --sizes 256x256,256x128  # quicker

For each size: the share of pictures showing the background, the shape colour, the count and the shape the prompt
asked for (the count is the test of "one scene": a scene drawn twice has twice the shapes), all four, and the mean
seconds a picture. The picture is scored as a whole, brought to 128 pixels on its shorter side. The place is not
scored: in a wide picture the scene's "left" is left of its middle, not in the picture's left third. Writes
bench/results/demo-sizes.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from PIL import Image

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from cascade_studio.train.analyze import analyze, score
from cascade_studio.train.scenes import sample_scene

RESULTS = Path(__file__).parent / "results"
SIZES = ((128, 128), (256, 256), (512, 512), (1024, 1024), (256, 128), (1536, 1024), (1792, 1024))
SCORED = ("background", "colour", "count", "shape")


def scored(image: Image.Image, scene) -> dict[str, bool]:
    scale = 128 / min(image.size)
    small = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BOX)
    hits = score(scene, analyze(small))
    return {a: hits[a] for a in SCORED} | {"all four": all(hits[a] for a in SCORED)}


def run(engine: CascadeEngine, width: int, height: int, scenes: list, as_asked: bool) -> dict:
    if as_asked:
        engine.drawing_size = lambda w, h: (w, h)  # the engine before: the model runs at the size asked for
    try:
        rows, seconds = [], 0.0
        for i, scene in enumerate(scenes):
            t = time.perf_counter()
            image = engine(engine.request(prompt=scene.prompt(), seed=i, width=width, height=height)).images[0]
            seconds += time.perf_counter() - t
            rows.append(scored(image, scene))
    finally:
        engine.__dict__.pop("drawing_size", None)
    rates = {key: round(100 * sum(r[key] for r in rows) / len(rows), 1) for key in rows[0]}
    return rates | {"seconds": round(seconds / len(scenes), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="training prompts a size")
    parser.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES), help="e.g. 256x256,1792x1024")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo-sizes.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = CascadeEngine.from_settings(Settings(model="demo", device="cpu", torch_threads=2))
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(args.n)]
    report = {"prompts": args.n, "threads": 2, "sizes": {}}
    for width, height in (map(int, size.split("x")) for size in args.sizes.split(",")):
        row = {
            "drawn at 128x128": run(engine, width, height, scenes, as_asked=False),
            "at the size asked for (before)": run(engine, width, height, scenes, as_asked=True),
        }
        report["sizes"][f"{width}x{height}"] = row
        print(f"{width}x{height}", json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
