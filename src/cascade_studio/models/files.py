"""Which files hold a component: one rule for what `download` fetches, what counts as complete on disk, and what
the loader reads.

A component folder (prior/, text_encoder/, ...) holds its config and its weights, and the weights come in several
forms: one file or shards with an index; the bf16 variant or only the full-precision file; and, for shards, the
names diffusers and transformers write since 0.29 (`diffusion_pytorch_model.bf16-00001-of-00003.safetensors` with
`diffusion_pytorch_model.safetensors.index.bf16.json`) or the legacy ones (`...-00001-of-00003.bf16.safetensors`
with `...safetensors.bf16.index.json`). The rule: the wanted variant if the folder has it, else the plain file
(loaded and cast to the working dtype); a single file before an index; an index counts only with every shard it
names. Only safetensors are ever chosen.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers' name, transformers' name
# Config files by role: what must be there besides the weights (tokenizers and schedulers have no weights).
CONFIGS = {
    "tokenizer": ("tokenizer_config.json",),
    "scheduler": ("scheduler_config.json",),
    "feature_extractor": ("preprocessor_config.json",),
}
TOKENIZER_FILES = re.compile(r"[^/]+\.(json|txt|model)$")  # vocab.json, merges.txt, tokenizer.json, ...


@dataclass(frozen=True)
class WeightFiles:
    """The weights a component is read from."""

    variant: str | None  # "bf16", or None for the plain (usually fp32) file
    files: tuple[str, ...]  # one file, or every shard its index names
    index: str | None = None  # the index of a sharded checkpoint

    @property
    def all(self) -> tuple[str, ...]:
        return ((self.index,) if self.index else ()) + self.files


def index_names(stem: str, variant: str | None) -> tuple[str, ...]:
    if variant is None:
        return (f"{stem}.safetensors.index.json",)
    return (f"{stem}.safetensors.index.{variant}.json", f"{stem}.safetensors.{variant}.index.json")


def choose_weights(
    names: Collection[str], variant: str | None = "bf16", read_index: Callable[[str], dict] | None = None
) -> WeightFiles | None:
    """The weights to use among a folder's file names (relative to the folder), by the rule above; None if there
    are none. `read_index(name)` gives an index's JSON (from disk, or downloaded first); without it, the shards are
    the names that look like shards of that index."""
    present = set(names)
    for wanted in dict.fromkeys((variant, None)):
        for stem in WEIGHT_STEMS:
            single = f"{stem}.{wanted}.safetensors" if wanted else f"{stem}.safetensors"
            if single in present:
                return WeightFiles(wanted, (single,))
            for index in index_names(stem, wanted):
                if index in present:
                    shards = _shards_of(index, read_index) if read_index else _shards_by_name(present, stem, wanted)
                    return WeightFiles(wanted, tuple(shards), index)
    return None


def _shards_of(index: str, read_index: Callable[[str], dict]) -> list[str]:
    weight_map = read_index(index).get("weight_map", {})
    return sorted(set(weight_map.values()))


def _shards_by_name(names: set[str], stem: str, variant: str | None) -> list[str]:
    if variant is None:
        pattern = re.compile(rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.safetensors")
    else:
        v = re.escape(variant)
        pattern = re.compile(rf"{re.escape(stem)}(\.{v}-\d{{5}}-of-\d{{5}}|-\d{{5}}-of-\d{{5}}\.{v})\.safetensors")
    return sorted(n for n in names if pattern.fullmatch(n))


@dataclass(frozen=True)
class ComponentState:
    """A component folder on disk, judged by the rule."""

    ready: bool
    weights: WeightFiles | None
    missing: tuple[str, ...] = ()  # files the chosen weights need that are not there
    bytes_missing: int | None = None  # from the index's total size, when shards are missing

    def describe(self) -> str:
        if self.ready:
            return "ready"
        if self.weights is None:
            return "missing"
        have = len(self.weights.files) - len(self.missing)
        gb = (self.bytes_missing or 0) / 1e9
        amount = f"{gb:.1f} GB" if gb >= 0.1 else f"{gb * 1000:.1f} MB"
        size = f", about {amount} still to fetch" if self.bytes_missing else ""
        return f"incomplete: {have} of {len(self.weights.files)} shards{size}"


def component_state(folder: Path, role: str, variant: str | None = "bf16") -> ComponentState:
    """Whether `folder` holds a usable `role` (prior, decoder, vqgan, text_encoder, tokenizer, scheduler)."""
    configs = CONFIGS.get(role, ("config.json",))
    if not folder.is_dir() or not all((folder / name).is_file() for name in configs):
        return ComponentState(False, None)
    if role in CONFIGS:
        return ComponentState(True, None)
    names = [p.name for p in folder.iterdir() if p.is_file()]
    weights = choose_weights(names, variant, lambda index: json.loads((folder / index).read_text()))
    if weights is None:
        return ComponentState(False, None)
    missing = tuple(f for f in weights.files if not (folder / f).is_file())
    if not missing:
        return ComponentState(True, weights)
    total = json.loads((folder / weights.index).read_text()).get("metadata", {}).get("total_size")
    have = sum((folder / f).stat().st_size for f in weights.files if (folder / f).is_file())
    return ComponentState(False, weights, missing, max(0, int(total) - have) if total else None)


def files_to_fetch(
    role: str, names: Collection[str], variant: str | None = "bf16", read_index: Callable[[str], dict] | None = None
) -> list[str] | None:
    """Of a component folder's files on the Hub (names relative to it), exactly those `role` needs: configs plus
    the chosen weights (index and every shard it names). None if the folder cannot make the component."""
    present = set(names)
    if role == "tokenizer":
        return sorted(n for n in present if TOKENIZER_FILES.fullmatch(n)) or None
    if role == "scheduler":
        return ["scheduler_config.json"] if "scheduler_config.json" in present else None
    if "config.json" not in present:
        return None
    weights = choose_weights(present, variant, read_index)
    return None if weights is None else ["config.json", *weights.all]
