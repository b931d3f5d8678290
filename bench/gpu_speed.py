"""Speed of Stable Cascade on one GPU: stock diffusers pipelines and our engine, side by side in one process.

    python bench/gpu_speed.py                       # official full and lite architectures, random bf16 weights
    python bench/gpu_speed.py --models full --runs 5 --variants stock engine_fast
    python bench/gpu_speed.py --tiny                # tiny random models on the CPU: a smoke test of this script

Random weights at the official sizes: speed does not depend on the weights' values, and no machine here can
download the real ones. Rows, applied in turn to the same modules (engine/speed.py):
  stock            diffusers' two pipelines called directly, with diffusers' scheduler
  engine           our engine, eager (what it adds: per-image seeds, caches, progress, cancel)
  engine_graphs    + each denoising step replayed as a CUDA graph (eager blocks)
  engine_compiled  + the UNets' repeated blocks compiled (regional torch.compile), no graphs
  engine_fast      compiled blocks and CUDA graphs: `--speedup compile` (engine_graphs is `graphs`, the default)
  engine_graphs_cl, engine_fast_cl   the same with channels-last (NHWC) weights and convolutions
  engine_static_cl channels-last, blocks compiled for static shapes (a graph per block shape), CUDA graphs
  engine_fast_cl_stock_scheduler   engine_fast_cl with diffusers' scheduler, whose every step makes the host
                   wait for the GPU; the engine's scheduler (models/schedulers.py) never does
  engine_tuned_cl  engine_fast_cl with Inductor tuning its reduction and pointwise kernels' launch settings on this
                   GPU (TUNED_KERNELS), the compiled profile's most under-used kernels; its GEMMs stay cuBLAS
Per row: first call at batch 1 and 4 (compile, capture), steady seconds per image at batch 1 and 4, per-stage
time, peak GPU memory, FLOP utilisation against a measured bf16 matmul, the largest pixel difference from stock
for the same seed, whether a repeated request gives the same pixels, and how often one image makes the host wait
for the GPU (torch's sync debug mode). Then the full model with CPU offload (the low-memory mode): time and peak
GPU memory. Writes bench/results/gpu_speed-<device>.json (after every row, so a run cut short keeps what it
measured) and .png; compare numbers only within one file. `--profile` also writes the wall and kernel time of one
batch-1 image of the last row, per part and by kernel: the next thing to speed up.
"""

from __future__ import annotations

import cascade_studio  # noqa: F401 - first: it makes torchvision importable (see _torchvision.py)

# isort: split
import argparse
import contextlib
import gc
import json
import platform
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from diffusers import DDPMWuerstchenScheduler
from PIL import Image, ImageDraw
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTokenizer

from cascade_studio import __version__
from cascade_studio.engine import CascadeEngine, GenerationResult, speed
from cascade_studio.models.architectures import BASE_WORDS, random_components, write_word_tokenizer
from cascade_studio.models.loading import assemble_pipelines, load_pipelines
from cascade_studio.models.schedulers import WuerstchenScheduler
from cascade_studio.models.source import ModelIdentity, resolve_model

PROMPT = "a red circle on a white background"
RESULTS = Path(__file__).parent / "results"
TRAINED_PROMPTS = (
    "a large red circle at the top left on a white background",
    "two small blue squares in the centre on a black background",
    "three large yellow triangles at the bottom right on a white background",
)
SETTINGS = dict(prior_steps=20, prior_guidance=4.0, decoder_steps=10, decoder_guidance=0.0)
# Inductor settings for engine_tuned_cl: benchmark block sizes and warps of every reduction and pointwise kernel,
# then search around the best. On the H200 the compiled blocks' GELU + GlobalResponseNorm reductions read their
# input at ~0.9 TB/s (43 GB an image in 49 ms, ...-channels-last-profile-full.txt), a fifth of what HBM gives.
TUNED_KERNELS = {"max_autotune_pointwise": True, "coordinate_descent_tuning": True}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


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


def use_scheduler(pipelines, kind: type) -> None:
    for pipe in (pipelines.prior, pipelines.decoder):
        pipe.scheduler = kind.from_config(pipe.scheduler.config)


def reset(pipelines) -> None:
    """Back to eager: no graphs, no compiled blocks, weights in the default memory format, the engine's scheduler."""
    speed.use_cuda_graphs(pipelines, False)
    speed.compile_blocks(pipelines, False)
    speed.use_channels_last(pipelines, False)
    if type(pipelines.prior.scheduler) is DDPMWuerstchenScheduler:  # after engine_fast_cl_stock_scheduler
        use_scheduler(pipelines, WuerstchenScheduler)


# What each engine variant runs, set up from eager on the same pipelines (compiled graphs stay in dynamo's cache).
PREPARE: dict[str, Callable] = {
    "engine": reset,
    "engine_graphs": lambda p: (reset(p), speed.optimize(p, "graphs")),  # --speedup graphs (the default on CUDA)
    "engine_compiled": lambda p: (reset(p), speed.compile_blocks(p)),  # compiled blocks, no graphs
    "engine_fast": lambda p: (reset(p), speed.optimize(p, "compile")),  # --speedup compile
    "engine_graphs_cl": lambda p: (reset(p), speed.use_channels_last(p), speed.optimize(p, "graphs")),
    "engine_fast_cl": lambda p: (reset(p), speed.use_channels_last(p), speed.optimize(p, "compile")),
    "engine_static_cl": lambda p: (
        reset(p),
        speed.use_channels_last(p),
        speed.compile_blocks(p, dynamic=False),
        speed.use_cuda_graphs(p),
    ),
    "engine_fast_cl_stock_scheduler": lambda p: (
        PREPARE["engine_fast_cl"](p),
        use_scheduler(p, DDPMWuerstchenScheduler),
    ),
    "engine_tuned_cl": lambda p: (
        reset(p),
        speed.use_channels_last(p),
        speed.compile_blocks(p, options=TUNED_KERNELS),
        speed.use_cuda_graphs(p),
    ),
}
VARIANTS = ("stock", *PREPARE)
NEEDS_CUDA = {
    "engine_graphs",
    "engine_fast",
    "engine_graphs_cl",
    "engine_fast_cl",
    "engine_static_cl",
    "engine_fast_cl_stock_scheduler",
    "engine_tuned_cl",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def assemble(
    name: str,
    parts: dict,
    scheduler,
    tokenizer: CLIPTokenizer,
    device: torch.device,
    dtype: torch.dtype,
    cpu_offload: bool = False,
):
    return assemble_pipelines(
        **parts,
        tokenizer=tokenizer,
        scheduler=scheduler,
        identity=ModelIdentity(name=f"random-{name}"),
        device=device,
        dtype=dtype,
        cpu_offload=cpu_offload,
    )


def host_waits(fn: Callable[[], object], device: torch.device) -> int | None:
    """How many times one call makes the host wait for the GPU: each wait leaves the GPU idle while the host then
    prepares the next work. Counted with torch's sync debug mode, which warns at every synchronising operation."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def error_text(exc: Exception) -> str:
    return "".join(traceback.format_exception_only(exc)).strip()[-2000:]


def uncached(engine: CascadeEngine, **fields) -> GenerationResult:
    """One request with the engine's caches emptied first: every run pays for the whole image, as stock does."""
    engine._text_cache.clear()
    engine._prior_cache.clear()
    return engine(engine.request(**fields))


def engine_runner(engine: CascadeEngine, size: int, timings: list[dict]) -> Callable[..., np.ndarray]:
    def ours(n: int, seed: int = 0) -> np.ndarray:
        result = uncached(engine, prompt=PROMPT, width=size, height=size, num_images=n, seed=seed, **SETTINGS)
        timings.append(result.timings)
        return np.stack([np.asarray(image, dtype=np.float32) / 255 for image in result.images])

    return ours


def measure(
    fn: Callable[..., object], device: torch.device, runs: int, stage_timings: list[dict] | None = None
) -> dict:
    """First call (compile, capture) and steady state at batch 1 and 4, with peak memory of the steady runs."""
    row: dict = {}
    for n, key in ((1, "b1"), (4, "b4")):
        row[f"first_call_{key}_s"] = timed(lambda n=n: fn(n), device)[0]
        free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if stage_timings is not None:
            stage_timings.clear()
        row[f"{key}_s_per_image"] = statistics.median(timed(lambda n=n: fn(n), device)[0] for _ in range(runs)) / n
        if device.type == "cuda":
            row[f"peak_gib_{key}"] = torch.cuda.max_memory_allocated(device) / 2**30
            row[f"peak_reserved_gib_{key}"] = torch.cuda.max_memory_reserved(device) / 2**30
        if stage_timings and n == 1:
            row |= {
                f"{stage}_s": statistics.median(t[stage] for t in stage_timings)
                for stage in ("text", "prior", "decoder")
            }
    return row


def bench_model(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    size: int,
    runs: int,
    peak_tflops: float,
    tokenizer: CLIPTokenizer,
    variants: list[str],
    save: Callable[[dict], None],
    profile: Path | None = None,
) -> dict:
    t = time.perf_counter()
    parts = random_components(name, device, dtype)
    stock_pipes = assemble(name, parts, DDPMWuerstchenScheduler(), tokenizer, device, dtype)
    pipelines = assemble(name, parts, WuerstchenScheduler(), tokenizer, device, dtype)  # the same modules
    report: dict = {
        "build_s": time.perf_counter() - t,
        "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()},
    }
    log(f"{name}: built in {report['build_s']:.1f} s")

    def stock_prior(n: int, seed: int = 0):
        return stock_pipes.prior(
            prompt=PROMPT,
            height=size,
            width=size,
            num_inference_steps=SETTINGS["prior_steps"],
            guidance_scale=SETTINGS["prior_guidance"],
            num_images_per_prompt=n,
            output_type="pt",
            generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
        ).image_embeddings

    def stock_decoder(latents: torch.Tensor, seed: int = 0):
        n = latents.shape[0]
        return stock_pipes.decoder(
            image_embeddings=latents,
            prompt=PROMPT,
            num_inference_steps=SETTINGS["decoder_steps"],
            guidance_scale=SETTINGS["decoder_guidance"],
            output_type="np",
            generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
        ).images

    def stock(n: int, seed: int = 0):
        return stock_decoder(stock_prior(n, seed), seed)

    reference = None
    if "stock" in variants:
        report["stock"] = measure(stock, device, runs)
        latents = stock_prior(1)
        report["stock"] |= {
            "prior_s": statistics.median(timed(lambda: stock_prior(1), device)[0] for _ in range(runs)),
            "decoder_s": statistics.median(timed(lambda: stock_decoder(latents), device)[0] for _ in range(runs)),
        }
        report["flops_per_image"] = flops(lambda: stock_prior(1)) + flops(lambda: stock_decoder(latents))
        reference = np.round(np.asarray(stock(1, seed=7)) * 255) / 255  # as the engine's PIL images are quantised
        report["stock"]["host_waits_b1"] = host_waits(lambda: stock(1), device)
        log(f"{name}: stock {report['stock']['b1_s_per_image']:.3f} s")
        save(report)

    engine = CascadeEngine(pipelines)
    timings: list[dict] = []
    ours = engine_runner(engine, size, timings)
    for label in variants:
        if label == "stock" or (label in NEEDS_CUDA and device.type != "cuda"):
            continue
        try:
            PREPARE[label](pipelines)
            report[label] = measure(ours, device, runs, timings)
            first, second = ours(1, seed=7), ours(1, seed=7)
            report[label]["same_images_twice"] = bool((first == second).all())
            report[label]["host_waits_b1"] = host_waits(lambda: ours(1), device)
            if reference is not None:
                report[label]["max_abs_diff_vs_stock"] = float(np.abs(reference - first).max())
            if any(word in label for word in ("compiled", "fast", "static", "tuned")):
                report[label]["compiled_graphs"] = counters["stats"]["unique_graphs"]  # this process so far
            log(
                f"{name}: {label} {report[label]['b1_s_per_image']:.3f} s, first call "
                f"{report[label]['first_call_b1_s']:.1f} s"
            )
        except Exception as exc:  # one failing variant must not cost the GPU run the others' numbers
            report[label] = {"error": error_text(exc)}
            log(f"{name}: {label} failed: {report[label]['error']}")
            if device.type == "cuda":
                speed.use_cuda_graphs(pipelines, False)
        save(report)
    if profile is not None:
        write_profile(ours, pipelines, device, profile)
    if "flops_per_image" in report:
        for label in VARIANTS:
            if "b1_s_per_image" in report.get(label, {}):
                report[label]["utilisation_b1"] = (
                    report["flops_per_image"] / report[label]["b1_s_per_image"] / (peak_tflops * 1e12)
                )
    return report


# What one image passes through, with the method the pipelines call on each: the profile's per-part rows.
PARTS = {
    "text_encoder": (lambda p: p.prior.text_encoder, "forward"),
    "prior_unet": (lambda p: p.prior.prior, "forward"),
    "prior_scheduler": (lambda p: p.prior.scheduler, "step"),
    "decoder_unet": (lambda p: p.decoder.decoder, "forward"),
    "decoder_scheduler": (lambda p: p.decoder.scheduler, "step"),
    "stage_a": (lambda p: p.decoder.vqgan, "decode"),
}


@contextlib.contextmanager
def wrapped(pipelines, wrap: Callable[[Callable, str], Callable]):
    """Each part's method replaced by wrap(method, label) on the instance, and restored after (a CUDA graph
    installed on the instance included)."""
    saved = {label: vars(get(pipelines)).get(method) for label, (get, method) in PARTS.items()}
    for label, (get, method) in PARTS.items():
        setattr(get(pipelines), method, wrap(getattr(get(pipelines), method), label))
    try:
        yield
    finally:
        for label, (get, method) in PARTS.items():
            vars(get(pipelines)).pop(method)
            if saved[label] is not None:
                setattr(get(pipelines), method, saved[label])


def write_profile(ours: Callable[..., np.ndarray], pipelines, device: torch.device, path: Path) -> None:
    """Where one batch-1 image of the last row spends its time, for the next thing to speed up: wall time per part
    (synchronised before and after each call, as the row runs), then kernel time per part and by kernel. Kernels
    are profiled with CUDA graphs removed, so that each is launched under its part's label; a graph replays the
    same kernels without the launch gaps."""
    seconds: dict[str, float] = dict.fromkeys(PARTS, 0.0)

    def timer(method: Callable, label: str) -> Callable:
        def call(*args, **kwargs):
            t, out = timed(lambda: method(*args, **kwargs), device)
            seconds[label] += t
            return out

        return call

    with wrapped(pipelines, timer):
        total, _ = timed(lambda: ours(1), device)
    lines = [
        f"one image: {total * 1e3:.1f} ms wall, parts below {sum(seconds.values()) * 1e3:.1f} ms",
        *(f"{label:<18} {s * 1e3:9.2f} ms wall" for label, s in seconds.items()),
    ]

    def label(method: Callable, name: str) -> Callable:
        def call(*args, **kwargs):
            with torch.profiler.record_function(name):
                return method(*args, **kwargs)

        return call

    speed.use_cuda_graphs(pipelines, False)
    ours(1)  # not profiled: the first eager call may still compile
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with wrapped(pipelines, label), torch.profiler.profile(activities=activities) as prof:
        ours(1)
        sync(device)
    events = prof.key_averages()
    total_key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    lines += [
        f"{e.key:<18} {getattr(e, total_key) / 1e3:9.2f} ms {device.type} kernels, {e.count} calls"
        for e in events
        if e.key in PARTS and e.device_type.name == "CPU"
    ]  # not the GPU-side annotation rows
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=60, max_name_column_width=100)
    path.write_text("per part:\n" + "\n".join(lines) + "\n\nby kernel:\n" + table)
    log(f"profile -> {path}")


def check_trained_weights(device: torch.device, dtype: torch.dtype) -> dict:
    """The bundled demo model (trained weights) run eager and with each speed-up, same requests: how far the
    speed-ups move pixels. Random weights cannot say: untrained UNets amplify any rounding difference over 30 steps."""
    pipelines = load_pipelines(resolve_model("demo"), device, dtype)
    engine = CascadeEngine(pipelines)

    def images() -> np.ndarray:
        out = []
        for seed, prompt in enumerate(TRAINED_PROMPTS):
            batch = uncached(engine, prompt=prompt, seed=seed, num_images=2).images
            out += [np.asarray(image, dtype=np.int16) for image in batch]
        return np.stack(out)

    eager = images()
    report: dict = {"images": len(eager), "size": list(eager.shape[1:3])}
    for label in ("engine_graphs", "engine_compiled", "engine_fast"):
        if label in NEEDS_CUDA and device.type != "cuda":
            continue
        PREPARE[label](pipelines)
        diff = np.abs(images() - eager)
        report[label] = {
            "max_abs_diff_255": int(diff.max()),
            "mean_abs_diff_255": float(diff.mean()),
            "pixels_off_by_more_than_2": float((diff > 2).mean()),
        }
        log(f"demo model: {label} {report[label]}")
    return report


def bench_low_memory(name: str, device: torch.device, dtype: torch.dtype, size: int, tokenizer: CLIPTokenizer) -> dict:
    """The engine with model CPU offload (one model on the GPU at a time): time and peak GPU memory at batch 1."""
    parts = random_components(name, device, dtype)
    pipelines = assemble(name, parts, WuerstchenScheduler(), tokenizer, device, dtype, cpu_offload=True)
    free(device)
    ours = engine_runner(CascadeEngine(pipelines), size, [])
    first_s, _ = timed(lambda: ours(1), device)
    torch.cuda.reset_peak_memory_stats(device)
    seconds, _ = timed(lambda: ours(1), device)
    row = {
        "first_call_b1_s": first_s,
        "b1_s_per_image": seconds,
        "peak_gib_b1": torch.cuda.max_memory_allocated(device) / 2**30,
        "peak_reserved_gib_b1": torch.cuda.max_memory_reserved(device) / 2**30,
    }
    del pipelines
    free(device)
    return row


def plot(result: dict, path: Path) -> None:
    """Seconds per image for every variant, at batch 1 and 4; drawn with PIL to avoid a plotting dependency."""
    rows = [
        (f"{m} b{b} {label}", r[label][f"b{b}_s_per_image"])
        for m, r in result["models"].items()
        for b in (1, 4)
        for label in VARIANTS
        if f"b{b}_s_per_image" in r.get(label, {})
    ]
    top = max((v for _, v in rows), default=1.0)
    w, bar, pad, left = 720, 20, 6, 230
    image = Image.new("RGB", (w, 40 + len(rows) * (bar + pad)), "white")
    draw = ImageDraw.Draw(image)
    title = f"seconds per image, {result['device']}, {result['size']}px, {result['settings']}"
    draw.text((pad, 10), title, fill="black")
    palette = [
        (40, 80, 220),
        (220, 120, 40),
        (160, 60, 160),
        (120, 160, 40),
        (40, 160, 80),
        (200, 60, 60),
        (60, 160, 200),
        (120, 120, 120),
        (180, 140, 0),
        (0, 120, 120),
    ]
    colours = {label: palette[k % len(palette)] for k, label in enumerate(VARIANTS)}
    for k, (label, value) in enumerate(rows):
        y = 40 + k * (bar + pad)
        length = int((w - left - 70) * value / top)
        draw.rectangle((left, y, left + length, y + bar), fill=colours[label.split()[-1]])
        draw.text((pad, y + 4), label, fill="black")
        draw.text((left + 6 + length, y + 4), f"{value:.3f} s", fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (a smoke test)")
    parser.add_argument("--models", nargs="*", choices=("full", "lite"), default=["full", "lite"])
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="rows to time, in this order (graph variants need CUDA)",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--low-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time full with CPU offload and its peak GPU memory (CUDA)",
    )
    parser.add_argument(
        "--trained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also compare each speed-up's pixels with eager on the trained demo model",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also write each model's kernel profile of one batch-1 image of the last row (.txt)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (--tiny)")
    args = parser.parse_args()
    if args.tiny:
        torch.set_num_threads(args.threads)
        device, dtype, size, models = torch.device("cpu"), torch.float32, 128, ["tiny"]  # a smoke test: small
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
        "device": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "runs": args.runs,
        "matmul_peak_tflops": peak,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cascade_studio": __version__,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "settings": "prior 20 steps CFG 4, decoder 10 steps",
        "models": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("gpu_speed-" + ("tiny-cpu" if args.tiny else device_name.replace(" ", "_")))

    def save(report: dict | None = None, name: str | None = None) -> None:
        if name is not None:
            result["models"][name] = report
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))

    if args.low_memory and device.type == "cuda":  # first, while nothing else holds GPU memory
        try:
            result["low_memory_full"] = bench_low_memory("full", device, dtype, size, tokenizer)
        except Exception as exc:
            result["low_memory_full"] = {"error": error_text(exc)}
        log(f"low memory: {result['low_memory_full']}")
        save()
    if args.trained:
        result["trained_weights"] = check_trained_weights(device, dtype)
        save()
    for name in models:
        profile = stem.with_name(f"{stem.name}-profile-{name}.txt") if args.profile else None
        result["models"][name] = bench_model(
            name,
            device,
            dtype,
            size,
            args.runs,
            peak,
            tokenizer,
            args.variants,
            lambda report, name=name: save(report, name),
            profile,
        )
        free(device)  # the model just timed is gone with bench_model's frame
    save()
    plot(result, stem.with_suffix(".png"))
    for name, r in result["models"].items():
        for label in VARIANTS:
            row = r.get(label, {})
            if "error" in row:
                print(f"{name} {label}: failed: {row['error'][-300:]}")
            elif row:
                print(
                    f"{name} {label}: b1 {row['b1_s_per_image']:.3f} s, b4 {row['b4_s_per_image']:.3f} s/image, "
                    f"first call {row['first_call_b1_s']:.1f} s, peak {row.get('peak_gib_b1', 0):.1f} GiB, "
                    f"diff vs stock {row.get('max_abs_diff_vs_stock', 0):.3g}"
                )
    print(f"-> {stem}.json")


if __name__ == "__main__":
    main()
