"""At which noise level the demo decoder loses the shapes: each scene's true Stage A latent is noised to t0 and the
decoder predicts the clean latent in one step (from the scene's true Stage C latent and caption, no guidance), which
Stage A decodes and `eval-demo`'s analyser scores. At low t0 the decoder only has to keep what its input shows; at
t0 = 1 its prediction is what it makes of the Stage C latent alone (a blur, where it is unsure).

    python bench/decoder_denoise.py                          # the shipped demo model
    python bench/decoder_denoise.py --model DIR --t0 0.1 0.3 1 --n 60

Prints shape right per t0 and split and writes bench/results/decoder_denoise-<model>.json (or --out).
"""

from __future__ import annotations

import cascade_studio  # noqa: F401 - first: it makes torchvision importable (see _torchvision.py)

# isort: split
import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from cascade_studio.models.source import source_for
from cascade_studio.train.evaluate import decoded_image, scene_pixels, score_splits
from cascade_studio.train.scenes import Scene
from cascade_studio.train.stages import ImageEncoder, alpha_cumprod, encode_captions, encoder_view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--t0", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.6, 1.0])
    parser.add_argument("--n", type=int, default=60, help="scenes per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON report (default: bench/results/decoder_denoise-<model>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(model=args.model, device="cpu")
    engine = CascadeEngine.from_settings(settings)
    source = source_for(settings)
    encoder = ImageEncoder.from_pretrained(source.dirs["decoder"].parent / "image_encoder").eval()
    pipe = engine.pipelines.decoder
    scale, side = pipe.vqgan.config.scale_factor, engine.request(prompt="").width

    @torch.no_grad()
    def denoised(scene: Scene, image_seed: int, t0: float) -> Image.Image:
        pixels = scene_pixels(scene, side, image_seed)
        x0 = pipe.vqgan.encode(pixels).latents / scale
        t = torch.tensor([t0])
        a = alpha_cumprod(t)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(image_seed))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pooled = encode_captions(pipe.text_encoder, pipe.tokenizer, [scene.prompt()])[1].unsqueeze(1)
        v = pipe.decoder(x_t, t, clip_text_pooled=pooled, effnet=encoder(encoder_view(pixels))).sample
        return decoded_image(pipe.vqgan, (a.sqrt() * x_t - (1 - a).sqrt() * v) * scale)

    report = {"model": engine.identity.name, "n": args.n, "seed": args.seed, "t0": {}}
    for t0 in args.t0:
        splits = score_splits(lambda scene, image_seed, t0=t0: denoised(scene, image_seed, t0), args.n, [args.seed])
        report["t0"][str(t0)] = {
            split: {"shape": d["rates"]["shape"], "shape_rates": d["shape_rates"]} for split, d in splits.items()
        }
        print(
            f"t0 {t0:<5}"
            + "".join(
                f"  {split}: shape {d['rates']['shape']:.0%} ("
                + ", ".join(f"{k} {r:.0%}" for k, r in d["shape_rates"].items())
                + ")"
                for split, d in splits.items()
            ),
            flush=True,
        )
    out = args.out or Path(__file__).parent / "results" / f"decoder_denoise-{engine.identity.name}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
