"""The server under faults: disks that refuse writes, a database that cannot grow, crashes mid-save, SIGTERM
mid-job. Each failure fails one job with its reason, health says "degraded" while it lasts, and the worker keeps
serving. Read-only and full disks are small tmpfs mounts (root ignores file modes, so chmod proves nothing).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cascade_studio.store import HistoryStore
from tests.service.conftest import running_server, tiny, wait_done
from tests.service.test_load_and_crash import start
from tests.ui.conftest import free_port


def _mount(path: Path, size: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    return path


@pytest.fixture
def small_disk(tmp_path):
    disk = _mount(tmp_path / "disk", "4m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


def _fill(disk: Path) -> Path:
    """Fill the disk to the last block."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush when it closes
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_read_only_output_folder_fails_the_job_not_the_server(small_disk, tmp_path, engine):
    with running_server(tmp_path, engine, output_dir=small_disk / "out", history_db=tmp_path / "h.sqlite") as (http, _):
        assert http.get("/v1/health").json()["status"] == "ok"
        _remount(small_disk, "ro")
        try:
            health = http.get("/v1/health").json()
            assert health["status"] == "degraded" and "read-only file system" in health["reasons"][0]
            failed = wait_done(http, http.post("/v1/generations", json=tiny(seed=1)).json()["id"])
            assert failed["status"] == "failed" and "could not save the result" in failed["error"]
            assert "Read-only file system" in failed["error"]
            health = http.get("/v1/health").json()
            assert any(r.startswith("images writes failing: ") for r in health["reasons"]), health
            # The worker is alive: the next job runs (and fails the same way) instead of waiting forever.
            assert wait_done(http, http.post("/v1/generations", json=tiny(seed=2)).json()["id"])["status"] == "failed"
        finally:
            _remount(small_disk, "rw")
        done = wait_done(http, http.post("/v1/generations", json=tiny(seed=3)).json()["id"])
        assert done["status"] == "done" and http.get(done["images"][0]["url"]).status_code == 200
        assert http.get("/v1/health").json()["status"] == "ok"


def test_full_output_folder_fails_the_job_and_leaves_no_partial_file(small_disk, tmp_path, engine):
    out = small_disk / "out"
    with running_server(tmp_path, engine, output_dir=out, history_db=tmp_path / "h.sqlite") as (http, _):
        filler = _fill(small_disk)
        health = http.get("/v1/health").json()
        assert health["status"] == "degraded" and "MB free" in health["reasons"][0]
        failed = wait_done(http, http.post("/v1/generations", json=tiny(seed=4, num_images=2)).json()["id"])
        assert failed["status"] == "failed" and "No space left on device" in failed["error"]
        assert not list(out.rglob("*.png")) and not list(out.rglob(".tmp-*"))  # nothing half-written stays
        filler.unlink()
        assert wait_done(http, http.post("/v1/generations", json=tiny(seed=5)).json()["id"])["status"] == "done"


def test_full_database_disk_answers_503_and_recovers(small_disk, tmp_path, engine):
    with running_server(tmp_path, engine, history_db=small_disk / "h.sqlite", max_queued=100, per_client_jobs=100) as (
        http,
        _,
    ):
        assert wait_done(http, http.post("/v1/generations", json=tiny(seed=6)).json()["id"])["status"] == "done"
        filler = _fill(small_disk)
        refused = [http.post("/v1/generations", json=tiny(seed=7 + i)) for i in range(40)]
        full = [r for r in refused if r.status_code == 503]
        assert full, [r.status_code for r in refused]  # the WAL takes a few rows before it hits the end of the disk
        assert all(r.headers["content-type"] == "application/json" for r in refused)
        assert "history database: database or disk is full" in full[0].json()["detail"][0]
        health = http.get("/v1/health").json()
        assert health["status"] == "degraded" and any("database writes failing" in r for r in health["reasons"])
        for accepted in (r for r in refused if r.status_code == 202):
            assert wait_done(http, accepted.json()["id"])["status"] in ("done", "failed")  # each ends
        filler.unlink()
        assert wait_done(http, http.post("/v1/generations", json=tiny(seed=99)).json()["id"])["status"] == "done"
        assert http.get("/v1/health").json()["status"] == "ok"


def test_kill_minus_nine_while_saving_leaves_nothing_behind(tmp_path, tiny_model_dir):
    out, port = tmp_path / "out", free_port()
    proc, http = start(tiny_model_dir, out, port)
    try:
        job = http.post(
            "/v1/generations", json=tiny(seed=8, num_images=8, width=1024, height=1024, prior_steps=1, decoder_steps=1)
        ).json()
        deadline = time.time() + 90
        while not any(out.rglob("*.png")):  # the first image file (or its temporary) has appeared: saving
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        http.close()
    left = list(out.rglob("*.png"))
    assert left and len(left) < 8  # the kill came in the middle of saving the batch
    store = HistoryStore(out / "history.sqlite", out)  # what `serve` does when it starts again
    assert sorted(store.removed) == sorted(left) and not list(out.rglob("*.png"))
    record = store.get_job(job["id"])
    assert record.status == "failed" and record.error.startswith("interrupted") and record.images == []


def test_sigterm_with_a_long_job_stops_within_ten_seconds(tmp_path, tiny_model_dir):
    out, port = tmp_path / "out", free_port()
    proc, http = start(tiny_model_dir, out, port)
    try:
        job = http.post(
            "/v1/generations", json=tiny(seed=9, num_images=8, width=2048, height=2048, prior_steps=100)
        ).json()
        waiting = http.post("/v1/generations", json=tiny(seed=10)).json()
        deadline = time.time() + 60
        while http.get(f"/v1/generations/{job['id']}").json()["status"] != "running":
            assert time.time() < deadline
            time.sleep(0.05)
        with http.stream("GET", f"/v1/generations/{job['id']}/events") as events:  # a client still following it
            lines = events.iter_lines()
            next(lines)
            t = time.perf_counter()
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)
            stopped = time.perf_counter() - t
            assert "event: error" in list(lines)  # the stream was told how the job ended
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        http.close()
    assert stopped < 10 and proc.returncode is not None
    store = HistoryStore(out / "history.sqlite", out)
    assert store.recovered == 0  # nothing was left for crash recovery: the server recorded its jobs itself
    for job_id in (job["id"], waiting["id"]):
        record = store.get_job(job_id)
        assert record.status == "failed" and record.error.startswith("interrupted"), record
