"""Switching the loaded model while the server runs: which models are ready here, and the job that swaps them.

The switch waits in the same line as generations (one device, one line). It frees the current model first, so two
never share the device's memory, then loads the new one with progress per component; if that fails, the previous
model is loaded again and the job fails with the reason. Memory before and after is measured and reported.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Settings
from ..engine import CancelToken, CascadeEngine
from ..models import ModelNotFoundError
from ..models.architectures import OFFICIAL
from ..models.errors import ModelConfigError
from ..models.presets import PRESETS
from ..models.single_file import STAGE_C_KEY, match_config, read_keys, unet_keys
from ..models.source import preset_states, repo_revisions, resolve_model
from .queue import JobQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelChoice:
    """A model this server can load: a preset, a local folder, or either with a single-file prior or decoder."""

    id: str  # what the API takes: demo, full, lite, folder:NAME, BASE+FILE
    label: str
    model: str  # the --model value
    prior_file: str | None = None
    decoder_file: str | None = None

    def settings(self, base: Settings) -> Settings:
        return base.model_copy(
            update={"model": self.model, "prior_file": self.prior_file, "decoder_file": self.decoder_file}
        )


def current_choice(settings: Settings, engine: CascadeEngine) -> ModelChoice:
    """The choice the running engine was loaded from (auto resolved to what it found)."""
    preset = engine.identity.preset
    model = preset if preset in (*PRESETS, "demo") else settings.model
    files = {k: str(v) for k, v in (("prior_file", settings.prior_file), ("decoder_file", settings.decoder_file)) if v}
    suffix = "".join(f"+{Path(v).stem}" for v in files.values())
    ident = (model if model in (*PRESETS, "demo") else f"folder:{Path(model).name}") + suffix
    return ModelChoice(ident, engine.identity.name, model, files.get("prior_file"), files.get("decoder_file"))


def available_models(settings: Settings) -> list[ModelChoice]:
    """What is ready on this machine: the demo model, the presets in the cache, the model folders in
    `settings.model_dir`, and the Stage C / Stage B files there with every base whose architecture they fit."""
    bases = [ModelChoice("demo", "demo: the bundled tiny model", "demo")]
    revisions = repo_revisions(settings.revision, settings.prior_revision, settings.decoder_revision)
    cache = Path(settings.cache_dir) if settings.cache_dir else None
    for name, preset in PRESETS.items():
        from huggingface_hub import constants as hf_constants

        states = preset_states(preset, revisions, cache or Path(hf_constants.HF_HUB_CACHE))
        if all(state.ready for _, state in states.values()):
            bases.append(ModelChoice(name, f"{name}: {preset.display_name}", name))
    folder = Path(settings.model_dir).expanduser() if settings.model_dir else None
    files: list[Path] = []
    if folder is not None and folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                try:
                    resolve_model(str(entry))
                except (ModelNotFoundError, ModelConfigError, OSError, ValueError):
                    continue
                bases.append(ModelChoice(f"folder:{entry.name}", f"folder: {entry.name}", str(entry)))
            elif entry.suffix == ".safetensors":
                files.append(entry)
    return bases + [choice for file in files for choice in _with_file(file, bases)]


def _with_file(file: Path, bases: list[ModelChoice]) -> list[ModelChoice]:
    """The bases a single file fits: their prior (Stage C) or decoder (Stage B) has exactly its shapes."""
    try:
        keys = read_keys(file)
        role = "prior" if STAGE_C_KEY in {k.removeprefix("model.diffusion_model.") for k in keys} else "decoder"
        keys = unet_keys(keys, file, role)
    except (ModelConfigError, OSError, ValueError):
        return []
    out = []
    for base in bases:
        candidates = _architecture(base, role)
        try:
            match_config(keys, candidates, file, role)
        except ModelConfigError:
            continue
        which = {"prior_file": str(file)} if role == "prior" else {"decoder_file": str(file)}
        out.append(
            ModelChoice(
                f"{base.id}+{file.stem}", f"{base.label.split(':')[0]} + {file.name} as the {role}", base.model, **which
            )
        )
    return out


def _architecture(base: ModelChoice, role: str) -> dict[str, dict]:
    if base.model in OFFICIAL[role]:
        return {base.model: OFFICIAL[role][base.model]}
    root = Path(resolve_model(base.model).dirs[role])
    config = json.loads((root / "config.json").read_text())
    return {base.id: {k: v for k, v in config.items() if not k.startswith("_")}}


def memory_in_use(device: torch.device) -> int:
    """Bytes the model's memory lives in: GPU memory allocated on CUDA, this process's resident memory otherwise."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Unloaded:
    """Stands in for the engine while a switch runs, or after one failed: says so to anyone who asks it to work."""

    def __init__(self, previous: CascadeEngine, reason: str):
        self.identity, self.speedups = previous.identity, []
        self._describe = previous.describe() | {"model": f"{previous.identity.name} (unloaded)"}
        self._defaults = dict(previous.pipelines.defaults)
        self.reason = reason

    def describe(self) -> dict:
        return self._describe

    def request(self, /, **fields):
        from ..engine import make_request

        return make_request(**(self._defaults | fields))

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"no model is loaded: {self.reason}")


@dataclass
class SwitchModel:
    """The job that replaces the loaded model."""

    choice: ModelChoice
    base: Settings  # device, dtype, speed-ups, cache: all but the model
    kind: str = "model"

    def describe(self) -> dict:
        return {"model": self.choice.id, "label": self.choice.label}

    def run(self, queue: JobQueue, report, cancel: CancelToken) -> dict:
        old = queue.engine
        device = old.pipelines.device
        before = memory_in_use(device)
        report({"stage": "freeing the current model", "step": 0, "total": 7})
        previous = queue.model_choice
        queue.engine = Unloaded(old, f"switching to {self.choice.id}")
        gone = weakref.ref(old.pipelines)
        old.close()
        del old
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        freed = memory_in_use(device)

        def step(done: int, total: int, what: str) -> None:
            report({"stage": f"loading {what}", "step": done + 1, "total": total + 1})

        try:
            engine = CascadeEngine.from_settings(self.choice.settings(self.base), progress=step)
        except Exception as exc:
            log.warning("switch to %s failed (%s); loading %s again", self.choice.id, exc, previous.id)
            try:
                queue.engine = CascadeEngine.from_settings(previous.settings(self.base))
            except Exception as again:  # noqa: BLE001 - nothing else to fall back to
                queue.engine.reason = (
                    f"the switch to {self.choice.id} failed ({exc}), and so did {previous.id} ({again})"
                )
            raise
        queue.engine, queue.model_choice = engine, self.choice
        after = memory_in_use(device)
        return {
            "model": self.choice.id,
            "name": engine.identity.name,
            "memory_before": before,
            "memory_after_freeing": freed,
            "memory_after": after,
            "old_model_released": gone() is None,
        }
