"""Can the demo decoder draw a shape when its Stage C latent says exactly what to draw? A fresh decoder of the demo
architecture learns from an exact, hand-made code in place of the image encoder's latent (at the shapes' 3x3 cell,
one-hots of colour, shape, size and count; in every other cell, the background colour), with the demo recipe's
Stage B loss on the shipped Stage A's latents. It is sampled with the stock decoder pipeline at the demo defaults and
scored by `eval-demo`'s analyser. The code hides nothing, so what this decoder misses is the decoder's own doing.

    python bench/decoder_oracle.py --steps 4000                   # every shape; about 14 min on 1 thread
    python bench/decoder_oracle.py --shapes square --steps 8000   # squares only
    python bench/decoder_oracle.py --shapes square --channels 128 256   # a wider decoder

Prints the rates and writes bench/results/decoder_oracle-<shapes>-<steps>.json (or --out).
"""

from __future__ import annotations

import cascade_studio  # noqa: F401 - first: it makes torchvision importable (see _torchvision.py)

# isort: split
import argparse
import json
import random
import time
from pathlib import Path
from statistics import mean

import torch
from diffusers import StableCascadeUNet

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from cascade_studio.train import stages
from cascade_studio.train.analyze import ATTRIBUTES, analyze, score
from cascade_studio.train.evaluate import BY_SIZE, shape_rates
from cascade_studio.train.run import DEMO_DECODER
from cascade_studio.train.scenes import PALETTE, POSITIONS, SHAPES, SIZES, Scene, sample_scene

COLOURS = list(PALETTE)


def oracle_code(scene: Scene) -> torch.Tensor:
    """16 x 3 x 3, the size of a demo Stage C latent: the shapes' cell holds one-hots of colour (8), shape (3), size
    (2) and count (3); every other cell the background colour's one-hot. Ones are 3, well above the training jitter."""
    code = torch.zeros(16, 3, 3)
    col, row = POSITIONS[scene.position]
    code[COLOURS.index(scene.background)] = 3
    code[:, row, col] = 0
    for channel in (
        COLOURS.index(scene.colour),
        8 + SHAPES.index(scene.shape),
        11 + SIZES.index(scene.size),
        13 + scene.count - 1,
    ):
        code[channel, row, col] = 3
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="whose Stage A latents the decoder learns")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--scenes", type=int, default=6000, help="scenes encoded for training (of every shape)")
    parser.add_argument("--n", type=int, default=100, help="scenes scored (training colour-shape pairs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--channels", type=int, nargs=2, metavar=("C0", "C1"), help="the decoder's widths (the demo's: 64 128)"
    )
    parser.add_argument("--patch-size", type=int, help="the decoder's patch size (the demo's: 2)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    engine = CascadeEngine.from_settings(Settings(model=args.model, device="cpu"))
    pipe = engine.pipelines.decoder
    defaults = engine.request(prompt="")
    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)

    data = stages.decoder_dataset(pipe.vqgan, args.scenes, rng, print, scale=pipe.vqgan.config.scale_factor)
    keep = [i for i, s in enumerate(data.scenes) if s.shape in args.shapes]
    codes = torch.stack([oracle_code(s) for s in data.scenes])
    architecture = DEMO_DECODER | ({"block_out_channels": args.channels} if args.channels else {})
    architecture |= {"patch_size": args.patch_size} if args.patch_size else {}
    decoder = StableCascadeUNet(**architecture)
    mapper = stages.text_blind(decoder)  # as in stage B
    params = [p for p in decoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    sched = stages.schedule(opt, args.steps, 1e-3)
    no_text = torch.zeros(16, 1, mapper.in_features)

    def step(_: int) -> float:
        idx = [keep[rng.randrange(len(keep))] for _ in range(16)]
        effnet, _ = stages.noisy_effnet(codes[idx], gen)
        loss = stages.decoder_loss(decoder, data, idx, effnet, no_text, gen, foreground_weight=10.0)
        stages.optimise(opt, sched, loss, clip=params)
        return loss.item()

    start = time.perf_counter()
    losses = stages.run_steps("oracle decoder", args.steps, step, print, every=max(1, args.steps // 20))
    minutes = (time.perf_counter() - start) / 60
    pipe.decoder = decoder.eval()

    eval_rng = random.Random(f"{args.seed}-oracle")
    scenes: list[Scene] = []
    while len(scenes) < args.n:
        if (scene := sample_scene(eval_rng)).shape in args.shapes:
            scenes.append(scene)
    hits, started = [], time.perf_counter()
    with torch.no_grad():
        for i, scene in enumerate(scenes):
            image = pipe(
                image_embeddings=oracle_code(scene)[None],
                prompt=scene.prompt(),
                num_inference_steps=defaults.decoder_steps,
                guidance_scale=defaults.decoder_guidance,
                generator=torch.Generator().manual_seed(i),
                output_type="pil",
            ).images[0]
            hits.append(score(scene, analyze(image)))
    seconds_per_image = (time.perf_counter() - started) / len(scenes)  # the decoder's steps and Stage A
    rates = {a: mean(h[a] for h in hits) for a in ATTRIBUTES}
    by_kind = shape_rates([{"hits": h} for h in hits], scenes, BY_SIZE)
    print(
        f"{args.steps} steps ({minutes:.1f} min), final loss {losses[-1]:.4f}; {args.n} scenes: "
        + ", ".join(f"{a} {r:.0%}" for a, r in rates.items())
    )
    print("shape right: " + ", ".join(f"{k} {r:.0%}" for k, r in by_kind.items()))
    report = {
        "model": engine.identity.name,
        "shapes": args.shapes,
        "steps": args.steps,
        "decoder": {k: architecture[k] for k in ("block_out_channels", "patch_size")},
        "decoder_parameters": sum(p.numel() for p in decoder.parameters()),
        "seconds_per_image": seconds_per_image,
        "scenes": args.scenes,
        "n": args.n,
        "seed": args.seed,
        "threads": args.threads,
        "minutes": minutes,
        "losses": losses,
        "rates": rates,
        "shape_right": by_kind,
        "sampling": {"decoder_steps": defaults.decoder_steps, "decoder_guidance": defaults.decoder_guidance},
    }
    wide = f"-c{'-'.join(map(str, args.channels))}" if args.channels else ""
    patch = f"-p{args.patch_size}" if args.patch_size else ""
    name = f"decoder_oracle-{'-'.join(args.shapes)}-{args.steps}{wide}{patch}.json"
    out = args.out or Path(__file__).parent / "results" / name
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
