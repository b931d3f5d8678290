"""The API's LoRA routes: the LoRA folder, and trainings as queued jobs.

GET    /v1/loras                          the LoRA files generation can use, with trigger words and hashes
POST   /v1/trainings                      202 + job: pictures (base64 + caption) or a server folder, settings
GET    /v1/trainings/{id}                 status, position, progress (step, loss, ETA, last sample), result
GET    /v1/trainings/{id}/events          server-sent events: queued, progress, done | error | cancelled
GET    /v1/trainings/{id}/files/{name}    a sample or the loss plot (PNG)
DELETE /v1/trainings/{id}                 stop it; a checkpoint is written to resume from
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import RequestError
from ..models.lora import lora_info
from .api import ERRORS, ID, RETRY_AFTER, client_of, find_task, parse_json, problem, task_view
from .queue import ClientLimitReached, Job, JobQueue, QueueFull
from .schemas import Cancelling, LoraEntry, LoraList, TaskView
from .training import FILES, TrainingSpec, new_training, spec_errors

KIND = "lora-training"


def training_routes(app: FastAPI, queue: JobQueue, stream: Callable) -> None:
    @app.get("/v1/loras", response_model=LoraList, responses=ERRORS)
    def loras():
        library = queue.engine.lora_library if hasattr(queue.engine, "lora_library") else None
        if library is None:
            return LoraList(folder=None, data=[])
        entries = []
        for path in library.files().values():
            try:
                entries.append(LoraEntry(**{k: v for k, v in lora_info(path).items() if k != "file"}))
            except Exception:  # noqa: BLE001 - a broken file in the folder is left out, not a failed listing
                continue
        return LoraList(folder=str(library.folder) if library.folder else None, data=entries)

    @app.post("/v1/trainings", status_code=202, response_model=TaskView, responses=ERRORS)
    async def create(request: Request):
        body = parse_json(await request.body())
        if isinstance(body, JSONResponse):
            return body
        try:
            spec = TrainingSpec(**body)
        except ValidationError as exc:
            return problem(422, spec_errors(exc))
        if spec.folder and not client_of(request)[1]:
            return problem(403, ["folder: only holders of the server's credentials may name a folder on it"])
        try:
            task = await run_in_threadpool(new_training, queue, spec)
        except RequestError as exc:
            return problem(422, exc.messages)
        try:
            job = await run_in_threadpool(queue.submit_task, task, client_of(request)[0])
        except (QueueFull, ClientLimitReached) as exc:
            return problem(429, [str(exc)], headers={"Retry-After": str(RETRY_AFTER)})
        return task_view(queue, job, None)

    @app.get("/v1/trainings/{job_id}", response_model=TaskView, responses=ERRORS)
    def status(job_id: str):
        return find_task(queue, job_id, KIND)

    @app.delete("/v1/trainings/{job_id}", status_code=202, response_model=Cancelling, responses=ERRORS)
    def cancel(job_id: str, request: Request):
        found = find_task(queue, job_id, KIND)
        job = queue.get(job_id)
        caller, privileged = client_of(request)
        if job is not None and not privileged and job.client != caller:
            return problem(403, [f"id: training {job_id} belongs to another client"])
        if not queue.cancel(job_id):
            return problem(409, [f"id: training {job_id} already ended ({found.status})"])
        return Cancelling(id=job_id, cancelling=True)

    @app.get("/v1/trainings/{job_id}/events", responses=ERRORS | {200: {"content": {"text/event-stream": {}}}})
    async def events(job_id: str, request: Request):
        found = await run_in_threadpool(find_task, queue, job_id, KIND)
        return stream(request, _task_events(queue, queue.get(job_id), found))

    @app.get("/v1/trainings/{job_id}/files/{name}", response_class=FileResponse, responses=ERRORS)
    def files(job_id: str, name: str):
        found = find_task(queue, job_id, KIND)
        workdir = Path(found.spec.get("workdir", ""))
        path = workdir / name
        if not ID.fullmatch(job_id) or Path(name).name != name or path.suffix not in FILES or not path.is_file():
            raise StarletteHTTPException(404, [f"name: training {job_id} has no picture {name[:60]!r}"])
        return FileResponse(path, media_type="image/png")


async def _task_events(queue: JobQueue, job: Job | None, found: TaskView) -> AsyncIterator[str]:
    """queued (with position) -> progress (each report) -> done | error | cancelled, with the task's view."""

    def event(name: str, data: dict) -> str:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n"

    def end(view: TaskView) -> str:
        return event({"done": "done", "cancelled": "cancelled"}.get(view.status, "error"), view.model_dump())

    if job is None:
        yield end(found)
        return
    last, quiet = None, 0
    async for current in job.changes(timeout=0.5):
        now = ("queued", queue.position(current)) if current.status == "queued" else current.task_progress
        if now != last and current.status in ("queued", "running"):
            last, quiet = now, 0
            if current.status == "queued":
                yield event("queued", {"id": job.id, "position": now[1]})
            elif now:
                yield event("progress", {"id": job.id, **{k: v for k, v in now.items() if k != "log"}})
        quiet += 1
        if quiet % 30 == 0:
            yield ": keep-alive\n\n"
    yield end(task_view(queue, job, None))
