"""Shared fixtures: tiny random Stable Cascade models in the official layouts, built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine, make_request
from cascade_studio.models.architectures import build_tiny_model
from cascade_studio.models.presets import PRESETS

torch.set_num_threads(2)  # CI machines have 2 cores; say so rather than let torch guess

SMALL = dict(width=256, height=256, prior_steps=4, decoder_steps=3)


def small_request(**fields):
    """A request sized for the tiny model: 256x256, few steps."""
    return make_request(**({"prompt": "a red circle on a blue background"} | SMALL | fields))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local folder in the official layout, fp32 weights without variant suffix."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def engine(tiny_model_dir) -> CascadeEngine:
    return CascadeEngine.from_settings(Settings(model=str(tiny_model_dir), device="cpu"))


@pytest.fixture(scope="session")
def demo_engine() -> CascadeEngine:
    """The bundled demo model (128x128 shapes), as `--model demo` loads it."""
    return CascadeEngine.from_settings(Settings(model="demo", device="cpu"))


def write_hub_snapshot(cache: Path, repo: str, commit: str, source: Path, subfolders: list[str]) -> Path:
    """Lay out `subfolders` of `source` as huggingface_hub caches a download of `repo` at `commit`."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    for sub in subfolders:
        shutil.copytree(source / sub, snapshot / sub, dirs_exist_ok=True)
    return snapshot


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache holding both presets as the official repos lay them out (bf16 variant files)."""
    root = tmp_path_factory.mktemp("hub")
    full = build_tiny_model(root / "src-full", variant="bf16", previewer=False)
    lite = build_tiny_model(root / "src-lite", variant="bf16", lite=True, previewer=False)
    cache = root / "cache"
    write_hub_snapshot(cache, "stabilityai/stable-cascade-prior", "a" * 40, full, ["prior"])
    write_hub_snapshot(cache, "stabilityai/stable-cascade-prior", "a" * 40, lite, ["prior_lite"])
    write_hub_snapshot(
        cache,
        "stabilityai/stable-cascade",
        "b" * 40,
        full,
        ["decoder", "vqgan", "text_encoder", "tokenizer", "scheduler"],
    )
    write_hub_snapshot(cache, "stabilityai/stable-cascade", "b" * 40, lite, ["decoder_lite"])
    assert set(PRESETS) == {"full", "lite"}
    return cache
