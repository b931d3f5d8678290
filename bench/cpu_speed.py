"""CPU speed of a model: one image at its default settings, and a re-run that changes only decoder settings.

    python bench/cpu_speed.py                      # the shipped demo model, 2 threads
    python bench/cpu_speed.py --model DIR --runs 10 --threads 2

Prints a table and writes bench/results/cpu_speed-<model>.json. Timings are the median of --runs runs after one
warm-up, from a single process; compare numbers only within one run (this machine is shared and noisy).
"""

from __future__ import annotations

import cascade_studio  # noqa: F401 - first: it makes torchvision importable (see _torchvision.py)

# isort: split
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cascade_studio import __version__
from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = CascadeEngine.from_settings(Settings(model=args.model, device="cpu"))
    prompt = "a red circle on a white background"
    base = engine.request(prompt=prompt)

    def timed(**fields) -> dict[str, float]:
        return engine(engine.request(prompt=prompt, **fields)).timings

    timed(seed=0)  # warm-up
    full, tuned = [], []
    for i in range(args.runs):
        engine._prior_cache.clear()
        engine._text_cache.clear()
        full.append(timed(seed=i))
        # Same prompt, seed and prior settings; only the decoder changes: the prior comes from the cache.
        tuned.append(timed(seed=i, decoder_steps=max(1, base.decoder_steps - 2)))

    def median(rows, key):
        return statistics.median(r[key] for r in rows)

    result = {
        "model": engine.identity.name,
        "settings": base.model_dump(exclude={"prompt", "seed"}),
        "runs": args.runs,
        "threads": args.threads,
        "one_image_s": median(full, "total"),
        "stages_s": {k: median(full, k) for k in ("text", "prior", "decoder")},
        "decoder_only_rerun_s": median(tuned, "total"),
        "rerun_speedup": median(full, "total") / median(tuned, "total"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cascade_studio": __version__,
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"{result['model']} on {args.threads} CPU threads, median of {args.runs}:")
    print(
        f"  one image at default settings: {result['one_image_s']:.3f} s "
        f"(text {result['stages_s']['text']:.3f}, prior {result['stages_s']['prior']:.3f}, "
        f"decoder {result['stages_s']['decoder']:.3f})"
    )
    print(
        f"  re-run changing only decoder settings: {result['decoder_only_rerun_s']:.3f} s "
        f"({result['rerun_speedup']:.1f}x faster: prior cached)"
    )
    out = Path(__file__).parent / "results" / f"cpu_speed-{result['model']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"  -> {out}")


if __name__ == "__main__":
    main()
