"""What the engine reports while it works, and how a caller asks it to stop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from PIL import Image

Stage = Literal["prior", "decoder"]


@dataclass(frozen=True)
class ProgressEvent:
    """One finished sampling step; `preview` is a rough RGB image of the first latent when the model has a previewer.

    On a GPU the engine keeps one step queued ahead, so the event for step k can come while step k still runs.

    `prior_cached` is true on decoder steps when the prior's output came from the cache (only decoder settings
    changed), so a UI can say so while the decoder still runs.
    """

    stage: Stage
    step: int
    total: int
    elapsed: float
    preview: Image.Image | None = None
    prior_cached: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


class GenerationCancelled(Exception):
    """Raised inside the engine when its CancelToken is set; nothing of the unfinished run is kept."""


class CancelToken:
    """Set from any thread; the engine checks it before each block of its networks."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
