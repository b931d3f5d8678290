"""Finding, checking and loading Stable Cascade weights (official presets or local folders)."""

from .errors import ModelConfigError, ModelNotFoundError
from .loading import CascadePipelines, load_pipelines
from .presets import PRESETS, ModelPreset
from .source import ModelIdentity, ModelSource, resolve_model

__all__ = [
    "PRESETS",
    "CascadePipelines",
    "ModelConfigError",
    "ModelIdentity",
    "ModelNotFoundError",
    "ModelPreset",
    "ModelSource",
    "load_pipelines",
    "resolve_model",
]
