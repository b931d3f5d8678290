"""The shipped demo model: it is in the package, small, fast enough, and its text really steers the image.

Checked by the same pixel analyser `cascade-studio eval-demo` uses (background = colour of the frame, shapes =
regions that differ from it).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from cascade_studio.models.source import DEMO_DIR, resolve_model
from cascade_studio.train.analyze import analyze
from tests.test_cli import CLI

PROMPTS = [  # (prompt, background, shape colour): training and held-out colour-shape pairs
    ("a red circle on a white background", "white", "red"),
    ("a large blue square on a yellow background", "yellow", "blue"),
    ("a large red triangle in the centre on a black background", "black", "red"),  # held-out pair
]


@pytest.fixture(scope="module")
def demo():
    return CascadeEngine.from_settings(Settings(model="demo", device="cpu"))


def test_shipped_in_the_package_small_and_documented():
    files = [p for p in DEMO_DIR.rglob("*") if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    assert weights <= 20 * 1024 * 1024
    assert (DEMO_DIR / "README.md").is_file() and (DEMO_DIR / "cascade_studio.json").is_file()
    source = resolve_model("demo")
    assert source.identity.name == "cascade-studio-demo" and source.identity.preset == "demo"
    assert source.defaults["width"] == 256


@pytest.mark.parametrize("prompt, background, colour", PROMPTS)
def test_text_steers_the_image(demo, prompt, background, colour):
    found = [analyze(demo(demo.request(prompt=prompt, seed=seed)).images[0]) for seed in range(4)]
    assert sum(d.background == background for d in found) >= 3, found
    assert sum(d.colour == colour for d in found) >= 2, found


def test_different_prompts_give_different_scenes(demo):
    red = analyze(demo(demo.request(prompt="a red circle on a white background", seed=1)).images[0])
    green = analyze(demo(demo.request(prompt="a green circle on a black background", seed=1)).images[0])
    assert (red.background, green.background) == ("white", "black")


def test_cli_defaults_to_the_demo_model_offline(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf")}
    proc = subprocess.run([CLI, "generate", "a blue square on a yellow background", "--seed", "3", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "model: cascade-studio-demo" in proc.stderr and "small demo model" in proc.stderr
    path = Path(proc.stdout.split("\t")[0])
    image = Image.open(path)
    assert image.size == (256, 256) and analyze(image).background == "yellow"
