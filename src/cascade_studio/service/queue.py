"""A FIFO job queue; each worker thread runs one job at a time on the engine (one worker per device; the Ray
Serve app uses one per model replica).

Why our own queue rather than only Gradio's: the studio and the HTTP API must put users in the same line, see
their position, cancel queued or running jobs, and have every finished image stored even if nobody is
listening any more.

Nothing a job does can stop the worker: an engine error, running out of memory, a PNG that cannot be written or a
database that cannot be updated fails that job, with its reason and traceback, and the worker takes the next one.
Write failures also show in `health()` (status "degraded") until a write succeeds again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from PIL import Image

from ..engine import CancelToken, CascadeEngine, GenerationCancelled, GenerationRequest, ProgressEvent, RequestError
from ..store import HistoryStore, ImageRecord
from ..store.sqlite import INTERRUPTED, StoreError, new_id

log = logging.getLogger(__name__)

TERMINAL = ("done", "failed", "cancelled")
MIN_FREE_BYTES = 64 * 1024**2  # below this (or a tenth of a small disk) the output folder is reported as nearly full


class QueueFull(Exception):
    """The queue holds its maximum; the message says how many are waiting."""


class ClientLimitReached(Exception):
    """One client already has its maximum of unfinished jobs."""


class Task(Protocol):
    """Work that is not a generation but takes the device, so it waits in the same line: a model switch, a LoRA
    training. `run` reports progress as small dicts and returns its result (JSON-ready); it raises
    GenerationCancelled when `cancel` is set."""

    kind: str

    def describe(self) -> dict: ...

    def run(self, queue: JobQueue, report: Callable[[dict], None], cancel: CancelToken) -> dict: ...


@dataclass(eq=False)  # a job is itself, not its field values
class Job:
    id: str
    request: GenerationRequest | None  # seed fixed at submission, so the job's seeds are known while it waits
    client: str
    status: str = "queued"
    progress: ProgressEvent | None = None
    preview: Image.Image | None = None
    images: list[ImageRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    prior_cached: bool = False
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished_at: float | None = None
    task: Task | None = None  # a job that is not a generation; then request is None
    task_progress: dict | None = None
    result: dict | None = None
    version: int = 0  # bumped on every change; watchers wait for it to move
    cancel_token: CancelToken = field(default_factory=CancelToken)
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _loops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list, repr=False)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def _update(self, **changes) -> None:
        with self._changed:
            for key, value in changes.items():
                setattr(self, key, value)
            self.version += 1
            self._changed.notify_all()
            waiting = list(self._loops)
        for loop, event in waiting:  # async watchers, woken on their own event loop
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed; its watcher is gone
                pass

    def watch(self, timeout: float = 0.5) -> Iterator[Job]:
        """Yield the job now and after each change (or every `timeout` s, for queue positions) until it ends.
        Blocks a thread while it waits: for threads of our own (the studio's handlers, the CLI)."""
        seen = -1
        while True:
            with self._changed:
                if self.version == seen:
                    self._changed.wait(timeout)
                seen = self.version
            yield self
            if self.finished:
                return

    async def changes(self, timeout: float = 0.5) -> AsyncIterator[Job]:
        """`watch` for the event loop: the same states, but waiting costs no thread (event streams use this)."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._changed:
            self._loops.append(entry)
        try:
            seen = -1
            while True:
                if self.version == seen:
                    try:
                        await asyncio.wait_for(entry[1].wait(), timeout)
                    except asyncio.TimeoutError:  # TimeoutError itself from 3.11 on; 3.10 too
                        pass
                entry[1].clear()
                seen = self.version
                yield self
                if self.finished:
                    return
        finally:
            with self._changed:
                self._loops.remove(entry)


class JobQueue:
    def __init__(
        self, engine: CascadeEngine, store: HistoryStore, *, max_queued: int = 16, per_client: int = 4, workers: int = 1
    ):
        self.engine, self.store = engine, store
        self.max_queued, self.per_client = max_queued, per_client
        self._waiting: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Condition()
        self._running: set[Job] = set()
        self._faults: dict[str, str] = {}  # "database" / "images" -> the last write failure, until one succeeds
        self._closed = False
        # Set by open_queue: the settings the model was loaded with, and which of the server's models it is (for
        # model switches; a Ray Serve ingress has neither and cannot switch).
        self.settings = None
        self.model_choice = None
        self._workers = [
            threading.Thread(target=self._work, name=f"cascade-worker-{i}", daemon=True) for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, request: GenerationRequest, client: str = "local") -> Job:
        """Queue a request for generation.

        Args:
            request: a validated request; a random seed is fixed now if it has none, so its seeds are known.
            client: who asks, for the per-client cap (an address, or the studio's user).
        Returns:
            The job, already in line; `watch()` or `changes()` follow it to its end.
        Raises:
            QueueFull: the queue holds `max_queued` jobs, or the server is shutting down.
            ClientLimitReached: this client already has `per_client` unfinished jobs.
            StoreError: the history database could not record the job (it is then not queued).
            RequestError: a picture the request names is not in the store.
        """
        request = request.with_seed()
        missing = [sha for sha in request.pictures if not self.store.picture_file(sha).is_file()]
        if missing:
            raise RequestError([f"{request.field_of(sha)}: no stored picture has sha256 {sha}" for sha in missing])
        with self._lock:
            self._admit(client)
            warnings = getattr(self.engine, "warnings", None)  # a remote engine has no tokenizer here
            job = Job(new_id(), request, client, warnings=warnings(request) if warnings else [])
            try:
                self.store.create_job(job.id, request, self.engine.identity, client)
            except StoreError as exc:
                self._fault(exc)
                raise
            self._cleared("database")
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._lock.notify_all()
        return job

    def submit_task(self, task: Task, client: str = "local") -> Job:
        """Queue a task (a model switch, a LoRA training) in the same line as generations.

        Returns:
            Its job, with `request` None; `task_progress` and, at the end, `result` say how it went.
        Raises:
            QueueFull, ClientLimitReached, StoreError: as `submit`.
        """
        with self._lock:
            self._admit(client)
            job = Job(new_id(), None, client, task=task)
            try:
                self.store.create_task(job.id, task.kind, task.describe(), client)
            except StoreError as exc:
                self._fault(exc)
                raise
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._lock.notify_all()
        return job

    def _admit(self, client: str) -> None:
        """Refuse a new job when the server closes, the line is full or the client has its share."""
        if self._closed:
            raise QueueFull("the server is shutting down")
        if len(self._waiting) >= self.max_queued:
            raise QueueFull(f"the queue is full ({len(self._waiting)} jobs waiting); try again in a few seconds")
        mine = self.unfinished(client)
        if mine >= self.per_client:
            raise ClientLimitReached(f"you already have {mine} unfinished jobs (at most {self.per_client})")

    def active(self, client: str | None = None) -> list[Job]:
        """Running, then waiting jobs, oldest first (one client's, or everyone's). A job whose end its watchers
        have already been told of is not active, though its worker may not have let go of it yet."""
        with self._lock:
            jobs = [*self._running, *self._waiting]
        return [j for j in jobs if not j.finished and (client is None or j.client == client)]

    def pending(self, kind: str) -> list[Job]:
        """Waiting and running tasks of a kind (e.g. a model switch under way), oldest first."""
        return [j for j in self.active() if j.task is not None and j.task.kind == kind]

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """Where a job stands: 0 while it runs, 1 for the next to run, 2 after it, ...; None once it has ended."""
        with self._lock:
            if job in self._running:
                return 0
            return next((i + 1 for i, j in enumerate(self._waiting) if j is job), None)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job at once, or a running one within its current step. False when already finished."""
        job = self._jobs.get(job_id)
        if job is None or job.finished:
            return False
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, "cancelled")
                return True
        job.cancel_token.cancel()
        return True

    def close(self, timeout: float = 5) -> None:
        """Stop: refuse new jobs, end waiting and running ones as interrupted (the running one within its current
        step), and wait up to `timeout` s for the workers. A job still running then (stuck in a call that does not
        check for cancellation) is recorded as interrupted all the same."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            running = list(self._running)
            self._lock.notify_all()
        for job in waiting:
            self._finish(job, "failed", INTERRUPTED)
        for job in running:
            job.cancel_token.cancel()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for job in running:
            if not job.finished:
                log.warning("job %s did not stop within %.0f s; recorded as interrupted", job.id, timeout)
                self._finish(job, "failed", INTERRUPTED)

    @property
    def closed(self) -> bool:
        return self._closed

    def unfinished(self, client: str) -> int:
        """How many of this client's jobs wait or run."""
        with self._lock:
            return sum(1 for j in self._active() if j.client == client)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"queued": len(self._waiting), "running": len(self._running)}

    def health(self) -> tuple[str, list[str]]:
        """("ok", []) or ("degraded", reasons): recent write failures, and an output folder that is read-only or
        nearly full (found before any job fails on it)."""
        with self._lock:
            reasons = [f"{what} writes failing: {message}" for what, message in self._faults.items()]
        try:
            disk = os.statvfs(self.store.output_dir)
            if disk.f_flag & os.ST_RDONLY:
                reasons.append(f"output folder {self.store.output_dir} is on a read-only file system")
            elif disk.f_bavail * disk.f_frsize < min(MIN_FREE_BYTES, disk.f_blocks * disk.f_frsize // 10):
                free = disk.f_bavail * disk.f_frsize / 1024**2
                reasons.append(f"output folder {self.store.output_dir} has only {free:.0f} MB free")
        except OSError as exc:
            reasons.append(f"output folder {self.store.output_dir} cannot be checked: {exc}")
        if self._closed:
            reasons.append("shutting down")
        return ("degraded" if reasons else "ok"), reasons

    def _fault(self, exc: StoreError) -> None:
        with self._lock:
            self._faults[exc.what] = str(exc).removeprefix(f"{exc.what}: ")
        log.error("history %s", exc)

    def _cleared(self, what: str) -> None:
        if what in self._faults:
            with self._lock:
                self._faults.pop(what, None)
            log.info("history %s writes work again", what)

    def _active(self) -> list[Job]:
        return list(self._waiting) + list(self._running)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                self._running.add(job)
            try:
                self._run(job)
            except BaseException as exc:  # noqa: BLE001 - whatever happens, this job ends and the worker goes on
                log.exception("job %s: the worker caught an unexpected error", job.id)
                if not job.finished:
                    self._finish(job, "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc())
            finally:
                with self._lock:
                    self._running.discard(job)
                    # Finished jobs stay readable from the store; keep only a bounded number in memory.
                    finished = [j for j in self._jobs.values() if j.finished]
                    for old in finished[:-256]:
                        self._jobs.pop(old.id, None)

    def _finish(self, job: Job, status: str, error: str | None = None, tb: str | None = None) -> None:
        """End a job in memory and in the store. A store failure is reported in health, never raised: the job's
        watchers still see its end."""
        if job.finished:
            return
        try:
            if job.task is not None:
                self.store.set_task_status(job.id, status, job.result, error, tb)
            else:
                self.store.set_status(job.id, status, error, tb)
            self._cleared("database")
        except StoreError as exc:
            self._fault(exc)
        job._update(status=status, error=error, traceback=tb, finished_at=time.time())

    def _run_task(self, job: Job) -> None:
        try:
            self.store.set_task_status(job.id, "running")
        except StoreError as exc:
            self._fault(exc)
            self._finish(job, "failed", f"could not record the job: {exc}")
            return
        job._update(status="running", started=time.time())
        try:
            result = job.task.run(self, lambda report: job._update(task_progress=report), job.cancel_token)
        except GenerationCancelled:
            self._finish(job, *(("failed", INTERRUPTED) if self._closed else ("cancelled",)))
            return
        except Exception as exc:  # noqa: BLE001 - the worker must survive any single job
            log.exception("%s job %s failed", job.task.kind, job.id)
            self._finish(job, "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc())
            return
        job.result = result
        self._finish(job, "done")

    def _run(self, job: Job) -> None:
        if job.task is not None:
            return self._run_task(job)
        try:  # the model that runs it: a model switch queued before it may have changed it since submission
            self.store.set_status(job.id, "running", model=self.engine.identity)
        except StoreError as exc:
            self._fault(exc)
            self._finish(job, "failed", f"could not record the job: {exc}")
            return
        job._update(status="running", started=time.time())

        def on_progress(event: ProgressEvent) -> None:
            job._update(progress=event, preview=event.preview or job.preview)

        try:
            # Pictures only when the request names some: an engine of text alone (a remote one) is called as before.
            pictures = {"pictures": self.store.pictures(job.request.pictures)} if job.request.pictures else {}
            result = self.engine(job.request, progress=on_progress, cancel=job.cancel_token, **pictures)
        except GenerationCancelled:
            if self._closed:
                self._finish(job, "failed", INTERRUPTED)
            else:
                self._finish(job, "cancelled")
            return
        except torch.OutOfMemoryError:
            _free_memory()
            log.warning("job %s: out of GPU memory", job.id)
            self._finish(job, "failed", "out of GPU memory: try fewer images, a smaller size, or --cpu-offload")
            return
        except Exception as exc:  # noqa: BLE001 - the worker must survive any single job
            log.exception("job %s failed", job.id)
            self._finish(job, "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc())
            return
        if self._closed:
            self._finish(job, "failed", INTERRUPTED)
            return
        try:
            records = self.store.save_result(job.id, result)  # stored even if nobody is watching any more
        except StoreError as exc:
            self._fault(exc)
            self._finish(job, "failed", f"could not save the result ({exc})", traceback.format_exc())
            return
        self._cleared("images")
        self._cleared("database")
        job._update(
            status="done",
            images=records,
            timings=result.timings,
            prior_cached=result.prior_cached,
            warnings=result.warnings,
            finished_at=time.time(),
        )


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
