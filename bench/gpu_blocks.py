"""Where a denoising step's time goes on one GPU: each UNet level's repeated unit timed alone, and what each way of
compiling it buys.

    python bench/gpu_blocks.py                      # official full architecture, random bf16 weights
    python bench/gpu_blocks.py --models full lite --batches 1 4 --options eager blocks unit unit_max
    python bench/gpu_blocks.py --tiny               # tiny random models on the CPU: a smoke test of this script

A UNet level repeats one unit (ResBlock, TimestepBlock and, deeper down, AttnBlock) many times: the full decoder's
32×32 level runs it 112 times a step. Each unit is timed as a CUDA graph of `--repeat` calls (so launch gaps do not
count, as under the engine's graphs), at batch 1 and 4 (the prior's batch doubled for classifier-free guidance),
and multiplied by how often a step runs it. Options:
  eager     the blocks as diffusers runs them
  blocks    each block compiled on its own, as the engine's `--speedup compile` does (here for static shapes)
  blocks_tuned      the same with Inductor tuning its reduction and pointwise kernels (gpu_speed.TUNED_KERNELS)
  blocks_grn_split  the same with GlobalResponseNorm's norm over the tokens summed in two stages (grn_split)
  unit      the unit's blocks compiled as one region, so that Inductor can fuse across block boundaries
  unit_max  the same with mode="max-autotune-no-cudagraphs" (Triton GEMM templates, benchmarked per shape)
Per unit: milliseconds, FLOP and TFLOP/s, compile seconds, largest difference from eager; per level and UNet:
milliseconds a step. The embedding, mappers and up/down-scalers are left out: on the H200 the units' eager sums
matched the UNets' kernel time in a profile within 2%. Writes bench/results/gpu_blocks-<device>.json after every
row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import cascade_studio  # noqa: F401 - first: it makes torchvision importable (see _torchvision.py)

# isort: split
import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import StableCascadeUNet
from diffusers.models.unets.unet_stable_cascade import (
    GlobalResponseNorm,
    SDCascadeAttnBlock,
    SDCascadeResBlock,
    SDCascadeTimestepBlock,
)
from gpu_speed import TUNED_KERNELS, matmul_peak_tflops, timed  # bench/ is on the path when this runs as a script
from torch.utils.flop_counter import FlopCounterMode

from cascade_studio.models.architectures import random_components

RESULTS = Path(__file__).parent / "results"
OPTIONS = ("eager", "blocks", "blocks_tuned", "blocks_grn_split", "unit", "unit_max")
LATENT_SIDE = {"prior": 24, "decoder": 256}  # 1024² image: Stage C 24×24, Stage B 256×256
CLIP_TOKENS = {"prior": 77, "decoder": 0}  # text tokens beside the pooled embedding (and, in the prior, image)


def run_unit(blocks: list[torch.nn.Module], x: torch.Tensor, r_embed: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """One unit as diffusers' `_down_encode` runs it: each block type gets its own inputs."""
    for block in blocks:
        if isinstance(block, SDCascadeResBlock):
            x = block(x)
        elif isinstance(block, SDCascadeTimestepBlock):
            x = block(x, r_embed)
        elif isinstance(block, SDCascadeAttnBlock):
            x = block(x, clip)
    return x


def levels(config: dict, side: int) -> list[tuple[int, int]]:
    """Each level's (latent side, units a step runs). A level halves the side unless `switch_level` makes its
    downscaler a plain 1×1 mapping: the prior runs all of Stage C at 24×24. A step runs a level's unit once per
    down layer and, on the way up, its layers times its repeat mappers (diffusers reads the up lists deepest
    level first)."""
    sides = [side // config.get("patch_size", 1)]
    switch = config.get("switch_level")
    for i in range(1, len(config["block_out_channels"])):
        sides.append(sides[-1] // 2 if switch is None or switch[i - 1] else sides[-1])
    down, up, repeats = (
        config["down_num_layers_per_block"],
        config["up_num_layers_per_block"][::-1],
        config["up_blocks_repeat_mappers"][::-1],
    )
    return [(s, d + u * r) for s, d, u, r in zip(sides, down, up, repeats)]


def unit_inputs(unet: StableCascadeUNet, name: str, level: int, batch: int, hw: int) -> tuple[torch.Tensor, ...]:
    config = unet.config
    device, dtype = unet.device, unet.dtype
    x = torch.randn(batch, config.block_out_channels[level], hw, hw, device=device, dtype=dtype)
    r_embed = torch.randn(
        batch,
        config.timestep_ratio_embedding_dim * (1 + len(config.timestep_conditioning_type)),
        device=device,
        dtype=dtype,
    )
    pooled = torch.randn(batch, 1, config.clip_text_pooled_in_channels, device=device, dtype=dtype)
    text = (
        torch.randn(batch, CLIP_TOKENS[name], config.clip_text_in_channels, device=device, dtype=dtype)
        if config.clip_text_in_channels
        else None
    )
    image = (
        torch.randn(batch, 1, config.clip_image_in_channels, device=device, dtype=dtype)
        if config.clip_image_in_channels
        else None
    )
    clip = unet.get_clip_embeddings(clip_txt_pooled=pooled, clip_txt=text, clip_img=image)
    return x.contiguous(memory_format=torch.channels_last), r_embed, clip


def grn_split(grn: GlobalResponseNorm, x: torch.Tensor, parts: int = 8) -> torch.Tensor:
    """diffusers' GlobalResponseNorm with the sum of squares over the tokens taken in `parts` slices first. At batch
    1 the decoder's 32×32 level reduces 1,024 tokens for only 5,120 channels, too few rows to fill the GPU; the
    slices give Inductor eight times as many."""
    b, h, w, c = x.shape
    squares = x.float().square().view(b, parts, h * w // parts, c).sum(2)
    agg_norm = squares.sum(1).sqrt().view(b, 1, 1, c).to(x.dtype)
    stand_div_norm = agg_norm / (agg_norm.mean(dim=-1, keepdim=True) + 1e-6)
    return grn.gamma * (x * stand_div_norm) + grn.beta + x


def prepare(option: str, blocks: list[torch.nn.Module]) -> Callable[..., torch.Tensor]:
    grns = [m for block in blocks for m in block.modules() if isinstance(m, GlobalResponseNorm)]
    for module in [*blocks, *grns]:
        vars(module).pop("forward", None)
    if option != "eager":
        torch._dynamo.reset()  # each option compiles afresh, not reusing graphs another option left in the cache
    if option == "blocks_grn_split":
        for grn in grns:
            grn.forward = lambda x, grn=grn: grn_split(grn, x)
    if option.startswith("blocks"):
        options = TUNED_KERNELS if option == "blocks_tuned" else None
        for block in blocks:
            block.forward = torch.compile(block.forward, dynamic=False, options=options)
    if option == "unit":
        return torch.compile(run_unit, dynamic=False)
    if option == "unit_max":
        return torch.compile(run_unit, dynamic=False, mode="max-autotune-no-cudagraphs")
    return run_unit


def time_unit(fn: Callable[..., torch.Tensor], args: tuple, device: torch.device, repeat: int, runs: int) -> float:
    """Milliseconds per unit call: a CUDA graph of `repeat` calls replayed `runs` times (CPU: plain calls)."""

    def many() -> torch.Tensor:
        out = args[0]
        for _ in range(repeat):
            out = fn(out, *args[1:])
        return out

    if device.type != "cuda":
        return statistics.median(timed(many, device)[0] for _ in range(runs)) * 1e3 / repeat
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture stream, as the engine's graphs do
        many()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        many()
    graph.replay()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / repeat


def bench_unet(
    name: str,
    unet: StableCascadeUNet,
    options: list[str],
    batches: list[int],
    side: int,
    repeat: int,
    runs: int,
    peak_tflops: float,
    save: Callable[[], None],
    rows: list[dict],
) -> None:
    for level, (hw, count) in enumerate(levels(unet.config, side)):
        n_types = len(unet.config.block_types_per_layer[level])
        blocks = list(unet.down_blocks[level])[:n_types]
        for batch in batches:
            images = batch * (2 if name == "prior" else 1)  # the prior runs conditional and unconditional together
            args = unit_inputs(unet, name, level, images, hw)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                reference = run_unit(blocks, *args)
            row = {
                "unet": name,
                "level": level,
                "batch": batch,
                "unet_batch": images,
                "units_per_step": count,
                "tokens": args[0].shape[-1] * args[0].shape[-2],
                "channels": args[0].shape[1],
                "gflop_per_unit": counter.get_total_flops() / 1e9,
            }
            for option in options:
                fn = prepare(option, blocks)
                try:
                    start = time.perf_counter()
                    with torch.no_grad():
                        fn(blocks, *args)
                        out = fn(blocks, *args)
                    row[f"{option}_compile_s"] = time.perf_counter() - start
                    row[f"{option}_max_abs_diff"] = float((out - reference).abs().max())  # vs eager, same inputs
                    with torch.no_grad():
                        ms = time_unit(
                            lambda x, r, c, fn=fn, blocks=blocks: fn(blocks, x, r, c),
                            args,
                            args[0].device,
                            repeat,
                            runs,
                        )
                    row[f"{option}_ms"] = ms
                    row[f"{option}_tflops"] = row["gflop_per_unit"] / ms
                    row[f"{option}_ms_per_step"] = ms * count
                except Exception as exc:  # one failing option must not cost the GPU run the others' numbers
                    row[f"{option}_error"] = str(exc)[-500:]
                prepare("eager", blocks)
            row["peak_fraction"] = {o: row[f"{o}_tflops"] / peak_tflops for o in options if f"{o}_tflops" in row}
            rows.append(row)
            print(
                " ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items()
                    if k != "peak_fraction" and not k.endswith("_error")
                ),
                flush=True,
            )
            save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (a smoke test)")
    parser.add_argument("--models", nargs="+", choices=("full", "lite"), default=["full"])
    parser.add_argument("--unets", nargs="+", choices=("prior", "decoder"), default=["prior", "decoder"])
    parser.add_argument("--options", nargs="+", choices=OPTIONS, default=list(OPTIONS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeat", type=int, default=10, help="unit calls per timed graph")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (--tiny)")
    args = parser.parse_args()
    if args.tiny:
        torch.set_num_threads(args.threads)
        device, dtype, models, sides = torch.device("cpu"), torch.float32, ["tiny"], {"prior": 8, "decoder": 64}
        device_name = f"cpu ({platform.machine()}, {args.threads} threads)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or use --tiny on the CPU")
        device, dtype, models, sides = torch.device("cuda"), torch.bfloat16, args.models, LATENT_SIDE
        device_name = torch.cuda.get_device_name(device)
    peak = matmul_peak_tflops(device, dtype)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    rows: list[dict] = []
    result = {
        "device": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "matmul_peak_tflops": peak,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "repeat": args.repeat,
        "runs": args.runs,
        "rows": rows,
        "per_step_ms": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("gpu_blocks-" + ("tiny-cpu" if args.tiny else device_name.replace(" ", "_")) + ".json")

    def save() -> None:
        path.write_text(json.dumps(result, indent=1))

    for model in models:
        unets = {k: v for k, v in random_components(model, device, dtype).items() if k in args.unets}
        for name, unet in unets.items():
            unet.to(memory_format=torch.channels_last)
            start = len(rows)
            bench_unet(name, unet, args.options, args.batches, sides[name], args.repeat, args.runs, peak, save, rows)
            for batch in args.batches:
                mine = [r for r in rows[start:] if r["batch"] == batch]
                result["per_step_ms"][f"{model} {name} b{batch}"] = {
                    o: sum(r[f"{o}_ms_per_step"] for r in mine)
                    for o in args.options
                    if all(f"{o}_ms_per_step" in r for r in mine)
                }
            save()
            torch._dynamo.reset()
        del unets
    for key, totals in result["per_step_ms"].items():
        print(key, "ms per step:", ", ".join(f"{o} {v:.2f}" for o, v in totals.items()))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
