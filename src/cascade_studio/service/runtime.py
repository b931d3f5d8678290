"""Open the shared runtime once per process: engine, history store and the job queue over both."""

from __future__ import annotations

from ..config import Settings
from ..engine import CascadeEngine
from ..models.lora import LoraLibrary
from ..store import HistoryStore
from .queue import JobQueue


def open_queue(settings: Settings, engine: CascadeEngine | None = None) -> JobQueue:
    from .switch import current_choice

    engine = engine or CascadeEngine.from_settings(settings)
    if hasattr(engine, "lora_library"):  # the server's settings say where its LoRAs are (a remote engine has its own)
        engine.lora_library = LoraLibrary(settings.lora_folder)
    store = HistoryStore(settings.history_db or settings.output_dir / "history.sqlite", settings.output_dir)
    queue = JobQueue(engine, store, max_queued=settings.max_queued, per_client=settings.per_client_jobs)
    queue.settings, queue.model_choice = settings, current_choice(settings, engine)
    return queue
