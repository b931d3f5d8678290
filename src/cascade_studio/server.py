"""One server process: the HTTP API under /v1 and the studio UI at /, over one job queue and one history, behind
one guard (service/guard.py).

Shutting down (SIGTERM, Ctrl-C) takes a few seconds at most: the queue stops first, so the running job ends within
its current step and every event stream sees its end; open connections get `GRACEFUL_SECONDS` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import threading
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import Settings
from .engine import CascadeEngine
from .service import JobQueue, open_queue
from .service.api import create_api
from .service.guard import Credentials, Guard
from .ui.app import mount
from .ui.handlers import Studio

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 10.0  # seconds a connection may take to send a request's headers
MAX_HEADER_BYTES = (
    64 * 1024
)  # a request head still incomplete past this size is refused (400); the guard's 431 is finer
GRACEFUL_SECONDS = 3  # after the queue has stopped, what open connections get to finish


def setup_logging(level: int = logging.INFO) -> None:
    """One line per record, with time and source, on stderr; the libraries' own loggers stay at warnings."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("cascade_studio").setLevel(level)


def build_server(
    settings: Settings, engine: CascadeEngine | None = None, auth: tuple[str, str] | None = None
) -> tuple[Guard, JobQueue]:
    """The whole server as one ASGI app (the guard, the API, the studio) and its job queue."""
    credentials = Credentials(settings.api_token, dict([auth]) if auth else {})
    queue = open_queue(settings, engine)
    app = create_api(queue)
    studio_auth = credentials.studio_login if credentials.required else None
    return Guard(mount(app, Studio(queue, queue.store), auth=studio_auth), credentials), queue


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers: a client that opens a connection and
    sends its headers slowly, or never, is cut off after HEADER_TIMEOUT seconds (uvicorn has no such limit)."""

    _deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(HEADER_TIMEOUT, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the headers are in: the request runs (its body has the guard's own timeout)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class Server(uvicorn.Server):
    """uvicorn's server, which stops the job queue as soon as a stop is asked for, so that running jobs end and
    their event streams close instead of holding the shutdown open."""

    def __init__(self, config: uvicorn.Config, queue: JobQueue):
        super().__init__(config)
        self.queue = queue

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        threading.Thread(target=self.queue.close, name="cascade-shutdown", daemon=True).start()


def uvicorn_config(app, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        http=GuardedH11,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )


def exposure_warning(host: str, credentials: Credentials) -> str | None:
    """What to warn about before serving an address other machines can reach, with nothing to log in with."""
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.") or credentials.required:
        return None
    return (
        f"serving on {host} without --auth or --api-token: anyone who can reach this address can generate, "
        "read the history and cancel jobs"
    )


def run(app, queue: JobQueue, settings: Settings, auth: tuple[str, str] | None = None) -> None:
    warning = exposure_warning(settings.host, Credentials(settings.api_token, dict([auth]) if auth else {}))
    if warning:
        log.warning(warning)
    server = Server(uvicorn_config(app, settings), queue)
    if settings.share:
        threading.Thread(target=share_link, args=(server, settings), daemon=True).start()
    try:
        server.run()
    finally:
        queue.close()
        log.info("stopped")


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
        print(
            f"share: no public link ({exc}{cause}); the studio still serves on http://{settings.host}:{settings.port}",
            file=sys.stderr,
            flush=True,
        )
        return None
    print(
        f"share: public link {url} (anyone with it can use this studio; --auth user:pass restricts it)",
        file=sys.stderr,
        flush=True,
    )
    return url
