"""Would the demo decoder draw colour-shape pairs it never saw if its Stage C latent said the shape plainly, in any
colour? The official Stage B decodes a frozen EfficientNet trained elsewhere on labels; the demo's image encoder
learns jointly with its decoder, on the palette's scenes only, and a linear probe barely reads the shape off its
latent (34% of held-out scenes, 44% of training ones; chance 33%). Fresh decoders of the demo architecture learn
Stage B's recipe for the same steps, on the same scenes and the shipped Stage A, in three arms:

- joint: with a fresh image encoder, as `train-demo` does;
- frozen: on an image encoder first taught to say, at each of its 3x3 cells, whether a shape is there, which shape,
  how many, how large, where in the cell, and the colours (regressed as RGB) of the shapes and of the background,
  on scenes three quarters of which are drawn in random colours. No shape is ever drawn in a colour whose nearest
  palette colour makes a held-out pair with it, so the held-out pairs stay unseen by every part.
- taught-joint: that taught encoder, then trained on jointly with its decoder as in `joint`, its head's loss on
  fresh recoloured scenes added at every step (so its latent keeps saying the shape in any colour while it learns
  what the decoder needs besides).

Each is scored as `eval-demo --stage decoder` scores the shipped one: from each scene's true latent, on the held-out
and training splits, with the analyser.

    python bench/frozen_encoder.py --steps 6000 --threads 2     # the three arms, about 75 min
    python bench/frozen_encoder.py --arms frozen --steps 300 --encoder-steps 100 --n 4   # a smoke run

Prints each arm's rates and writes bench/results/frozen_encoder-<steps>.json (or --out).
"""

from __future__ import annotations

import cascade_studio  # noqa: F401 - first: it makes torchvision importable (see _torchvision.py)

# isort: split
import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableCascadeUNet
from torch import nn

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from cascade_studio.train import stages
from cascade_studio.train.analyze import nearest_colour
from cascade_studio.train.evaluate import evaluate_decoder, json_ready
from cascade_studio.train.run import DEMO_DECODER
from cascade_studio.train.scenes import HELD_OUT, PALETTE, POSITIONS, SHAPES, SIZES, Scene, render, sample_scene

# What the frozen encoder's 1x1 head reads at each cell: class logits and regressed values.
CLASSES = {"shape": len(SHAPES), "count": 3, "size": len(SIZES)}
REGRESSED = {"occupied": 1, "offset": 2, "colour": 3, "background": 3}


def random_colour(rng: random.Random, shape: str, other: np.ndarray | None = None) -> np.ndarray:
    """A random RGB colour (0-1) that names no held-out pair with `shape` (by the analyser's nearest palette colour)
    and stands clear of `other`."""
    while True:
        rgb = np.array([rng.random() for _ in range(3)], dtype=np.float32)
        named = nearest_colour(rgb * 255)
        if (named, shape) not in HELD_OUT and (other is None or np.abs(rgb - other).sum() > 0.45):
            return rgb


def cell_of(scene: Scene) -> int:
    """The index (row-major, 0-8) of the 3x3 latent cell that holds the scene's shapes."""
    col, row = POSITIONS[scene.position]
    return row * 3 + col


def labelled_batch(rng: random.Random, n: int, any_colour: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n scenes (any_colour of them recoloured) and, per cell, what the head should read there."""
    images, labels = [], {k: [] for k in (*CLASSES, *REGRESSED, "cell")}
    for _ in range(n):
        scene = sample_scene(rng)
        pixels = np.asarray(render(scene, stages.SIDE, rng), dtype=np.float32) / 255
        fg = (pixels != np.array(PALETTE[scene.background], dtype=np.float32) / 255).any(axis=2)
        colour, background = (np.array(PALETTE[c], dtype=np.float32) / 255 for c in (scene.colour, scene.background))
        if rng.random() < any_colour:
            colour = random_colour(rng, scene.shape)
            background = random_colour(rng, "", colour)
            pixels = np.where(fg[..., None], colour, background)
        col, row = POSITIONS[scene.position]
        ys, xs = np.nonzero(fg)
        cell = stages.SIDE / 3
        offset = [(xs.mean() / cell - col - 0.5), (ys.mean() / cell - row - 0.5)]
        images.append(pixels)
        for key, value in (
            ("shape", SHAPES.index(scene.shape)),
            ("count", scene.count - 1),
            ("size", SIZES.index(scene.size)),
            ("offset", offset),
            ("colour", colour),
            ("background", background),
            ("cell", cell_of(scene)),
        ):
            labels[key].append(value)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return batch, {k: torch.tensor(np.array(v)) for k, v in labels.items() if v}


def head_loss(encoder, head: nn.Module, images: torch.Tensor, y: dict[str, torch.Tensor]) -> torch.Tensor:
    """How far the head's reading of the encoder's latent is from the scenes' labels (labelled_batch)."""
    batch = len(images)
    out = head(encoder(stages.encoder_view(images))).flatten(2)  # B x K x 9
    sizes = [*CLASSES.values(), *REGRESSED.values()]
    at = dict(zip([*CLASSES, *REGRESSED], out[torch.arange(batch), :, y["cell"]].split(sizes, dim=1)))  # shape cell
    every = dict(zip([*CLASSES, *REGRESSED], out.split(sizes, dim=1)))
    loss = sum(F.cross_entropy(at[k], y[k]) for k in CLASSES)
    loss = loss + F.binary_cross_entropy_with_logits(every["occupied"][:, 0], F.one_hot(y["cell"], 9).float())
    loss = loss + 10 * F.mse_loss(at["offset"], y["offset"].float())
    loss = loss + 10 * F.mse_loss(at["colour"], y["colour"])
    return loss + 10 * F.mse_loss(every["background"], y["background"][..., None].expand(-1, -1, 9))


def teach_encoder(steps: int, rng: random.Random, log, any_colour: float = 0.75, batch: int = 32):
    """A fresh ImageEncoder with a 1x1 head taught to read the scene off its 3x3 latent (see the module doc)."""
    encoder = stages.ImageEncoder()
    head = nn.Conv2d(16, sum(CLASSES.values()) + sum(REGRESSED.values()), 1)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    sched = stages.schedule(opt, steps, 2e-3)

    def step(_: int) -> float:
        loss = head_loss(encoder, head, *labelled_batch(rng, batch, any_colour))
        stages.optimise(opt, sched, loss, clip=params)
        return loss.item()

    losses = stages.run_steps("encoder", steps, step, log, every=max(1, steps // 10))
    return encoder.eval().requires_grad_(False), head.eval(), losses


def kept_head(encoder, head: nn.Module, rng: random.Random, batch: int = 16) -> tuple[list, Callable]:
    """train_stage_b's `extra` for the taught-joint arm: the taught encoder learns on with its decoder, and its
    head's loss on fresh recoloured scenes joins every step, so its latent keeps saying the shape in any colour."""
    encoder.train().requires_grad_(True)
    head.train()
    return list(head.parameters()), lambda: head_loss(encoder, head, *labelled_batch(rng, batch, 0.75))


@torch.no_grad()
def head_shape_rates(encoder, head, rng: random.Random, n: int = 600) -> dict[str, float]:
    """How often the frozen encoder's own head names the shape of palette scenes, per split."""
    rates = {}
    for split, held_out in (("held-out", True), ("training", False)):
        scenes: list[Scene] = [sample_scene(rng, held_out=held_out) for _ in range(n)]
        images = torch.stack(
            [torch.from_numpy(np.asarray(render(s, stages.SIDE, rng), dtype=np.float32) / 255) for s in scenes]
        ).permute(0, 3, 1, 2)
        out = head(encoder(stages.encoder_view(images))).flatten(2)
        cells = torch.tensor([cell_of(s) for s in scenes])
        guess = out[torch.arange(n), : len(SHAPES), cells].argmax(1)
        rates[split] = float((guess == torch.tensor([SHAPES.index(s.shape) for s in scenes])).float().mean())
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arms", nargs="+", choices=("joint", "frozen", "taught-joint"), default=["joint", "frozen", "taught-joint"]
    )
    parser.add_argument("--steps", type=int, default=6000, help="Stage B steps of each arm's decoder")
    parser.add_argument("--encoder-steps", type=int, default=3000, help="steps that teach the frozen arm's encoder")
    parser.add_argument("--scenes", type=int, default=10000, help="scenes encoded for the decoders (Stage B's)")
    parser.add_argument("--n", type=int, default=60, help="scenes scored per split and seed")
    parser.add_argument("--seeds", type=int, default=2, help="prompt seeds scored, from 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    engine = CascadeEngine.from_settings(Settings(model="demo", device="cpu"))
    pipe = engine.pipelines.decoder
    rng = random.Random(args.seed)
    data = stages.decoder_dataset(pipe.vqgan, args.scenes, rng, print, scale=pipe.vqgan.config.scale_factor)

    report: dict = {"steps": args.steps, "scenes": args.scenes, "threads": args.threads, "arms": {}}
    for arm in args.arms:
        start, row = time.perf_counter(), {}
        if arm in ("frozen", "taught-joint"):
            encoder, head, row["encoder_losses"] = teach_encoder(args.encoder_steps, random.Random(args.seed), print)
            row["encoder_minutes"] = (time.perf_counter() - start) / 60
            row["head_shape_right"] = head_shape_rates(encoder, head, random.Random(f"{args.seed}-head"))
            print(f"{arm}: the taught encoder's own head names the shape: {row['head_shape_right']}")
        else:
            encoder = stages.ImageEncoder()
        decoder = StableCascadeUNet(**DEMO_DECODER)
        arm_rng, arm_gen = random.Random(f"{args.seed}-{arm}"), torch.Generator().manual_seed(args.seed + 1)
        taught_joint = arm == "taught-joint"
        extra = kept_head(encoder, head, random.Random(f"{arm_rng.random()}-labels")) if taught_joint else None
        row["losses"] = stages.train_stage_b(decoder, encoder, data, args.steps, arm_rng, arm_gen, print, extra=extra)
        if taught_joint:
            row["head_shape_right_after"] = head_shape_rates(encoder.eval(), head.eval(), random.Random("after"))
        row["minutes"] = (time.perf_counter() - start) / 60
        pipe.decoder = decoder.eval()
        scored = json_ready(evaluate_decoder(engine, encoder.eval(), n=args.n, seeds=range(args.seeds)))
        row |= {k: scored[k] for k in ("settings", "shape_probe", "shape_word_effect")}
        row["splits"] = {
            s: {k: d[k] for k in ("rates", "standard_errors", "shape_rates")} for s, d in scored["splits"].items()
        }
        report["arms"][arm] = row
        for split, d in row["splits"].items():
            print(
                f"{arm} {split}: " + ", ".join(f"{k} {v:.0%}" for k, v in d["rates"].items()) + f"; {d['shape_rates']}"
            )
        print(f"{arm}: probe {row['shape_probe']}, {row['minutes']:.1f} min")
    out = args.out or Path(__file__).parent / "results" / f"frozen_encoder-{args.steps}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
