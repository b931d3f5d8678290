"""A real server (uvicorn on a loopback port, in a thread) over the tiny model, for the API tests."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from cascade_studio.config import Settings
from cascade_studio.server import build_server, uvicorn_config
from tests.ui.conftest import free_port


@contextmanager
def running_server(tmp_path, engine, **settings):
    port = free_port()
    config = Settings(**({"model": "unused", "output_dir": tmp_path / "out", "port": port} | settings))
    app, queue = build_server(config, engine)
    server = uvicorn.Server(uvicorn_config(app, config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            yield http, queue
    finally:
        server.should_exit = True
        thread.join(10)
        queue.close()


def tiny(**fields) -> dict:
    """A request body sized for the tiny model."""
    return {"prompt": "a red circle", "width": 256, "height": 256, "prior_steps": 3, "decoder_steps": 2} | fields


def wait_done(http: httpx.Client, job_id: str, timeout: float = 60, **request) -> dict:
    deadline = time.time() + timeout
    while True:
        body = http.get(f"/v1/generations/{job_id}", **request).json()
        if body["status"] in ("done", "failed", "cancelled"):
            return body
        assert time.time() < deadline, body
        time.sleep(0.05)
