"""The history store: real SQLite files, atomic PNGs, recovery after a crash."""

from __future__ import annotations

import sqlite3

from cascade_studio.metadata import read_png
from cascade_studio.store import HistoryStore
from tests.conftest import small_request


def test_job_lifecycle_and_listing(tmp_path, engine):
    store = HistoryStore(tmp_path / "h.sqlite", tmp_path / "out")
    result = engine(small_request(seed=5, num_images=2))
    store.create_job("j1", result.request, engine.identity, "alice")
    assert store.get_job("j1").status == "queued"
    store.set_status("j1", "running")
    records = store.save_result("j1", result)
    job = store.get_job("j1")
    assert job.status == "done" and job.finished and job.timings == result.timings and job.client == "alice"
    assert [(im.index, im.seed) for im in job.images] == [(0, 5), (1, 6)]
    for record in records:
        path = store.image_file(record)
        assert path.is_file() and path.resolve().is_relative_to((tmp_path / "out").resolve())
        assert read_png(path).seed == record.seed  # metadata travels with the file
    assert store.get_image(records[1].id) == records[1]
    assert store.get_image("nope") is None and store.get_job("nope") is None

    store.create_job("j2", small_request(seed=1), engine.identity, "bob")
    store.set_status("j2", "failed", "boom")
    assert [j.id for j in store.list_jobs()] == ["j1"]  # done only, by default
    assert [j.id for j in store.list_jobs(status=None)] == ["j2", "j1"]  # newest first
    assert store.get_job("j2").error == "boom" and store.count_jobs(status=None) == 2


def test_unfinished_jobs_are_marked_failed_on_restart(tmp_path, engine):
    store = HistoryStore(tmp_path / "h.sqlite", tmp_path / "out")
    store.create_job("q", small_request(seed=1), engine.identity, "c")
    store.create_job("r", small_request(seed=2), engine.identity, "c")
    store.set_status("r", "running")
    store.close()
    reopened = HistoryStore(tmp_path / "h.sqlite", tmp_path / "out")
    assert reopened.recovered == 2
    for job_id in ("q", "r"):
        job = reopened.get_job(job_id)
        assert job.status == "failed" and "interrupted" in job.error


def test_database_uses_wal(tmp_path):
    HistoryStore(tmp_path / "h.sqlite", tmp_path / "out").close()
    with sqlite3.connect(tmp_path / "h.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
