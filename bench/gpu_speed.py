"""Speed of Stable Cascade on one GPU: stock diffusers pipelines and our engine, side by side in one process.

    python bench/gpu_speed.py                       # official full and lite architectures, random bf16 weights
    python bench/gpu_speed.py --models full --runs 5
    python bench/gpu_speed.py --tiny                # tiny random models on the CPU: a smoke test of this script

Random weights at the official sizes: speed does not depend on the weights' values, and no machine here can
download the real ones. Per model: per-stage time at batch 1, time per image at batch 4, the first call
(warm-up), peak GPU memory, FLOPs per image and their share of the measured bf16 matmul peak, and whether the
engine's images equal stock's for the same seed. `--compile` adds a third row: the engine with each repeated block
of both UNets compiled once (regional `torch.compile`), its first call including the compile. Writes bench/results/gpu_speed-<device>.json and .png; compare
numbers only within one file (one machine, one run).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from diffusers import DDPMWuerstchenScheduler
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTokenizer

from cascade_studio import __version__
from cascade_studio.engine import CascadeEngine
from cascade_studio.models.architectures import BASE_WORDS, random_components, write_word_tokenizer
from cascade_studio.models.loading import assemble_pipelines
from cascade_studio.models.source import ModelIdentity

PROMPT = "a red circle on a white background"
RESULTS = Path(__file__).parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def peak_gib(device: torch.device, fn: Callable[[], object]) -> float | None:
    """Peak memory allocated while fn runs (CUDA only)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**30


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """What one large matmul reaches here: the ceiling FLOP utilisation is measured against."""
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    seconds, _ = timed(lambda: [a @ b for _ in range(10)], device)
    return 2 * n**3 * 10 / seconds / 1e12


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def compile_repeated_blocks(pipelines) -> None:
    """Regional compilation: each block's forward compiled on its own, so the hundreds of repeated blocks of each
    UNet share a few graphs (one per block type and shape) instead of one huge graph per model. The engine's
    cancel hooks stay outside, on the blocks' eager __call__."""
    torch._dynamo.config.cache_size_limit = 64  # shapes: levels x block types x batch sizes
    for unet in (pipelines.prior.prior, pipelines.decoder.decoder):
        for level in (*unet.down_blocks, *unet.up_blocks):
            for block in level:
                block.forward = torch.compile(block.forward, dynamic=False)


def bench_model(name: str, device: torch.device, dtype: torch.dtype, size: int, runs: int, peak_tflops: float,
                tokenizer: CLIPTokenizer, compile_blocks: bool = False) -> dict:
    t = time.perf_counter()
    parts = random_components(name, device, dtype)
    pipelines = assemble_pipelines(**parts, tokenizer=tokenizer, scheduler=DDPMWuerstchenScheduler(),
                                   identity=ModelIdentity(name=f"random-{name}"), device=device, dtype=dtype)
    build_s = time.perf_counter() - t
    engine = CascadeEngine(pipelines)
    settings = dict(prior_steps=20, prior_guidance=4.0, decoder_steps=10, decoder_guidance=0.0)

    def stock_prior(n: int, seed: int = 0):
        return pipelines.prior(prompt=PROMPT, height=size, width=size, num_inference_steps=settings["prior_steps"],
                               guidance_scale=settings["prior_guidance"], num_images_per_prompt=n, output_type="pt",
                               generator=[torch.Generator().manual_seed(seed + i) for i in range(n)]).image_embeddings

    def stock_decoder(latents: torch.Tensor, seed: int = 0):
        n = latents.shape[0]
        return pipelines.decoder(image_embeddings=latents, prompt=PROMPT, num_inference_steps=settings["decoder_steps"],
                                 guidance_scale=settings["decoder_guidance"], output_type="np",
                                 generator=[torch.Generator().manual_seed(seed + i) for i in range(n)]).images

    def stock(n: int, seed: int = 0):
        return stock_decoder(stock_prior(n, seed), seed)

    def ours(n: int, seed: int = 0):
        engine._text_cache.clear()
        engine._prior_cache.clear()  # every run pays for the whole image, as stock does
        result = engine(engine.request(prompt=PROMPT, width=size, height=size, num_images=n, seed=seed, **settings))
        return np.stack([np.asarray(image, dtype=np.float32) / 255 for image in result.images])

    def per_image(fn: Callable[[int], object], n: int) -> float:
        return statistics.median(timed(lambda: fn(n), device)[0] for _ in range(runs)) / n

    def measure(fn: Callable[[int], object]) -> dict:
        first_s, _ = timed(lambda: fn(1), device)
        return {"first_call_s": first_s, "b1_s": per_image(fn, 1), "b4_s_per_image": per_image(fn, 4),
                "peak_gib_b1": peak_gib(device, lambda: fn(1)), "peak_gib_b4": peak_gib(device, lambda: fn(4))}

    report: dict = {"build_s": build_s, "parameters": {k: sum(p.numel() for p in m.parameters())
                                                        for k, m in parts.items()}}
    report["stock"] = measure(stock)
    prior_s = [timed(lambda: stock_prior(1), device)[0] for _ in range(runs)]
    latents = stock_prior(1)
    decoder_s = [timed(lambda: stock_decoder(latents), device)[0] for _ in range(runs)]
    report["stock"] |= {"prior_s": statistics.median(prior_s), "decoder_s": statistics.median(decoder_s)}
    report["flops_per_image"] = flops(lambda: stock_prior(1)) + flops(lambda: stock_decoder(latents))
    reference = np.round(np.asarray(stock(1, seed=7)) * 255) / 255  # as the engine's PIL images are quantised

    variants = {"engine": lambda: None}
    if compile_blocks:
        variants["engine_compiled"] = lambda: compile_repeated_blocks(pipelines)
    for label, prepare in variants.items():
        prepare()
        report[label] = measure(ours)
        report[label]["max_abs_diff_vs_stock"] = float(np.abs(reference - ours(1, seed=7)).max())
    for label in ("stock", *variants):
        report[label]["utilisation_b1"] = report["flops_per_image"] / report[label]["b1_s"] / (peak_tflops * 1e12)
    del engine, pipelines, parts
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def plot(result: dict, path: Path) -> None:
    """Seconds per image, stock vs engine, at batch 1 and 4; drawn with PIL to avoid a plotting dependency."""
    rows = [(f"{m} {b} {label}", r[label][key]) for m, r in result["models"].items()
            for b, key in (("b1", "b1_s"), ("b4", "b4_s_per_image"))
            for label in ("stock", "engine", "engine_compiled") if label in r]
    top = max(v for _, v in rows) or 1.0
    w, bar, pad = 640, 22, 8
    image = Image.new("RGB", (w, 40 + len(rows) * (bar + pad)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, 10), f"seconds per image, {result['device']}, {result['size']}px", fill="black")
    for k, (label, value) in enumerate(rows):
        y = 40 + k * (bar + pad)
        length = int((w - 260) * value / top)
        colour = (40, 80, 220) if "stock" in label else (40, 160, 80) if "compiled" in label else (220, 120, 40)
        draw.rectangle((180, y, 180 + length, y + bar), fill=colour)
        draw.text((pad, y + 5), label, fill="black")
        draw.text((186 + length, y + 5), f"{value:.3f} s", fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (a smoke test)")
    parser.add_argument("--models", nargs="+", choices=("full", "lite"), default=["full", "lite"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (--tiny)")
    parser.add_argument("--compile", action="store_true", help="also time the engine with regional torch.compile")
    args = parser.parse_args()
    if args.tiny:
        torch.set_num_threads(args.threads)
        device, dtype, size, models = torch.device("cpu"), torch.float32, 256, ["tiny"]
        device_name = f"cpu ({platform.machine()}, {args.threads} threads)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or use --tiny on the CPU")
        device, dtype, size, models = torch.device("cuda"), torch.bfloat16, 1024, args.models
        device_name = torch.cuda.get_device_name(device)
    peak = matmul_peak_tflops(device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_word_tokenizer(Path(tmp), list(BASE_WORDS)))
    result = {
        "device": device_name, "dtype": str(dtype).removeprefix("torch."), "size": size, "runs": args.runs,
        "matmul_peak_tflops": peak, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "cascade_studio": __version__,
        "when": time.strftime("%Y-%m-%d %H:%M"), "settings": "prior 20 steps CFG 4, decoder 10 steps, one prompt",
        "models": {name: bench_model(name, device, dtype, size, args.runs, peak, tokenizer, args.compile)
                   for name in models},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_speed-" + ("tiny-cpu" if args.tiny else device_name.replace(" ", "_"))
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / f"{stem}.png")
    for name, r in result["models"].items():
        print(f"{name}: stock {r['stock']['b1_s']:.3f} s (prior {r['stock']['prior_s']:.3f}, decoder "
              f"{r['stock']['decoder_s']:.3f}), b4 {r['stock']['b4_s_per_image']:.3f} s/image; engine "
              f"{r['engine']['b1_s']:.3f} s, b4 {r['engine']['b4_s_per_image']:.3f} s/image; first call stock "
              f"{r['stock']['first_call_s']:.1f} s; utilisation {r['stock']['utilisation_b1']:.1%}; engine vs stock "
              f"max diff {r['engine']['max_abs_diff_vs_stock']:.3g}")
        if "engine_compiled" in r:
            c = r["engine_compiled"]
            print(f"  compiled: {c['b1_s']:.3f} s, b4 {c['b4_s_per_image']:.3f} s/image, first call (compile) "
                  f"{c['first_call_s']:.1f} s, max diff vs stock {c['max_abs_diff_vs_stock']:.3g}")
    print(f"-> {args.out / stem}.json")


if __name__ == "__main__":
    main()
