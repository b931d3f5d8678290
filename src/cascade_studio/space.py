"""Hugging Face Space: `cascade-studio space export DIR` writes a folder a Gradio Space runs as is.

On ZeroGPU hardware (the `spaces` package importable), each engine call is wrapped in `spaces.GPU` with a
duration computed from the request, and the `auto` speed-up is off (see create_space_app); elsewhere nothing
changes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import gradio as gr
from huggingface_hub import constants as hf_constants

from . import __version__
from .config import Settings
from .engine import CascadeEngine, GenerationRequest
from .models.files import files_to_fetch
from .models.presets import PRESETS
from .models.source import preset_states
from .service import open_queue
from .ui.app import build_app
from .ui.handlers import Studio

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
# ZeroGPU's published limits (huggingface/hub-docs, docs/hub/spaces-zerogpu.md): the Python it runs, the PyTorch
# versions it lists ("almost all versions from 2.1.0 to latest"), and no torch.compile.
ZEROGPU_PYTHON = "3.10.13"
ZEROGPU_TORCH_LISTED = ("2.1.0", "2.1.1", "2.1.2", "2.2.0", "2.2.2", "2.4.0", "2.5.1", "2.6.0", "2.7.1", "2.8.0")
# The full preset's files in the official repos as public sources show them (../shared/notes/official-weights.md):
# single bf16 files, and Stage A in fp32 (no source confirms a bf16 file of it).
KNOWN_FILES = {
    "prior": ["config.json", "diffusion_pytorch_model.bf16.safetensors"],
    "decoder": ["config.json", "diffusion_pytorch_model.bf16.safetensors"],
    "vqgan": ["config.json", "diffusion_pytorch_model.safetensors"],
    "text_encoder": ["config.json", "model.bf16.safetensors"],
    "tokenizer": ["*.json", "*.txt"],  # its exact files are not all known: patterns, which preload_from_hub takes
    "scheduler": ["scheduler_config.json"],
}
# The versions the tests ran with; a Space should run the same.
PINNED = [
    "torch==2.13.0",
    "diffusers==0.42.1",
    "transformers>=5.0,<6",
    "accelerate>=1.0",
    "safetensors>=0.4",
    "pydantic>=2.7,<3",
    "pydantic-settings>=2.3,<3",
    "pillow>=10",
    "tqdm>=4.66",
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "httpx>=0.27",
    "huggingface_hub>=1.0",
    f"gradio=={gr.__version__}",
    "spaces",
]

APP = '''"""cascade-studio on a Hugging Face Space (written by `cascade-studio space export`)."""

from cascade_studio.space import create_space_app
from cascade_studio.ui.app import PAGE

demo = create_space_app()

if __name__ == "__main__":
    demo.launch(**PAGE)
'''


def gpu_seconds(request: GenerationRequest) -> int:
    """GPU time to ask ZeroGPU for: the full model's measured speed on one H200 (prior 1.1 s for 20 steps, decoder
    1.2 s for 10 steps at 1024x1024), scaled by steps, pixels and images, doubled, plus start-up; capped at 120 s."""
    pixels = request.width * request.height / 1024**2
    work = (1.1 * request.prior_steps / 20 + 1.2 * request.decoder_steps / 10) * pixels * request.num_images
    return int(min(120, 15 + 2 * work))


class ZeroGPUEngine:
    """The engine, with each generation run inside `spaces.GPU` (ZeroGPU lends a GPU per call)."""

    def __init__(self, engine: CascadeEngine, spaces_module):
        self._engine = engine
        self._call = spaces_module.GPU(duration=lambda request, **_: gpu_seconds(request))(engine.__call__)

    def __call__(self, request: GenerationRequest, **kwargs):
        return self._call(request, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def with_zerogpu(engine: CascadeEngine):
    try:
        import spaces
    except ImportError:
        return engine
    return ZeroGPUEngine(engine, spaces)


def create_space_app(settings: Settings | None = None) -> gr.Blocks:
    settings = settings or Settings()
    if "SPACES_ZERO_GPU" in os.environ and settings.speedup != "off":
        # Each ZeroGPU call runs in a short-lived process: a CUDA graph captured in one would not reach the next,
        # and ZeroGPU does not support torch.compile at all (its docs), so neither speed-up may be chosen there.
        if settings.speedup != "auto":
            log.warning("speedup %r is not possible on ZeroGPU; running without", settings.speedup)
        settings = settings.model_copy(update={"speedup": "off"})
    queue = open_queue(settings, with_zerogpu(CascadeEngine.from_settings(settings)))
    demo = build_app(Studio(queue, queue.store))
    demo.queue(max_size=queue.max_queued * 2, default_concurrency_limit=queue.max_queued + 1)
    return demo


def preload_files(cache_dir: Path | None = None) -> tuple[dict[str, list[str]], str]:
    """repo -> the files the full preset needs, chosen by the same rule as `download` (files.py): from the local cache
    when the preset is there (so a sharded or fp32-only component is preloaded as it is), else from the layout public
    sources show of the official repos. Also says which of the two it used."""
    preset = PRESETS["full"]
    cache = Path(cache_dir or hf_constants.HF_HUB_CACHE)
    states = preset_states(preset, {}, cache)
    by_repo: dict[str, list[str]] = {}
    if all(state.ready for _, state in states.values()):
        for role, (folder, _) in states.items():
            repo, sub = preset.components()[role]
            names = [p.name for p in folder.iterdir() if p.is_file()]
            chosen = files_to_fetch(role, names, preset.variant, lambda i, f=folder: json.loads((f / i).read_text()))
            by_repo.setdefault(repo, []).extend(f"{sub}/{name}" for name in chosen)
        return by_repo, f"the files of the cached preset ({cache})"
    for role, (repo, sub) in preset.components().items():
        by_repo.setdefault(repo, []).extend(f"{sub}/{name}" for name in KNOWN_FILES[role])
    return by_repo, "the official repos' layout as public sources show it (no cached preset found)"


def front_matter(cache_dir: Path | None = None) -> str:
    files, _ = preload_files(cache_dir)
    preload = [f"  - {repo} {','.join(names)}" for repo, names in files.items()]
    return "\n".join(
        [
            "---",
            "title: cascade-studio",
            "emoji: 🎨",
            "colorFrom: indigo",
            "colorTo: blue",
            "sdk: gradio",
            f"sdk_version: {gr.__version__}",
            "app_file: app.py",
            f'python_version: "{ZEROGPU_PYTHON}"',
            "suggested_hardware: zero-a10g",
            "models:",
            "  - stabilityai/stable-cascade-prior",
            "  - stabilityai/stable-cascade",
            "preload_from_hub:",
            *preload,
            "license: other",
            "---",
        ]
    )


def zerogpu_notes() -> list[str]:
    """Where the export stands against ZeroGPU's published limits."""
    import torch

    torch_version = torch.__version__.split("+")[0]
    notes = [f"python {ZEROGPU_PYTHON} (what ZeroGPU runs)", "no torch.compile: the speed-up is off on ZeroGPU"]
    if torch_version not in ZEROGPU_TORCH_LISTED:
        notes.append(
            f"torch {torch_version} is not in ZeroGPU's listed versions (up to {ZEROGPU_TORCH_LISTED[-1]}); "
            "its docs say almost all versions from 2.1.0 to the latest work"
        )
    return notes


def export_space(out: Path, cache_dir: Path | None = None, log=print) -> list[Path]:
    """app.py, pinned requirements.txt, README.md with the Space front matter, and the package itself."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / "cascade_studio"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (out / "app.py").write_text(APP)
    (out / "requirements.txt").write_text("\n".join(PINNED) + "\n")
    _, chosen_from = preload_files(cache_dir)
    log(f"preload_from_hub: {chosen_from}")
    for note in zerogpu_notes():
        log(f"ZeroGPU: {note}")
    (out / "README.md").write_text(
        front_matter(cache_dir)
        + f"""

# cascade-studio {__version__}

Stable Cascade text-to-image studio: live preview, A/B comparison, seed-controlled batches, sweeps, history.
The official full model (`stabilityai/stable-cascade-prior` + `stabilityai/stable-cascade`, bf16) is preloaded;
without it the Space runs the small bundled demo model.

**Licence:** the Stable Cascade weights are under Stability AI's non-commercial community licence
(see the model repositories); this Space's code is Apache-2.0.
"""
    )
    return [out / "app.py", out / "requirements.txt", out / "README.md", target]
