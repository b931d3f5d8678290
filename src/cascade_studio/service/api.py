"""The HTTP API (`/v1`), on the same server and the same JobQueue as the studio UI.

    POST   /v1/generations               202 + job id at once (422 for bad fields, 429 + Retry-After when full)
    GET    /v1/generations/{id}          status, queue position, progress, seeds, image URLs
    GET    /v1/generations/{id}/events   server-sent events: queued, progress, done | error | cancelled
    DELETE /v1/generations/{id}          cancel, queued or running
    GET    /v1/images/{image_id}.png     the PNG, metadata included
    GET    /v1/history                   finished generations, newest first, paged
    GET    /v1/health                    liveness, model and queue length
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine import RequestError
from ..store import JobRecord
from .queue import ClientLimitReached, Job, JobQueue, QueueFull

MAX_BODY = 64 * 1024  # bytes; a prompt is at most 2000 characters, so any larger body is not a request of ours
ID = re.compile(r"^[0-9a-f]{32}$")
PAGING = {"limit": (1, 100), "offset": (0, 10**9)}  # /v1/history's query parameters: allowed ranges


def _problem(status: int, messages: list[str], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": messages}, status_code=status, headers=headers)


def create_api(queue: JobQueue, api_token: str | None = None) -> FastAPI:
    app = FastAPI(title="cascade-studio", version=__version__, docs_url="/docs", openapi_url="/openapi.json",
                  description="Stable Cascade text-to-image: a shared job queue with persistent history.")
    store = queue.store

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return _problem(413, [f"request body: at most {MAX_BODY} bytes"])
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        def message(e: dict) -> str:
            field = ".".join(str(p) for p in e["loc"][1:]) or "body"
            if e["loc"][0] == "query" and field in PAGING:  # pydantic's text names only the bound that was missed
                low, high = PAGING[field]
                return f"{field}: must be a whole number from {low} to {high} (got {e['input']!r})"
            return f"{field}: {e['msg']}"
        return _problem(422, [message(e) for e in exc.errors()])

    def authorised(request: Request) -> str:
        """The caller's identity for the per-client cap: its token, else its address."""
        if api_token is not None:
            header = request.headers.get("authorization", "")
            if header != f"Bearer {api_token}":
                raise HTTPException(401, ["authorization: send 'Authorization: Bearer <token>'"],
                                    headers={"WWW-Authenticate": "Bearer"})
        return request.client.host if request.client else "api"

    def find(job_id: str) -> tuple[Job | None, JobRecord]:
        if not ID.match(job_id):
            raise HTTPException(404, [f"id: {job_id[:40]!r} is not a generation id (32 hex characters)"])
        record = store.get_job(job_id)
        if record is None:
            raise HTTPException(404, [f"id: no generation {job_id}"])
        return queue.get(job_id), record

    def view(job: Job | None, record: JobRecord) -> dict[str, Any]:
        status = job.status if job else record.status
        images = job.images if job and job.images else record.images
        request = job.request if job else record.request
        out: dict[str, Any] = {
            "id": record.id, "status": status, "request": request.model_dump(), "seeds": request.image_seeds,
            "model": record.model.name,
            "position": queue.position(job) if job and status == "queued" else 0,
            "images": [{"id": im.id, "seed": im.seed, "url": f"/v1/images/{im.id}.png"} for im in images],
            "timings": (job.timings if job and job.timings else record.timings), "error": job.error if job else record.error,
            "created": record.created, "finished": record.finished,
        }
        if job and job.progress and status == "running":
            p = job.progress
            out["progress"] = {"stage": p.stage, "step": p.step, "total": p.total, "elapsed": round(p.elapsed, 3)}
        return out

    @app.post("/v1/generations", status_code=202)
    async def create(request: Request, client: str = Depends(authorised)) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _problem(400, [f"body: not valid JSON ({exc.__class__.__name__}: {str(exc)[:80]})"])
        if not isinstance(body, dict):
            return _problem(422, ["body: must be a JSON object of request fields, e.g. {\"prompt\": \"a cat\"}"])
        try:
            generation = queue.engine.request(**body)  # unset fields take the model's defaults, as in the CLI and UI
        except RequestError as exc:
            return _problem(422, exc.messages)
        try:
            job = queue.submit(generation, client=client)
        except (QueueFull, ClientLimitReached) as exc:
            return _problem(429, [str(exc)], headers={"Retry-After": "10"})
        return view(job, store.get_job(job.id))

    @app.get("/v1/generations/{job_id}")
    def status(job_id: str, _: str = Depends(authorised)) -> dict[str, Any]:
        return view(*find(job_id))

    @app.delete("/v1/generations/{job_id}")
    def cancel(job_id: str, _: str = Depends(authorised)):
        job, record = find(job_id)
        if not queue.cancel(job_id):
            return _problem(409, [f"id: generation {job_id} already ended ({record.status})"])
        return JSONResponse({"id": job_id, "cancelling": True}, status_code=202)

    @app.get("/v1/generations/{job_id}/events")
    def events(job_id: str, _: str = Depends(authorised)) -> StreamingResponse:
        job, record = find(job_id)
        return StreamingResponse(_sse(queue, job, record, view), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/images/{name}")
    def image(name: str, _: str = Depends(authorised)) -> FileResponse:
        image_id = name.removesuffix(".png")
        record = store.get_image(image_id) if name.endswith(".png") and ID.match(image_id) else None
        if record is None:
            raise HTTPException(404, [f"image: no image {name[:40]!r} (ids are 32 hex characters + .png)"])
        return FileResponse(store.image_file(record), media_type="image/png")

    @app.get("/v1/history")
    def history(limit: int = Query(20, ge=PAGING["limit"][0], le=PAGING["limit"][1]),
                offset: int = Query(0, ge=PAGING["offset"][0], le=PAGING["offset"][1]),
                _: str = Depends(authorised)) -> dict[str, Any]:
        jobs = store.list_jobs(limit=limit, offset=offset)
        return {"total": store.count_jobs(), "limit": limit, "offset": offset,
                "items": [view(queue.get(r.id), r) for r in jobs]}

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, **queue.engine.describe(), "queue": queue.stats()}

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def unknown(rest: str):
        # Registered last: without it the studio, mounted at /, would answer unknown /v1 paths with its own page.
        raise HTTPException(404, [f"path: {'/v1/' + rest[:80]!r} is not an endpoint of this API (see /docs)"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        if isinstance(exc.detail, list):
            detail = exc.detail
        else:
            detail = [str(exc.detail)]
        return _problem(exc.status_code, detail, headers=getattr(exc, "headers", None))

    return app


def _sse(queue: JobQueue, job: Job | None, record: JobRecord, view) -> Iterator[str]:
    """queued (with position) -> progress per step -> done | error | cancelled. A finished job sends its end at once."""
    def event(name: str, data: dict) -> str:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n"

    if job is None:  # finished before this server's memory (or on a previous run): the stored outcome
        end = {"done": "done", "cancelled": "cancelled"}.get(record.status, "error")
        yield event(end, view(None, record))
        return
    last_position, last_step = None, None
    for current in job.watch():
        if current.status == "queued":
            position = queue.position(current)
            if position != last_position:
                last_position = position
                yield event("queued", {"id": job.id, "position": position})
        elif current.status == "running" and current.progress is not None:
            p = current.progress
            if (p.stage, p.step) != last_step:
                last_step = (p.stage, p.step)
                yield event("progress", {"id": job.id, "stage": p.stage, "step": p.step, "total": p.total,
                                         "elapsed": round(p.elapsed, 3)})
    end = {"done": "done", "cancelled": "cancelled"}.get(job.status, "error")
    yield event(end, view(job, queue.store.get_job(job.id)))

