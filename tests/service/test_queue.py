"""The shared job queue: FIFO, bounded, per-client cap, cancellation, failures that do not stop the worker."""

from __future__ import annotations

import threading

import pytest
import torch

from cascade_studio.service import ClientLimitReached, JobQueue, QueueFull
from cascade_studio.store import HistoryStore
from tests.conftest import small_request


@pytest.fixture
def queue(tmp_path, engine):
    q = JobQueue(engine, HistoryStore(tmp_path / "h.sqlite", tmp_path / "out"), max_queued=3, per_client=2)
    yield q
    q.close()


def finish(job):
    for _ in job.watch():
        pass
    return job


def hold_worker(queue):
    """Keep the worker busy on a job that waits until released, so the next submissions stay queued."""
    release = threading.Event()
    original = queue.engine.__call__

    def slow(request, progress=None, cancel=None):
        release.wait(30)
        return original(request, progress=progress, cancel=cancel)

    queue.engine = type("Slow", (), {"__call__": staticmethod(slow), "identity": queue.engine.identity})()
    blocker = queue.submit(small_request(seed=1), client="blocker")
    while blocker.status != "running":
        threading.Event().wait(0.01)
    return blocker, release, original


def test_jobs_run_in_order_and_are_stored(queue):
    jobs = [queue.submit(small_request(seed=s), client=f"c{s}") for s in (1, 2, 3)]
    for job in jobs:
        finish(job)
    assert [j.status for j in jobs] == ["done"] * 3
    finished = [queue.store.get_job(j.id).finished for j in jobs]
    assert finished == sorted(finished)
    assert all(queue.store.image_file(j.images[0]).is_file() for j in jobs)
    assert jobs[0].request.seed == 1 and jobs[0].timings["total"] > 0


def test_random_seed_is_fixed_at_submission(queue):
    job = queue.submit(small_request())
    assert job.request.seed is not None
    finish(job)
    assert queue.store.get_job(job.id).images[0].seed == job.request.seed


def test_positions_limits_and_cancel_of_a_queued_job(queue):
    blocker, release, _ = hold_worker(queue)
    a = queue.submit(small_request(seed=10), client="alice")
    b = queue.submit(small_request(seed=11), client="alice")
    with pytest.raises(ClientLimitReached, match="you already have 2 unfinished jobs"):
        queue.submit(small_request(seed=12), client="alice")
    c = queue.submit(small_request(seed=13), client="bob")
    with pytest.raises(QueueFull, match=r"the queue is full \(3 jobs waiting\)"):
        queue.submit(small_request(seed=14), client="carol")
    assert [queue.position(j) for j in (blocker, a, b, c)] == [0, 1, 2, 3]
    assert queue.cancel(b.id) and b.status == "cancelled" and queue.position(c) == 2
    assert queue.store.get_job(b.id).status == "cancelled"
    release.set()
    for job in (blocker, a, c):
        assert finish(job).status == "done"
    assert not queue.cancel(a.id)  # already finished


def test_cancel_a_running_job(queue):
    job = queue.submit(small_request(seed=3, prior_steps=50))
    for seen in job.watch(timeout=0.01):
        if seen.progress is not None:  # running: cancel between steps
            assert queue.cancel(job.id)
            break
    assert finish(job).status == "cancelled" and job.progress.step < 50
    assert queue.store.get_job(job.id).status == "cancelled" and not queue.store.get_job(job.id).images
    assert finish(queue.submit(small_request(seed=4))).status == "done"  # the worker goes on


def test_out_of_memory_fails_the_job_and_the_next_one_runs(queue):
    # A GPU out-of-memory error cannot happen on a CPU machine, so one job's engine call raises it.
    original = queue.engine

    class OOM:
        identity = original.identity

        def __call__(self, *args, **kwargs):
            queue.engine = original
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    queue.engine = OOM()
    failed = finish(queue.submit(small_request(seed=1)))
    assert failed.status == "failed" and failed.error.startswith("out of GPU memory")
    assert queue.store.get_job(failed.id).error == failed.error
    assert finish(queue.submit(small_request(seed=2))).status == "done"


def test_progress_and_previews_reach_watchers(queue):
    job = queue.submit(small_request(seed=8))
    seen = [(j.progress.stage, j.progress.step) for j in job.watch() if j.progress]
    assert {stage for stage, _ in seen} == {"prior", "decoder"}, seen  # both stages reported their steps
    assert ("prior", 4) in seen and seen[-1] == ("decoder", 3) and job.status == "done" and job.preview is not None
