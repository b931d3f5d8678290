"""Measure prompt adherence of a model on the scene prompts: generate, analyse the pixels, count hits.

    cascade-studio eval-demo                   # the shipped demo model, held-out and training combinations
    cascade-studio eval-demo --model DIR --n 100 --json eval.json --grid samples.png
"""

from __future__ import annotations

import random
from statistics import mean

from PIL import Image

from .analyze import ATTRIBUTES, analyze, score
from .scenes import sample_scene

SPLITS = {"held-out": True, "training": False}


def evaluate(engine, *, n: int = 60, seed: int = 0, **settings) -> dict:
    """Per split: the share of images showing each asked-for attribute, and the share showing all of them."""
    report: dict = {"model": engine.identity.name, "n": n, "seed": seed, "settings": settings, "splits": {}}
    for split, held_out in SPLITS.items():
        rng = random.Random(f"{seed}-{split}")
        rows = []
        for i in range(n):
            scene = sample_scene(rng, held_out=held_out)
            result = engine(engine.request(prompt=scene.prompt(), seed=seed * 100_000 + i, **settings))
            hits = score(scene, analyze(result.images[0]))
            rows.append({"prompt": scene.prompt(), "seed": result.seeds[0], "hits": hits, "image": result.images[0]})
        rates = {a: mean(r["hits"][a] for r in rows) for a in ATTRIBUTES}
        rates["all"] = mean(all(r["hits"].values()) for r in rows)
        report["splits"][split] = {"rates": rates, "samples": rows}
    return report


def table(report: dict) -> str:
    head = f"{'prompts':<10}" + "".join(f"{a:>11}" for a in (*ATTRIBUTES, "all"))
    lines = [f"{report['model']}: {report['n']} prompts per split, settings {report['settings'] or 'default'}", head]
    for split, data in report["splits"].items():
        lines.append(f"{split:<10}" + "".join(f"{data['rates'][a]:>10.0%} " for a in (*ATTRIBUTES, "all")))
    return "\n".join(lines)


def grid(report: dict, split: str = "held-out", count: int = 16, columns: int = 8) -> Image.Image:
    samples = report["splits"][split]["samples"][:count]
    side = samples[0]["image"].width
    rows = -(-len(samples) // columns)
    sheet = Image.new("RGB", (columns * side, rows * side), "white")
    for k, sample in enumerate(samples):
        sheet.paste(sample["image"], ((k % columns) * side, (k // columns) * side))
    return sheet


def json_ready(report: dict) -> dict:
    """The report without image objects."""
    out = {k: v for k, v in report.items() if k != "splits"}
    out["splits"] = {
        split: {"rates": d["rates"], "samples": [{k: v for k, v in s.items() if k != "image"} for s in d["samples"]]}
        for split, d in report["splits"].items()
    }
    return out
