"""Which colours can the demo's Stage A draw? A LoRA adapts the prior and Stage B, never Stage A, so a colour Stage A
cannot give back is one no LoRA can teach. Encoded and decoded by Stage A alone: 64 training scenes (the 8 palette
colours), the same 64 scenes with their two colours swapped for random ones, and a teal square.

    python bench/stage_a_colours.py                                   # the shipped model's Stage A
    python bench/stage_a_colours.py --vqgan OLD/vqgan --out /tmp/x.json  # another Stage A folder

Prints the mean |error| per pixel (0-255) of each set and the teal square's centre, and writes
bench/results/stage_a_colours.json (or --out).
"""

from __future__ import annotations

import cascade_studio  # noqa: F401 - first: it makes torchvision importable (see _torchvision.py)

# isort: split
import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

from cascade_studio.models.source import DEMO_DIR
from cascade_studio.train.checkpoint import load_model
from cascade_studio.train.concepts import TEAL, ConceptScene, render
from cascade_studio.train.evaluate import decoded_image
from cascade_studio.train.stages import scene_images

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def round_trip(vqgan: PaellaVQModel, pixels: torch.Tensor) -> torch.Tensor:
    return vqgan.decode(vqgan.encode(pixels).latents).sample.clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vqgan", type=Path, default=DEMO_DIR / "vqgan")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "stage_a_colours.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    vqgan = load_model(PaellaVQModel, args.vqgan).eval()
    palette, _ = scene_images(random.Random(123), args.n, 128)
    recoloured, _ = scene_images(random.Random(123), args.n, 128, any_colour=1.0)
    teal = render(ConceptScene("teal", "red", "teal", "square", "centre"), 128)
    teal = torch.from_numpy(np.asarray(teal, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        teal_back = decoded_image(vqgan, vqgan.encode(teal).latents)
    report = {
        "vqgan": str(args.vqgan),
        "scenes": args.n,
        "palette_scenes_mean_error": round((round_trip(vqgan, palette) - palette).abs().mean().item() * 255, 2),
        "random_colour_scenes_mean_error": round(
            (round_trip(vqgan, recoloured) - recoloured).abs().mean().item() * 255, 2
        ),
        "teal": list(TEAL),
        "teal_square_centre": list(teal_back.getpixel((64, 64))),
    }
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
