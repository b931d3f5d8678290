"""One server process: the HTTP API under /v1 and the studio UI at /, over one job queue and one history."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from .config import Settings
from .engine import CascadeEngine
from .service import JobQueue, open_queue
from .service.api import create_api
from .ui.app import mount
from .ui.handlers import Studio


def build_server(settings: Settings, engine: CascadeEngine | None = None,
                 auth: tuple[str, str] | None = None) -> tuple[FastAPI, JobQueue]:
    queue = open_queue(settings, engine)
    app = create_api(queue, api_token=settings.api_token)
    return mount(app, Studio(queue, queue.store), auth=auth), queue


def run(app: FastAPI, queue: JobQueue, settings: Settings) -> None:
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        queue.close()
