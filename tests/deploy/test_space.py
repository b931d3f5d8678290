"""The Hugging Face Space export: the folder runs as is, offline, with the demo model; ZeroGPU wraps the engine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from cascade_studio.engine import make_request
from cascade_studio.space import ZeroGPUEngine, export_space, gpu_seconds, with_zerogpu
from tests.ui.conftest import free_port


def test_exported_folder_runs_the_studio_offline(tmp_path):
    out = tmp_path / "space"
    export_space(out)
    readme = (out / "README.md").read_text()
    for line in (
        "sdk: gradio",
        "app_file: app.py",
        'python_version: "3.10.13"',  # what ZeroGPU runs (its docs); the export once wrote 3.11
        "suggested_hardware: zero-a10g",
        "  - stabilityai/stable-cascade-prior prior/config.json,prior/diffusion_pytorch_model.bf16.safetensors",
        "license: other",
    ):
        assert line in readme
    assert "sdk_version: 6." in readme and "non-commercial community licence" in readme
    requirements = (out / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in requirements and "diffusers==0.42.1" in requirements
    assert any(r.startswith("gradio==6.") for r in requirements)
    assert (out / "cascade_studio" / "demo_model" / "prior").is_dir()

    port = free_port()
    script = textwrap.dedent(f"""
        import cascade_studio, app
        assert cascade_studio.__file__.startswith({str(out)!r}), cascade_studio.__file__
        from gradio_client import Client
        app.demo.launch(server_port={port}, prevent_thread_lock=True, quiet=True)
        gallery, info = Client("http://127.0.0.1:{port}", verbose=False).predict(
            prompt="a red circle on a white background", seed=3, num_images=2, api_name="/generate")
        print("seeds", info["seeds"], len(gallery))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "CASCADE_OUTPUT_DIR": str(tmp_path / "outputs"),
        "CASCADE_TORCH_THREADS": "2",
    }
    proc = subprocess.run([sys.executable, "-c", script], cwd=out, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seeds [3, 4] 2" in proc.stdout


def test_zerogpu_duration_grows_with_the_work():
    default = gpu_seconds(make_request(prompt="x"))
    assert 15 < default < 60  # start-up plus twice the measured H200 time of one 1024x1024 image, well below the cap
    assert gpu_seconds(make_request(prompt="x", num_images=4)) > default
    assert gpu_seconds(make_request(prompt="x", prior_steps=40, decoder_steps=20)) > default
    assert gpu_seconds(make_request(prompt="x", num_images=8, width=2048, height=2048, prior_steps=100)) == 120


def test_zerogpu_wraps_only_when_spaces_is_importable(engine, monkeypatch):
    pytest.importorskip("spaces")
    wrapped = with_zerogpu(engine)
    assert isinstance(wrapped, ZeroGPUEngine) and wrapped.identity == engine.identity
    request = make_request(prompt="a red circle", width=256, height=256, prior_steps=2, decoder_steps=2, seed=1)
    assert wrapped(request).seeds == [1]  # off ZeroGPU, spaces.GPU hands back the function itself
    monkeypatch.setitem(sys.modules, "spaces", None)  # not importable
    assert with_zerogpu(engine) is engine


def test_preload_lists_what_the_cached_preset_really_holds(tmp_path):
    """A sharded prior and an fp32-only Stage A are preloaded as they are: the same rule as `download`."""
    from cascade_studio.models.hub import download
    from cascade_studio.models.presets import PRESETS
    from cascade_studio.space import front_matter, preload_files
    from tests.models.fake_hub import FakeHub, Served, build_repos

    repos = build_repos(tmp_path / "repos")
    with Served(FakeHub(repos)) as hub:
        download(PRESETS["full"], cache_dir=tmp_path / "cache", endpoint=hub.url, log=lambda _: None)
    files, chosen_from = preload_files(tmp_path / "cache")
    assert chosen_from.startswith("the files of the cached preset")
    prior = files["stabilityai/stable-cascade-prior"]
    assert "prior/diffusion_pytorch_model.safetensors.index.bf16.json" in prior and len(prior) == 1 + 1 + 7
    assert "vqgan/diffusion_pytorch_model.safetensors" in files["stabilityai/stable-cascade"]
    assert "prior/diffusion_pytorch_model.safetensors" not in prior  # the fp32 file beside the shards: not needed
    header = front_matter(tmp_path / "cache").splitlines()
    prior_line = next(line for line in header if line.startswith("  - stabilityai/stable-cascade-prior "))
    assert "prior/diffusion_pytorch_model.bf16-00001-of-00007.safetensors" in prior_line
    known, known_from = preload_files(tmp_path / "empty")
    assert (
        known_from.startswith("the official repos' layout")
        and "vqgan/diffusion_pytorch_model.safetensors" in known["stabilityai/stable-cascade"]
    )


def test_zerogpu_never_runs_a_speedup(monkeypatch, tmp_path):
    from cascade_studio.config import Settings
    from cascade_studio.space import create_space_app, zerogpu_notes

    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    monkeypatch.setitem(sys.modules, "spaces", None)  # the engine unwrapped, so the demo model runs here
    demo = create_space_app(Settings(model="demo", device="cpu", speedup="compile", output_dir=tmp_path))
    assert demo is not None
    from cascade_studio import space

    assert any("no torch.compile" in note for note in zerogpu_notes()) and space.ZEROGPU_PYTHON == "3.10.13"
