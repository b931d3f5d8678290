"""Teach the demo model two things it has never seen, with the default LoRA settings, and score the result.

    python bench/lora_concepts.py               # teal and cross, 2 CPU threads; writes bench/results/lora-concepts.json
    python bench/lora_concepts.py --n 40 --eval-n 30 --concepts teal --steps 600 --preserve 0 --out /tmp/x.json
    python bench/lora_concepts.py --text-encoder --out bench/results/lora-concepts-text-encoder.json
    python bench/lora_concepts.py --concepts cross --weights 1 0.8 0.6 --parts --out /tmp/cross.json

For each concept (see cascade_studio/train/concepts.py): draw 40 captioned pictures, train a LoRA on them with the
demo model's defaults (the time is measured), then
1. concept: on prompts unlike the training captions (other backgrounds, places, colours or shapes), the share of
   images that show the concept, with the LoRA and without it (the base model has never seen it: near 0);
2. no harm: `eval-demo` (the scene prompts, which never name the concept) with the LoRA loaded at weight 1 (unless
   --weights), against the base model, the same prompts and seeds; the issue's goal is every rate within 2 points. Each
   change comes with a 95% interval (a bootstrap over the paired prompts: is it the LoRA's, or which prompts were
   drawn?). Also each split's shape rate per asked-for shape (where a LoRA's change lands: a new shape bleeds into its
   nearest) and how far the LoRA moves the pixels of 20 scene prompts (--pixel-prompts; mean |difference| per
   pixel, 0-255).

`--weights` scores each LoRA at several weights (what a user turns down when a LoRA changes too much); `--parts`
scores the prior's, Stage B's and the text encoder's adapters alone, each with the trigger word's own tokens where
the file bundles them (which part shows the concept, which moves eval-demo).
"""

from __future__ import annotations

import cascade_studio  # noqa: F401 - first: it makes torchvision importable (see _torchvision.py)

# isort: split
import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from cascade_studio.models.lora import KOHYA_PREFIX
from cascade_studio.train.concepts import CONCEPTS, sample, shows_concept, write_concept
from cascade_studio.train.evaluate import evaluate, json_ready, paired_changes
from cascade_studio.train.lora import LoraTrainConfig, defaults_for, resolve, train_lora
from cascade_studio.train.scenes import sample_scene

RESULTS = Path(__file__).parent / "results"
# The training settings the bench passes on (default: the model's), with their types.
SETTINGS = {
    "steps": int,
    "preserve": int,
    "preserve_weight": float,
    "lr": float,
    "rank": int,
    "text_encoder_lr": float,
    "decoder_min_t": float,
}


def concept_rate(engine: CascadeEngine, concept: str, n: int, lora: str | None, weight: float = 1.0) -> float:
    """The share of n held-out prompts (seeded, the same with and without the LoRA) whose image shows the concept."""
    rng, hits = random.Random(f"held-out-{concept}"), 0
    for i in range(n):
        loras = [{"name": lora, "weight": weight}] if lora else []
        image = engine(engine.request(prompt=sample(concept, rng, held_out=True).prompt(), seed=i, loras=loras))
        hits += shows_concept(image.images[0], concept)
    return hits / n


def scene_pictures(engine: CascadeEngine, n: int, loras: list[dict]) -> list[np.ndarray]:
    """The pictures of n scene prompts (never a concept's word), the same prompts and seeds every call."""
    rng = random.Random("pixels-moved")
    prompts = [sample_scene(rng).prompt() for _ in range(n)]
    return [
        np.asarray(engine(engine.request(prompt=prompt, seed=i, loras=loras)).images[0], dtype=float)
        for i, prompt in enumerate(prompts)
    ]


def pixels_moved(base: list[np.ndarray], with_lora: list[np.ndarray]) -> float:
    """How far the LoRA moves the scene pictures: mean |difference| per pixel, 0-255."""
    return sum(float(np.abs(b - w).mean()) for b, w in zip(base, with_lora)) / len(base)


def eval_rates(
    engine: CascadeEngine, n: int, seeds: int, lora: str | None, weight: float = 1.0
) -> tuple[dict, dict, dict]:
    """eval-demo's rates per split, its shape rates per asked-for shape (where a LoRA's change lands), and the report
    (to pair with the base model's: the same prompts and seeds)."""
    settings = {"loras": [{"name": lora, "weight": weight}]} if lora else {}
    report = json_ready(evaluate(engine, n=n, seeds=range(seeds), **settings))
    splits = report["splits"].items()
    return {s: d["rates"] for s, d in splits}, {s: d["shape_rates"] for s, d in splits}, report


def points(changes: dict) -> dict:
    """paired_changes as this report keeps them: [change, 95% interval low, high] by "split attribute"."""
    return {
        f"{split} {a}": [round(r["change"], 1), round(r["interval"][0], 1), round(r["interval"][1], 1)]
        for split, rows in changes.items()
        for a, r in rows.items()
    }


def largest_shape_change(base: dict, with_lora: dict) -> str:
    """The asked-for shape whose rate the LoRA moved most, e.g. 'held-out square 37 -> 8%'."""
    _, split, shape = max((abs(with_lora[s][k] - base[s][k]), s, k) for s in base for k in base[s])
    return f"{split} {shape} {base[split][shape]:.0%} -> {with_lora[split][shape]:.0%}"


def scores(engine, concept: str, lora: str, weight: float, base: dict, args) -> dict:
    """A trained LoRA's scores at one weight: how often it shows its concept, and eval-demo's changes against the
    base model's on the same prompts and seeds (`base`: its shape rates, report and scene pictures, made once), each
    with its 95% interval."""
    with_lora, shapes, report = eval_rates(engine, args.eval_n, args.eval_seeds, lora, weight)
    changes = points(paired_changes(report, base["report"]))
    pictures = scene_pictures(engine, args.pixel_prompts, [{"name": lora, "weight": weight}])
    largest = max(changes, key=lambda k: abs(changes[k][0]))
    return {
        "weight": weight,
        "held_out_with_lora": concept_rate(engine, concept, args.n, lora, weight),
        "eval_with_lora": with_lora,
        "shape_rates_with_lora": shapes,
        "largest_shape_change": largest_shape_change(base["shapes"], shapes),
        "scene_pixels_moved": round(pixels_moved(base["pictures"], pictures), 3),
        "eval_changes_points": changes,  # [change, 95% interval low, high] per split and attribute
        "eval_max_change_points": abs(changes[largest][0]),
        "eval_max_change": f"{largest}: {changes[largest][0]:+.1f} points ({changes[largest][1]:+.1f} to "
        f"{changes[largest][2]:+.1f})",
    }


def split_by_part(lora: Path) -> dict[str, Path]:
    """One file per part the LoRA adapts (prior, decoder, text encoder), beside it: scored alone, each says how much
    of the concept and of the change is that part's. The trigger word's own tokens, where the file bundles them, go
    with every part: they are how the word reaches each."""
    tensors, parts = load_file(lora), {}
    word = {k: v for k, v in tensors.items() if k.startswith("bundle_emb.")}
    for role, prefix in KOHYA_PREFIX.items():
        keys = [k for k in tensors if k.startswith(prefix)]
        if keys:
            parts[role] = lora.with_name(f"{lora.stem}-{role.replace('_', '-')}-only.safetensors")
            save_file({k: tensors[k] for k in keys} | word, parts[role])
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=list(CONCEPTS), choices=CONCEPTS)
    parser.add_argument("--images", type=int, default=40, help="training pictures per concept (at most 40)")
    parser.add_argument("--n", type=int, default=100, help="held-out concept prompts scored per concept")
    parser.add_argument("--eval-n", type=int, default=60, help="eval-demo scenes per split and prompt seed")
    parser.add_argument("--eval-seeds", type=int, default=4, help="eval-demo prompt seeds pooled (0 to N-1)")
    parser.add_argument("--pixel-prompts", type=int, default=20, help="scene prompts for 'scene pixels moved'")
    parser.add_argument("--threads", type=int, default=2)
    for stage in ("prior", "decoder"):
        parser.add_argument(
            f"--{stage}-steps",
            type=int,
            help=f"{stage} steps for every picture the bench makes (default: the model's; fewer make a quick check "
            "of the script, not figures to report)",
        )
    parser.add_argument(
        "--weights",
        nargs="+",
        type=float,
        default=[1.0],
        help="score each LoRA at these weights (the first is the report's row; with more, by_weight has each)",
    )
    for name, kind in SETTINGS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=kind, help="a training setting (default: the model's)"
        )
    parser.add_argument(
        "--text-encoder", dest="text_encoder", action=argparse.BooleanOptionalAction, help="adapt the text encoder too"
    )
    parser.add_argument(
        "--trigger-embedding",
        dest="trigger_embedding",
        action=argparse.BooleanOptionalAction,
        help="learn the concept word's own tokens too",
    )
    parser.add_argument(
        "--parts", action="store_true", help="also score each part the LoRA adapts alone, at the first weight"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "lora-concepts.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = CascadeEngine.from_settings(Settings(model="demo", device="cpu", torch_threads=args.threads))
    sampling = {f"{k}_steps": getattr(args, f"{k}_steps") for k in ("prior", "decoder")}
    engine.pipelines.defaults |= {k: v for k, v in sampling.items() if v is not None}
    base_eval, base_shapes, base_report = eval_rates(engine, args.eval_n, args.eval_seeds, None)
    base = {"shapes": base_shapes, "report": base_report, "pictures": scene_pictures(engine, args.pixel_prompts, [])}
    settings = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
    settings |= {} if args.text_encoder is None else {"text_encoder": args.text_encoder}
    settings |= {} if args.trigger_embedding is None else {"trigger_embedding": args.trigger_embedding}
    report = {"model": engine.identity.name, "threads": args.threads, "settings": settings or "defaults"}
    report |= {"sampling": {k: engine.pipelines.defaults[k] for k in sampling}}
    resolved = resolve(LoraTrainConfig(images=Path("."), out=Path("x"), trigger="x", **settings), engine)
    # What the run trained with, the model's defaults filled in: a report stays readable after the defaults change.
    report |= {"settings_used": {k: getattr(resolved, k) for k in defaults_for(engine)}}
    report |= {"eval_prompts_per_split": args.eval_n * args.eval_seeds}
    report |= {"base_eval": base_eval, "base_shape_rates": base_shapes, "concepts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for concept in args.concepts:
            folder = write_concept(concept, Path(tmp) / concept, n=args.images)
            out = Path(tmp) / f"{concept}.safetensors"
            started = time.perf_counter()
            cfg = LoraTrainConfig(images=folder, out=out, trigger=concept, **settings)
            summary = train_lora(engine, cfg, log=lambda _: None)
            seconds = time.perf_counter() - started
            engine.lora_library.add(out)
            row = {"train_seconds": round(seconds, 1), "steps": summary["steps"], "final_loss": summary["final_loss"]}
            row["held_out_base"] = concept_rate(engine, concept, args.n, None)
            by_weight = {w: scores(engine, concept, out.stem, w, base, args) for w in args.weights}
            row |= by_weight[args.weights[0]] | ({"by_weight": by_weight} if len(args.weights) > 1 else {})
            if args.parts:
                w = args.weights[0]
                row["by_part"] = {
                    r: scores(engine, concept, engine.lora_library.add(f), w, base, args)
                    for r, f in split_by_part(out).items()
                }
            report["concepts"][concept] = row
            print(f"{concept}: trained {row['steps']} steps in {seconds / 60:.1f} min", flush=True)
            for label, got in [*by_weight.items(), *row.get("by_part", {}).items()]:
                at = f"its {label.replace('_', ' ')} alone" if isinstance(label, str) else f"weight {label:g}"
                print(
                    f"{concept} at {at}: held-out prompts showing it {got['held_out_with_lora']:.0%} "
                    f"with the LoRA, {row['held_out_base']:.0%} without; eval-demo with it loaded moves at most "
                    f"{got['eval_max_change']}, scene pixels by {got['scene_pixels_moved']:.2f}/255; the shape it "
                    f"moved most: {got['largest_shape_change']}",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
