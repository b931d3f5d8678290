"""Score a LoRA recipe that differs from the defaults in one thing: does it move eval-demo less for the same concept?

    python bench/lora_recipes.py decoder-lr --concepts cross --out /tmp/cross-decoder-lr.json
    python bench/lora_recipes.py scenes-only+no-prior --concepts cross --decoder-min-t 0   # several, joined by +

The recipe is patched into cascade_studio.train.lora for this process only; everything after its name goes to
bench/lora_concepts.py, which trains and scores as usual (the report, by default
bench/results/lora-recipe-NAME.json, says which recipe). What each one changes:
- scenes-only: every preservation prompt a fully specified scene, none in the model's caption phrasings (the
               defaults before 2026-12-07; with --decoder-min-t 0, Stage B learning at every step as well, that
               recipe whole);
- decoder-lr:  Stage B at lr 1e-3 (the demo's default is 2e-3);
- no-prior:    no prior adapters (lr 0 keeps peft's zero-initialised up weights at zero), only Stage B's and the
               text encoder's: the prior's add nothing to the cross on their own.
- decoder-attn: Stage B adapted in its attention and text mappers only (Stability's recipe adapts attention alone),
               not its feed-forward layers: what it draws everywhere, a square's corners among it.
(Preservation's loss weighted up, run here as kept-x3 and kept-x10 on 2026-12-07, is now a setting of its own:
bench/lora_concepts.py --preserve-weight 3.)
"""

from __future__ import annotations

import cascade_studio  # noqa: F401 - first: it makes torchvision importable (see _torchvision.py)

# isort: split
import argparse
import json
import random
import runpy
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import cascade_studio.train.lora as lora
from cascade_studio.train.scenes import sample_scene


def scenes_only_prompts(engine, n: int, seed: int) -> list[str]:
    if engine.identity.preset != "demo":
        return []
    rng = random.Random(f"preservation-{seed}")
    return [sample_scene(rng).prompt() for _ in range(n)]


def decoder_targets(pattern: str):
    """add_adapter with `pattern` in place of lora.TARGETS for Stage B (the model with an EfficientNet mapper)."""
    add = lora.add_adapter

    def add_adapter(model, rank: int, alpha: float):
        if not hasattr(model, "effnet_mapper"):
            return add(model, rank, alpha)
        with _patched({"TARGETS": pattern}):
            return add(model, rank, alpha)

    return add_adapter


def _patches(name: str) -> dict:
    lr_of = lora._lr_of
    return {
        "scenes-only": {"domain_prompts": scenes_only_prompts},
        "decoder-lr": {"_lr_of": lambda cfg, role: 1e-3 if role == "decoder" else lr_of(cfg, role)},
        "no-prior": {"_lr_of": lambda cfg, role: 0.0 if role == "prior" else lr_of(cfg, role)},
        "decoder-attn": {"add_adapter": decoder_targets(r".*\.(attention\.(to_q|to_k|to_v|to_out\.0)|kv_mapper\.1)")},
    }[name]


RECIPES = ("scenes-only", "decoder-lr", "no-prior", "decoder-attn")


@contextmanager
def recipe(names: str) -> Iterator[None]:
    """The recipe (or several, "a+b") patched into cascade_studio.train.lora while the block runs, the defaults back
    after. Each is patched over the one before it (decoder-lr+no-prior changes both rates)."""
    with ExitStack() as stack:
        for name in names.split("+"):
            stack.enter_context(_patched(_patches(name)))
        yield


@contextmanager
def _patched(patches: dict) -> Iterator[None]:
    saved = {attr: getattr(lora, attr) for attr in patches}
    for attr, value in patches.items():
        setattr(lora, attr, value)
    try:
        yield
    finally:
        for attr, value in saved.items():
            setattr(lora, attr, value)


def main() -> None:
    if len(sys.argv) < 2 or not set(sys.argv[1].split("+")) <= set(RECIPES):
        sys.exit(f"usage: python bench/lora_recipes.py {{{','.join(RECIPES)}}} [bench/lora_concepts.py options]")
    name, bench = sys.argv[1], Path(__file__).with_name("lora_concepts.py")
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    out = parser.parse_known_args(sys.argv[2:])[0].out
    if out is None:  # never the defaults' own results file
        out = bench.with_name("results") / f"lora-recipe-{name}.json"
        sys.argv += ["--out", str(out)]
    sys.argv = [str(bench), *sys.argv[2:]]
    with recipe(name):
        runpy.run_path(str(bench), run_name="__main__")
    out.write_text(json.dumps({"recipe": name} | json.loads(out.read_text()), indent=1))  # the report says which


if __name__ == "__main__":
    main()
