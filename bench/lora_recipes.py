"""Score a LoRA recipe that differs from the defaults in one thing: does it move eval-demo less for the same concept?

    python bench/lora_recipes.py phrasing --concepts cross --out /tmp/cross-phrasing.json
    python bench/lora_recipes.py decoder-lr --concepts cross --out /tmp/cross-decoder-lr.json
    python bench/lora_recipes.py phrasing+decoder-lr --concepts cross --preserve 80   # several, joined by +

The recipe is patched into cascade_studio.train.lora for this process only; everything after its name goes to
bench/lora_concepts.py, which trains and scores as usual (the report, by default
bench/results/lora-recipe-NAME.json, says which recipe). What each one changes:
- phrasing:    half the preservation prompts in the demo model's own caption phrasings (partial, reordered), not all
               fully specified scenes, so that what is kept covers prompts as people write them too;
- decoder-lr:  Stage B at lr 1e-3 (the demo's default is 2e-3);
- no-prior:    no prior adapters (lr 0 keeps peft's zero-initialised up weights at zero), only Stage B's and the
               text encoder's: the prior's add nothing to the cross on their own;
- shape-steps: Stage B learns the user's pictures at t >= 0.3 only, where shape is decided, so that its adapters
               leave the last steps (edges and corners) to the base model; preservation still covers every step.
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

import torch

import cascade_studio.train.lora as lora
from cascade_studio.train.scenes import caption, sample_scene

USER_BATCH = {"active": False}  # set while the user's pictures' loss runs (shape-steps reads it)


def phrasing_prompts(engine, n: int, seed: int) -> list[str]:
    if engine.identity.preset != "demo":
        return []
    rng = random.Random(f"preservation-{seed}")
    scenes = [sample_scene(rng) for _ in range(n)]
    return [caption(s, rng) if i % 2 else s.prompt() for i, s in enumerate(scenes)]


def _patches(name: str) -> dict:
    lr_of, batch_loss, noised = lora._lr_of, lora._batch_loss, lora._noised

    def user_batch_loss(*args, **kwargs):
        USER_BATCH["active"] = True
        try:
            return batch_loss(*args, **kwargs)
        finally:
            USER_BATCH["active"] = False

    def shape_noised(x0: torch.Tensor, generator: torch.Generator, v_target: bool, high_noise_share: float):
        if not (USER_BATCH["active"] and high_noise_share == 0.25):  # 0.25: Stage B's share (the prior's is 0.5)
            return noised(x0, generator, v_target, high_noise_share)
        t = 0.3 + 0.7 * torch.rand(x0.shape[0], generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        a = lora.alpha_cumprod(t).to(x0.device).view(-1, *[1] * (x0.dim() - 1))
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_target else noise
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, t.to(x0.device), target

    return {
        "phrasing": {"domain_prompts": phrasing_prompts},
        "decoder-lr": {"_lr_of": lambda cfg, role: 1e-3 if role == "decoder" else lr_of(cfg, role)},
        "no-prior": {"_lr_of": lambda cfg, role: 0.0 if role == "prior" else lr_of(cfg, role)},
        "shape-steps": {"_batch_loss": user_batch_loss, "_noised": shape_noised},
    }[name]


RECIPES = ("phrasing", "decoder-lr", "no-prior", "shape-steps")


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
