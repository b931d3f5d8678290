"""A LoRA training step on the official-size Stage C: time and peak GPU memory, for the GPU session that runs it.

    python bench/lora_gpu.py                        # full Stage C, random bf16 weights, 1024² (24x24 latents)
    python bench/lora_gpu.py --prior lite --batches 1 4 8 --rank 16
    python bench/lora_gpu.py --tiny                 # a tiny prior on the CPU: a smoke test of this script

The step is the training loop's own (train/lora.py: peft's adapter on the attention and feed-forward linears,
the model's loss, AdamW on the adapter, bf16 autocast on CUDA), on random weights and random latents and text
embeddings of the real shapes: speed and memory do not depend on the values, and no machine here can download the
real weights. Rows: each batch size, with and without gradient checkpointing. The issue's goal: batch 1 fits a
24 GB card. Writes bench/results/lora_gpu-<device>.json after every row.
"""

from __future__ import annotations

import cascade_studio  # noqa: F401 - first: it makes torchvision importable (see _torchvision.py)

# isort: split
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import StableCascadeUNet

from cascade_studio.models.architectures import ARCHITECTURES
from cascade_studio.train.lora import Encoded, add_adapter, prior_loss

RESULTS = Path(__file__).parent / "results"


def prior_of(name: str, device: torch.device, dtype: torch.dtype) -> StableCascadeUNet:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype on the device: no full-precision copy on the way
    try:
        with torch.device(device):
            return StableCascadeUNet(**ARCHITECTURES[name][0])
    finally:
        torch.set_default_dtype(default)


def fake_data(prior: StableCascadeUNet, batch: int, side: int, device, dtype) -> Encoded:
    """Random latents and text embeddings of the real shapes, `batch` of them at one size."""
    c = prior.config
    latents = torch.randn(batch, c.in_channels, side, side, device=device, dtype=dtype)
    hidden = torch.randn(batch, 77, c.clip_text_in_channels, device=device, dtype=dtype)
    pooled = torch.randn(batch, 1, c.clip_text_pooled_in_channels, device=device, dtype=dtype)
    size = (side, side)
    empty = (hidden[:1] * 0, pooled[:1] * 0)
    return Encoded({size: latents}, {}, {size: hidden}, {size: pooled}, empty, {size: [""] * batch})


def step_row(prior, batch: int, side: int, checkpointing: bool, steps: int, device, dtype) -> dict:
    prior.train()
    if checkpointing:
        prior.enable_gradient_checkpointing()
    else:
        prior.disable_gradient_checkpointing()
    data = fake_data(prior, batch, side, device, dtype)
    params = [p for p in prior.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        with autocast:
            loss = prior_loss(prior, data, (side, side), list(range(batch)), generator, v_target=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    row = {"batch": batch, "checkpointing": checkpointing, "seconds_per_step": statistics.median(times)}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["loss_is_finite"] = bool(torch.isfinite(loss).item())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default="full", choices=("full", "lite"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row, after two warm-up steps")
    parser.add_argument("--tiny", action="store_true", help="a tiny prior on the CPU (a smoke test)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.tiny:
        name, device, dtype, side = "tiny", torch.device("cpu"), torch.float32, 8
        torch.set_num_threads(2)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or use --tiny on the CPU")
        name, device, dtype, side = args.prior, torch.device("cuda"), torch.bfloat16, 24  # 1024² -> 24x24
    prior = prior_of(name, device, dtype).requires_grad_(False)
    adapter = add_adapter(prior, args.rank, float(args.rank))
    where = "tiny-cpu" if args.tiny else torch.cuda.get_device_name().replace(" ", "_")
    out = args.out or RESULTS / f"lora_gpu-{where}.json"
    report = {
        "prior": name,
        "device": where,
        "rank": args.rank,
        "latent_side": side,
        "prior_parameters": sum(p.numel() for p in prior.parameters()),
        "adapter_parameters": sum(p.numel() for p in adapter),
        "rows": [],
    }
    for batch in args.batches:
        for checkpointing in (True, False):
            try:
                row = step_row(prior, batch, side, checkpointing, args.steps, device, dtype)
            except torch.OutOfMemoryError as exc:
                row = {"batch": batch, "checkpointing": checkpointing, "error": f"out of memory: {str(exc)[:120]}"}
                torch.cuda.empty_cache()
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
