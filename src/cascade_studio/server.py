"""One server process: the HTTP API under /v1 and the studio UI at /, over one job queue and one history."""

from __future__ import annotations

import secrets
import sys
import threading
import time

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
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
    if settings.share:
        threading.Thread(target=share_link, args=(server, settings), daemon=True).start()
    try:
        server.run()
    finally:
        queue.close()


def share_link(server: uvicorn.Server, settings: Settings) -> str | None:
    """Once the server is up, open a public gradio.live tunnel to it; on failure say why and keep serving locally."""
    from gradio.networking import setup_tunnel

    while not server.started and not server.should_exit:
        time.sleep(0.1)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    try:
        url = setup_tunnel(host, settings.port, secrets.token_urlsafe(32), None, None)
    except Exception as exc:  # noqa: BLE001 - any failure to tunnel leaves the local server as it is
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        print(f"share: no public link ({exc}{cause}); the studio still serves on http://{settings.host}:{settings.port}",
              file=sys.stderr, flush=True)
        return None
    print(f"share: public link {url} (anyone with it can use this studio; --auth user:pass restricts it)",
          file=sys.stderr, flush=True)
    return url
