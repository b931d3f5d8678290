"""The HTTP API (`/v1`), on the same server and the same JobQueue as the studio UI.

    POST   /v1/generations               202 + job id at once (422 for bad fields, 429 + Retry-After when full)
    GET    /v1/generations/{id}          status, queue position, progress, seeds, image URLs
    GET    /v1/generations/{id}/events   server-sent events: queued, progress, done | error | cancelled
    DELETE /v1/generations/{id}          cancel, queued or running (your own jobs, or any with the token)
    GET    /v1/images/{image_id}.png     the PNG, metadata included
    GET    /v1/history                   finished generations, newest first, paged
    GET    /v1/health                    liveness, model, queue length, and "degraded" with reasons
    GET    /v1/models, /v1/model         the models this server can run; POST /v1/model switches (a queued job)
    GET    /v1/loras                     the LoRA folder: names, hashes, trigger words
    POST   /v1/trainings                 train a LoRA (a queued job); GET/DELETE /v1/trainings/{id}, .../events
    POST   /v1/images/generations        the OpenAI Images API (api_openai.py)
    /sdapi/v1/...                        the AUTOMATIC1111 API: txt2img, sd-models, progress, ... (api_a1111.py)

Routes never run SQLite or wait for a job on the event loop: event streams wait on the job's own notifications
(no thread each), other work goes to the thread pool. Who may call is decided by the guard (guard.py) in front.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..config import field_error, whole_number
from ..engine import RequestError
from ..store import JobRecord, TaskRecord
from ..store.sqlite import StoreError
from .pictures import keep_pictures
from .queue import ClientLimitReached, Job, JobQueue, QueueFull
from .schemas import (
    Cancelling,
    GenerationView,
    Health,
    HistoryPage,
    ImageView,
    ModelEntry,
    ModelList,
    ModelState,
    Problem,
    ProgressView,
    TaskView,
)

log = logging.getLogger(__name__)

ID = re.compile(r"[0-9a-f]{32}")
SHORT_ID = re.compile(r"[0-9a-f]{8,31}")  # the first characters of an id, as the studio shows it
PAGING = {"limit": (1, 100), "offset": (0, 10**9)}  # /v1/history's query parameters: allowed ranges
PAGING_ALLOWED = {name: whole_number(*bounds) for name, bounds in PAGING.items()}
RETRY_AFTER = 10  # seconds a refused client is told to wait (the queue moves at least this fast)
MAX_STREAMS = 8  # open event streams per client
ERRORS = {status: {"model": Problem} for status in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503)}


def problem(status: int, messages: list[str], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": messages}, status_code=status, headers=headers)


def renamed(message: str, names: dict[str, str]) -> str:
    """A message in a client API's own field names ('num_images: ...' -> 'n: ...'): our messages start with the
    field, and OpenAI or A1111 clients know it by their name."""
    field, _, rest = message.partition(":")
    return f"{names[field]}:{rest}" if field in names else message


def parse_json(raw: bytes) -> dict | JSONResponse:
    """A request body as a JSON object, or the problem that says why it is not one."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, 4300+ digit integers, nesting past the stack
        return problem(400, [f"body: not valid JSON ({type(exc).__name__}: {str(exc)[:80] or 'nested too deep'})"])
    if not isinstance(body, dict):
        return problem(422, ['body: must be a JSON object of request fields, e.g. {"prompt": "a cat"}'])
    return body


def client_of(request: Request) -> tuple[str, bool]:
    """(who is calling, for the per-client cap and job ownership; whether they hold the server's credentials)."""
    state = request.scope.get("state", {})
    return state.get("client", request.client.host if request.client else "api"), state.get("privileged", True)


def view(queue: JobQueue, job: Job | None, record: JobRecord | None) -> GenerationView:
    """A job as the API shows it: from memory while the server knows it, else from the store."""
    if job is not None:
        p = job.progress if job.status == "running" else None
        return GenerationView(
            id=job.id,
            status=job.status,
            request=job.request,
            seeds=job.request.image_seeds,
            model=queue.engine.identity.name,
            position=queue.position(job),
            images=_images(job.images),
            timings=job.timings or None,
            prior_cached=job.prior_cached if job.status == "done" else None,
            warnings=job.warnings,
            error=job.error,
            created=job.created,
            finished=job.finished_at,
            progress=ProgressView(stage=p.stage, step=p.step, total=p.total, elapsed=round(p.elapsed, 3))
            if p
            else None,
        )
    return GenerationView(
        id=record.id,
        status=record.status,
        request=record.request,
        seeds=record.request.image_seeds,
        model=record.model.name,
        position=None,
        images=_images(record.images),
        timings=record.timings,
        prior_cached=record.prior_cached,
        warnings=record.warnings,
        error=record.error,
        created=record.created,
        finished=record.finished,
    )


def task_view(queue: JobQueue, job: Job | None, record: TaskRecord | None) -> TaskView:
    if job is not None:
        return TaskView(
            id=job.id,
            kind=job.task.kind,
            status=job.status,
            spec=job.task.describe(),
            position=queue.position(job),
            progress=job.task_progress,
            result=job.result,
            error=job.error,
            created=job.created,
            finished=job.finished_at,
        )
    return TaskView(
        id=record.id,
        kind=record.kind,
        status=record.status,
        spec=record.spec,
        position=None,
        result=record.result,
        error=record.error,
        created=record.created,
        finished=record.finished,
    )


def find_task(queue: JobQueue, job_id: str, kind: str) -> TaskView:
    """A task of this kind, from memory or the store; 404 otherwise. Thread pool only."""
    job = queue.get(job_id) if ID.fullmatch(job_id) else None
    record = None if job is not None else (queue.store.get_task(job_id) if ID.fullmatch(job_id) else None)
    found_kind = job.task.kind if job is not None and job.task else record.kind if record else None
    if found_kind != kind:
        raise StarletteHTTPException(404, [f"id: no {kind} job {job_id[:40]!r}"])
    return task_view(queue, job, record)


def _images(records) -> list[ImageView]:
    return [ImageView(id=im.id, seed=im.seed, url=f"/v1/images/{im.id}.png") for im in records]


def create_api(queue: JobQueue) -> FastAPI:
    app = FastAPIOffline(
        title="cascade-studio",
        version=__version__,
        docs_url="/docs",
        redoc_url="/redoc",
        openapi_url="/openapi.json",
        description="Stable Cascade text-to-image: a shared job queue with persistent history.",
    )
    store = queue.store
    streams: Counter[str] = Counter()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        def message(e: dict) -> str:  # paging's range in words: pydantic's text names only the bound missed
            loc = e["loc"][1:] or ("body",)  # pydantic's loc starts with where the field was: query, body
            return field_error(e | {"loc": loc}, PAGING_ALLOWED if e["loc"][0] == "query" else {})

        return problem(422, [message(e) for e in exc.errors()])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, list) else [str(exc.detail)]
        return problem(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(StoreError)
    async def store_error(_: Request, exc: StoreError):
        return problem(503, [f"history {exc} (the server keeps running; see /v1/health)"])

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return problem(500, [f"internal error: {type(exc).__name__}: {str(exc)[:200]} (the server keeps running)"])

    def find(job_id: str) -> tuple[Job | None, JobRecord | None]:
        """The job in memory, else its record; 404 for what is not a generation of this server. A unique prefix of
        8 or more characters (the studio shows 8) stands for the whole id. Thread pool only."""
        if SHORT_ID.fullmatch(job_id):
            matches = store.job_ids_starting(job_id)
            if len(matches) != 1:
                several = "several generation ids; give more of it" if matches else "no generation id"
                raise StarletteHTTPException(404, [f"id: {job_id} is the start of {several}"])
            job_id = matches[0]
        if not ID.fullmatch(job_id):
            raise StarletteHTTPException(
                404, [f"id: {job_id[:40]!r} is not a generation id (32 hex characters, or the first 8 or more of one)"]
            )
        job = queue.get(job_id)
        record = None if job is not None else store.get_job(job_id)
        if job is None and record is None:
            raise StarletteHTTPException(404, [f"id: no generation {job_id}"])
        return job, record

    @app.post("/v1/generations", status_code=202, response_model=GenerationView, responses=ERRORS)
    async def create(request: Request):
        body = parse_json(await request.body())
        if isinstance(body, JSONResponse):
            return body
        try:
            # Unset fields take the model's defaults, as in the CLI and UI; LoRA files are read: not on the loop.
            generation = await run_in_threadpool(lambda: queue.engine.request(**keep_pictures(body, store)))
        except RequestError as exc:
            return problem(422, exc.messages)
        try:
            job = await run_in_threadpool(queue.submit, generation, client_of(request)[0])
        except (QueueFull, ClientLimitReached) as exc:
            return problem(429, [str(exc)], headers={"Retry-After": str(RETRY_AFTER)})
        except RequestError as exc:  # a picture removed from the store since it was named
            return problem(422, exc.messages)
        return view(queue, job, None)

    @app.get("/v1/generations/{job_id}", response_model=GenerationView, responses=ERRORS)
    def status(job_id: str):
        return view(queue, *find(job_id))

    @app.delete("/v1/generations/{job_id}", status_code=202, response_model=Cancelling, responses=ERRORS)
    def cancel(job_id: str, request: Request):
        job, record = find(job_id)
        job_id = job.id if job else record.id
        caller, privileged = client_of(request)
        owner = job.client if job else record.client
        if not privileged and owner != caller:
            return problem(
                403,
                [
                    f"id: generation {job_id} belongs to another client; only its owner or a holder "
                    "of the API token may cancel it"
                ],
            )
        if not queue.cancel(job_id):
            return problem(409, [f"id: generation {job_id} already ended ({job.status if job else record.status})"])
        return Cancelling(id=job_id, cancelling=True)

    @app.get("/v1/generations/{job_id}/events", responses=ERRORS | {200: {"content": {"text/event-stream": {}}}})
    async def events(job_id: str, request: Request) -> StreamingResponse:
        job = queue.get(job_id)  # a job the server is running or just ran: no thread, no SQLite
        record = None
        if job is None or job.id != job_id:
            job, record = await run_in_threadpool(find, job_id)
        return stream(request, _sse(queue, job, record))

    def stream(request: Request, chunks: AsyncIterator[str]) -> StreamingResponse | JSONResponse:
        """An event stream, counted against the caller's MAX_STREAMS."""
        caller = client_of(request)[0]
        if streams[caller] >= MAX_STREAMS:
            return problem(
                429,
                [f"events: at most {MAX_STREAMS} open event streams per client"],
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        streams[caller] += 1

        async def counted() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                streams[caller] -= 1
                if not streams[caller]:
                    del streams[caller]

        return StreamingResponse(
            counted(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.get("/v1/images/{name}", response_class=FileResponse, responses=ERRORS | {200: {"content": {"image/png": {}}}})
    def image(name: str):
        image_id = name.removesuffix(".png")
        record = store.get_image(image_id) if name.endswith(".png") and ID.fullmatch(image_id) else None
        if record is None:
            raise StarletteHTTPException(404, [f"image: no image {name[:40]!r} (ids are 32 hex characters + .png)"])
        path = store.image_file(record)
        if not path.is_file():
            raise StarletteHTTPException(
                404, [f"image: {name} is in the history but its file {record.path} is gone from the output folder"]
            )
        return FileResponse(path, media_type="image/png")

    @app.get("/v1/history", response_model=HistoryPage, responses=ERRORS)
    def history(
        limit: int = Query(20, ge=PAGING["limit"][0], le=PAGING["limit"][1]),
        offset: int = Query(0, ge=PAGING["offset"][0], le=PAGING["offset"][1]),
    ):
        jobs = store.list_jobs(limit=limit, offset=offset)
        return HistoryPage(
            total=store.count_jobs(), limit=limit, offset=offset, items=[view(queue, queue.get(r.id), r) for r in jobs]
        )

    # --- models: what this server can run, and switching the loaded one ---------------------------------------

    def switchable() -> bool:
        return queue.settings is not None and queue.settings.model_switch

    def entries() -> list[ModelEntry]:
        from .switch import available_models

        loaded = queue.model_choice.id if queue.model_choice else None
        choices = available_models(queue.settings) if queue.settings is not None else []
        if queue.model_choice is not None and loaded not in {c.id for c in choices}:
            choices = [queue.model_choice, *choices]
        return [ModelEntry(id=c.id, label=c.label, loaded=c.id == loaded) for c in choices]

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    def models():
        """Every model this server can run (the OpenAI shape: `data[].id`), and which is loaded."""
        return ModelList(data=entries())

    @app.get("/v1/model", response_model=ModelState, responses=ERRORS)
    def model():
        choice = queue.model_choice
        loaded = ModelEntry(id=choice.id if choice else "remote", label=queue.engine.identity.name, loaded=True)
        described = queue.engine.describe()
        return ModelState(
            loaded=loaded,
            device=described["device"],
            dtype=described["dtype"],
            switchable=switchable(),
            switches=[task_view(queue, j, None) for j in queue.pending("model")],
        )

    @app.post("/v1/model", status_code=202, response_model=TaskView, responses=ERRORS)
    async def switch(request: Request):
        from .switch import SwitchModel, available_models

        if not switchable():
            return problem(403, ["model: this server keeps the model it started with (--no-model-switch)"])
        body = parse_json(await request.body())
        if isinstance(body, JSONResponse):
            return body
        wanted = body.get("model")
        choices = {c.id: c for c in await run_in_threadpool(available_models, queue.settings)}
        if not isinstance(wanted, str) or wanted not in choices:
            return problem(422, [f"model: must be one of {', '.join(choices)} (got {str(wanted)[:40]!r})"])
        if queue.model_choice is not None and wanted == queue.model_choice.id and not queue.pending("model"):
            return problem(409, [f"model: {wanted} is loaded already"])
        try:
            job = await run_in_threadpool(
                queue.submit_task, SwitchModel(choices[wanted], queue.settings), client_of(request)[0]
            )
        except (QueueFull, ClientLimitReached) as exc:
            return problem(429, [str(exc)], headers={"Retry-After": str(RETRY_AFTER)})
        return task_view(queue, job, None)

    @app.get("/v1/model/switches/{job_id}", response_model=TaskView, responses=ERRORS)
    def switch_status(job_id: str):
        return find_task(queue, job_id, "model")

    @app.get("/v1/health", response_model=Health)
    async def health():
        status, reasons = queue.health()
        return Health(
            status=status, reasons=reasons, version=__version__, **queue.engine.describe(), queue=queue.stats()
        )

    from .api_training import training_routes  # here: it builds on this module's helpers

    training_routes(app, queue, stream)

    from .api_openai import openai_routes

    def loaded_names() -> set[str]:
        choice = queue.model_choice
        return {queue.engine.identity.name, *([choice.id] if choice else [])}

    openai_routes(app, queue, loaded_names)

    from .api_a1111 import a1111_routes

    a1111_routes(app, queue, loaded_names)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def unknown(rest: str):
        # Registered last: without it the studio, mounted at /, would answer unknown /v1 paths with its own page.
        raise StarletteHTTPException(404, [f"path: {'/v1/' + rest[:80]!r} is not an endpoint of this API (see /docs)"])

    return app


async def _sse(queue: JobQueue, job: Job | None, record: JobRecord | None) -> AsyncIterator[str]:
    """queued (with position) -> progress per step -> done | error | cancelled. A finished job sends its end at once.
    Waits on the job's notifications on the event loop; a comment every 15 s keeps proxies from closing it."""

    def event(name: str, data: dict) -> str:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n"

    def end(current: GenerationView) -> str:
        return event({"done": "done", "cancelled": "cancelled"}.get(current.status, "error"), current.model_dump())

    if job is None:  # finished before this server's memory (or on a previous run): the stored outcome
        yield end(view(queue, None, record))
        return
    last_position, last_step, quiet = None, None, 0
    async for current in job.changes(timeout=0.5):
        if current.status == "queued":
            position = queue.position(current)
            if position != last_position:
                last_position, quiet = position, 0
                yield event("queued", {"id": job.id, "position": position})
        elif current.status == "running" and current.progress is not None:
            p = current.progress
            if (p.stage, p.step) != last_step:
                last_step, quiet = (p.stage, p.step), 0
                yield event(
                    "progress",
                    {"id": job.id, "stage": p.stage, "step": p.step, "total": p.total, "elapsed": round(p.elapsed, 3)},
                )
        quiet += 1
        if quiet % 30 == 0:
            yield ": keep-alive\n\n"
    yield end(view(queue, job, None))
