"""Hugging Face Space: `cascade-studio space export DIR` writes a folder a Gradio Space runs as is.

On ZeroGPU hardware (the `spaces` package importable), each engine call is wrapped in `spaces.GPU` with a
duration computed from the request, and the `auto` speed-up is off (see create_space_app); elsewhere nothing
changes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gradio as gr

from . import __version__
from .config import Settings
from .engine import CascadeEngine, GenerationRequest
from .models.presets import PRESETS
from .service import open_queue
from .ui.app import build_app
from .ui.handlers import Studio

PACKAGE = Path(__file__).resolve().parent
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
    if "SPACES_ZERO_GPU" in os.environ and settings.speedup == "auto":
        # Each ZeroGPU call runs in a short-lived process: a CUDA graph captured in one would not reach the next.
        settings = settings.model_copy(update={"speedup": "off"})
    queue = open_queue(settings, with_zerogpu(CascadeEngine.from_settings(settings)))
    demo = build_app(Studio(queue, queue.store))
    demo.queue(max_size=queue.max_queued * 2, default_concurrency_limit=queue.max_queued + 1)
    return demo


def front_matter() -> str:
    preload = [
        f"  - {repo} {','.join(p for pats in subs.values() for p in pats)}"
        for repo, subs in PRESETS["full"].files_by_repo().items()
    ]
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
            'python_version: "3.11"',
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


def export_space(out: Path) -> list[Path]:
    """app.py, pinned requirements.txt, README.md with the Space front matter, and the package itself."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / "cascade_studio"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (out / "app.py").write_text(APP)
    (out / "requirements.txt").write_text("\n".join(PINNED) + "\n")
    (out / "README.md").write_text(
        front_matter()
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
