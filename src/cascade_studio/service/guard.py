"""One guard in front of the whole server (the /v1 API, the other client APIs and the studio): who may call what,
and limits enforced on the byte stream rather than on what a request claims.

- **Credentials.** `--api-token` (Bearer) and `--auth user:pass` (HTTP Basic) open the APIs; with either set,
  every API route needs one of them (the liveness check `/v1/health` excepted). The studio page and its Gradio
  routes (including `/gradio_api/file=`) sit behind Gradio's login, which takes the `--auth` pair or the token as
  the password (see `studio_login`). With neither set, the server is open to whoever can reach it, which by default
  is only this machine.
- **Throttling.** An address that fails authentication `MAX_FAILURES` times in `FAILURE_WINDOW` seconds is refused
  (429) for that long; passwords and tokens are compared in constant time.
- **Cross-site requests.** State-changing API calls with an `Origin` of another site are refused, and their bodies
  must be JSON (or multipart where a route takes files), so no web page can queue jobs through a visitor's browser.
- **Limits on the stream.** A body is counted as it arrives, chunked or not, and cut off with 413 past the route's
  limit; a body that stalls for `BODY_TIMEOUT` seconds gets 408; either answer closes the connection, so the rest
  of that body is never read. Headers past `MAX_HEADER_BYTES` get 431. Headers that arrive too slowly, or too
  large to parse, are the HTTP protocol's to refuse (server.py).
- **Files.** Gradio's file routes serve images only; the history database is never among them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

KIB, MIB = 1024, 1024**2
DEFAULT_BODY = 64 * KIB  # a prompt is at most 2000 characters: a JSON request of ours is far smaller
IMAGE_BODY = 32 * MIB  # routes that take images (documented in the README)
DATASET_BODY = 96 * MIB  # a LoRA training's pictures, base64 in one JSON body
BODY_LIMITS = {  # path prefix -> bytes; the longest matching prefix wins
    "/gradio_api/upload": IMAGE_BODY,
    "/v1/trainings": DATASET_BODY,
    "/v1/generations": IMAGE_BODY,  # init_image, mask and image prompts, base64 in the JSON body
    "/sdapi/v1/png-info": IMAGE_BODY,
    "/sdapi/v1/img2img": IMAGE_BODY,
    "/v1/images/edits": IMAGE_BODY,
    "/v1/images/variations": IMAGE_BODY,
    "/gradio_api/": 1 * MIB,
}
BODY_TIMEOUT = 30.0  # seconds a started body may go without sending a byte
MAX_HEADER_BYTES = 16 * KIB  # a request's headers, all together
MAX_FAILURES, FAILURE_WINDOW = 10, 60.0
API_PREFIXES = ("/v1/", "/sdapi/")
OPEN_PATHS = ("/v1/health",)  # liveness stays open for load balancers
MULTIPART_PATHS = ("/v1/images/edits", "/v1/images/variations")  # API routes whose bodies are multipart forms
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def body_limit(path: str) -> int:
    matches = [prefix for prefix in BODY_LIMITS if path.startswith(prefix)]
    return BODY_LIMITS[max(matches, key=len)] if matches else DEFAULT_BODY


@dataclass
class Credentials:
    """What opens the server: an API token, studio users, or nothing (an open, by default local, server)."""

    api_token: str | None = None
    users: dict[str, str] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        return bool(self.api_token or self.users)

    def token_ok(self, token: str) -> bool:
        return self.api_token is not None and hmac.compare_digest(token.encode(), self.api_token.encode())

    def user_ok(self, user: str, password: str) -> bool:
        expected = self.users.get(user)
        # Compare against something even for an unknown user, so timing does not tell which users exist.
        ok = hmac.compare_digest(password.encode(), (expected or "\0" * len(password)).encode())
        return expected is not None and ok

    def studio_login(self, user: str, password: str) -> bool:
        """Gradio's login check: an --auth pair, or any name with the API token as the password."""
        return self.user_ok(user, password) or self.token_ok(password)

    def check(self, authorization: str) -> tuple[bool, str | None]:
        """(authorised, user) for an Authorization header: Bearer <token>, or Basic with an --auth pair or the token
        as the password (A1111's --api-auth clients send Basic)."""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return self.token_ok(value.strip()), None
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False, None
            if self.user_ok(user, password):
                return True, user
            return self.token_ok(password), None
        return False, None


class FailureTracker:
    """Failed logins and tokens per address; too many in a window and the address waits."""

    def __init__(self, limit: int | None = None, window: float | None = None):
        self.limit, self.window = limit or MAX_FAILURES, window or FAILURE_WINDOW
        self._times: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._times[address]
        while times and now - times[0] > self.window:
            times.popleft()
        if not times:
            self._times.pop(address, None)
        return times

    def blocked_for(self, address: str) -> float:
        """Seconds this address must still wait, or 0."""
        now = time.monotonic()
        times = self._recent(address, now)
        return self.window - (now - times[-1]) if len(times) >= self.limit else 0.0

    def failed(self, address: str) -> None:
        self._times[address].append(time.monotonic())
        if len(self._times[address]) == self.limit:
            log.warning(
                "authentication failed %d times in %.0f s from %s; refusing it for %.0f s",
                self.limit,
                self.window,
                address,
                self.window,
            )


def problem(status: int, message: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    return status, headers or {}, json.dumps({"detail": [message]}).encode()


class Guard:
    """ASGI middleware over the whole server; see the module docstring."""

    def __init__(self, app, credentials: Credentials, *, failures: FailureTracker | None = None):
        self.app = app
        self.credentials = credentials
        self.failures = failures or FailureTracker()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        address = scope["client"][0] if scope.get("client") else "unknown"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(path, method, address, headers, scope)
        if refusal is not None:
            return await _respond(send, *refusal)
        if method == "POST" and path.rstrip("/") == "/login":  # Gradio's login form: count its failures too
            send = self._watch_login(send, address)
        receive, send = self._limited(receive, send, path)
        await self.app(scope, receive, send)

    def _refusal(self, path: str, method: str, address: str, headers: dict[str, str], scope) -> tuple | None:
        """Why this request is refused before it runs, or None."""
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            return problem(431, f"headers: at most {MAX_HEADER_BYTES} bytes in all")
        wait = self.failures.blocked_for(address)
        if wait:
            return problem(
                429,
                f"authorization: too many failed attempts from {address}; try again in {wait:.0f} s",
                {"Retry-After": str(int(wait) + 1)},
            )
        declared, limit = headers.get("content-length"), body_limit(path)
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return problem(413, f"request body: at most {limit} bytes", {"Connection": "close"})  # never read
        if path.startswith(("/gradio_api/file=", "/gradio_api/file/", "/file=")):
            if not unquote(path).lower().endswith(IMAGE_SUFFIXES):
                return problem(404, "file: only images are served here")
        scope.setdefault("state", {})
        scope["state"]["client"], scope["state"]["privileged"] = address, False
        if not path.startswith(API_PREFIXES) or path in OPEN_PATHS:
            return None
        if self.credentials.required:
            ok, user = self.credentials.check(headers.get("authorization", ""))
            if not ok:
                self.failures.failed(address)
                return problem(
                    401,
                    "authorization: send 'Authorization: Bearer <token>' (--api-token) or HTTP "
                    "Basic with the --auth user and password",
                    {"WWW-Authenticate": "Bearer"},
                )
            scope["state"]["privileged"] = True
            if user:
                scope["state"]["client"] = f"{user}@{address}"
        if method in STATE_CHANGING:
            return _cross_site(path, headers)
        return None

    def _limited(self, receive, send, path: str):
        """receive() that counts the body as it arrives and gives up on a stalled one, and send() that then closes
        the connection: the body's rest is never read (keep-alive would read, and drop, whatever a client streams).
        receive() raises HTTPException, which the app answering the request (the API or Gradio) turns into its own
        JSON error."""
        limit, seen, done, cut = body_limit(path), 0, False, False

        async def guarded():
            nonlocal seen, done, cut
            if done:
                return await receive()  # after the body: disconnect notices, which may take as long as they like
            try:
                message = await asyncio.wait_for(receive(), BODY_TIMEOUT)
            except asyncio.TimeoutError:  # TimeoutError itself from 3.11 on; 3.10 too
                cut = True
                raise HTTPException(408, [f"request body: nothing arrived for {BODY_TIMEOUT:.0f} s"]) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    cut = True
                    raise HTTPException(413, [f"request body: at most {limit} bytes"])
                done = not message.get("more_body", False)
            return message

        async def closing(message):
            if cut and message["type"] == "http.response.start":
                message = message | {"headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        return guarded, closing

    def _watch_login(self, send, address: str):
        async def watched(message):
            if message["type"] == "http.response.start" and message["status"] in (400, 401):
                self.failures.failed(address)
            await send(message)

        return watched


def _cross_site(path: str, headers: dict[str, str]) -> tuple | None:
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != headers.get("host"):
        return problem(403, f"origin: cross-site requests to this API are refused (from {origin[:80]})")
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind and headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers:
        return None  # no body at all (DELETE, /interrupt)
    allowed = ("multipart/form-data", "application/json") if path.startswith(MULTIPART_PATHS) else ("application/json",)
    if kind not in allowed and not kind.endswith("+json"):
        return problem(415, f"content-type: send {' or '.join(allowed)} (got {kind or 'none'})")
    return None


async def _respond(send, status: int, headers: dict[str, str], body: bytes) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    try:
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
    except RuntimeError:  # a response had already started: the connection is closed instead
        pass
