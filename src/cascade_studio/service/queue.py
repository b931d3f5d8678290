"""A FIFO job queue; each worker thread runs one job at a time on the engine (one worker per device; the Ray
Serve app uses one per model replica).

Why our own queue rather than only Gradio's: the studio and the HTTP API must put users in the same line, see
their position, cancel queued or running jobs, and have every finished image stored even if nobody is
listening any more.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..engine import CancelToken, CascadeEngine, GenerationCancelled, GenerationRequest, ProgressEvent
from ..store import HistoryStore, ImageRecord
from ..store.sqlite import new_id

TERMINAL = ("done", "failed", "cancelled")


class QueueFull(Exception):
    """The queue holds its maximum; the message says how many are waiting."""


class ClientLimitReached(Exception):
    """One client already has its maximum of unfinished jobs."""


@dataclass(eq=False)  # a job is itself, not its field values
class Job:
    id: str
    request: GenerationRequest  # seed fixed at submission, so the job's seeds are known while it waits
    client: str
    status: str = "queued"
    progress: ProgressEvent | None = None
    preview: Image.Image | None = None
    images: list[ImageRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    prior_cached: bool = False
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    version: int = 0  # bumped on every change; watchers wait for it to move
    cancel_token: CancelToken = field(default_factory=CancelToken)
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def _update(self, **changes) -> None:
        with self._changed:
            for key, value in changes.items():
                setattr(self, key, value)
            self.version += 1
            self._changed.notify_all()

    def watch(self, timeout: float = 0.5) -> Iterator[Job]:
        """Yield the job now and after each change (or every `timeout` s, for queue positions) until it ends."""
        seen = -1
        while True:
            with self._changed:
                if self.version == seen:
                    self._changed.wait(timeout)
                seen = self.version
            yield self
            if self.finished:
                return


class JobQueue:
    def __init__(self, engine: CascadeEngine, store: HistoryStore, *, max_queued: int = 16, per_client: int = 4,
                 workers: int = 1):
        self.engine, self.store = engine, store
        self.max_queued, self.per_client = max_queued, per_client
        self._waiting: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Condition()
        self._running: set[Job] = set()
        self._closed = False
        self._workers = [threading.Thread(target=self._work, name=f"cascade-worker-{i}", daemon=True)
                         for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def submit(self, request: GenerationRequest, client: str = "local") -> Job:
        request = request.with_seed()
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(f"the queue is full ({len(self._waiting)} jobs waiting); try again in a minute")
            mine = sum(1 for j in self._active() if j.client == client)
            if mine >= self.per_client:
                raise ClientLimitReached(f"you already have {mine} unfinished jobs (at most {self.per_client})")
            job = Job(new_id(), request, client)
            self.store.create_job(job.id, request, self.engine.identity, client)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """0 while running or finished, else 1 for the next to run, 2 after it, ..."""
        with self._lock:
            return next((i + 1 for i, j in enumerate(self._waiting) if j is job), 0)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job at once, or a running one within its current step. False when already finished."""
        job = self._jobs.get(job_id)
        if job is None or job.finished:
            return False
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                self.store.set_status(job.id, "cancelled")
                job._update(status="cancelled")
                return True
        job.cancel_token.cancel()
        return True

    def close(self, timeout: float = 30) -> None:
        """Cancel what waits, stop the running job within its current step, and end the worker."""
        with self._lock:
            waiting = list(self._waiting)
            self._closed = True
            self._lock.notify_all()
        for job in waiting:
            self.cancel(job.id)
        for job in list(self._running):
            job.cancel_token.cancel()
        for worker in self._workers:
            worker.join(timeout)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"queued": len(self._waiting), "running": len(self._running)}

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
            finally:
                with self._lock:
                    self._running.discard(job)
                # Finished jobs stay readable from the store; keep only a bounded number in memory.
                finished = [j for j in self._jobs.values() if j.finished]
                for old in finished[:-256]:
                    self._jobs.pop(old.id, None)

    def _run(self, job: Job) -> None:
        self.store.set_status(job.id, "running")
        job._update(status="running")

        def on_progress(event: ProgressEvent) -> None:
            job._update(progress=event, preview=event.preview or job.preview)

        try:
            result = self.engine(job.request, progress=on_progress, cancel=job.cancel_token)
        except GenerationCancelled:
            self.store.set_status(job.id, "cancelled")
            job._update(status="cancelled")
            return
        except torch.OutOfMemoryError:
            _free_memory()
            message = "out of GPU memory: try fewer images, a smaller size, or --cpu-offload"
            self.store.set_status(job.id, "failed", message)
            job._update(status="failed", error=message)
            return
        except Exception as exc:  # the worker must survive any single job
            message = f"{type(exc).__name__}: {exc}"
            self.store.set_status(job.id, "failed", message)
            job._update(status="failed", error=message)
            return
        records = self.store.save_result(job.id, result)  # stored even if nobody is watching any more
        job._update(status="done", images=records, timings=result.timings, prior_cached=result.prior_cached,
                    warnings=result.warnings)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
